"""The curves of one or more runs' metrics.jsonl, in the panels that the metrics guide
(docs/metrics.md) reads.

    python experiments/plot_metrics.py out/aao-run out/dpo-run --out docs/metrics.png

Needs matplotlib (an optional install, for the experiments only). Each run is one line per panel; a
metric a run did not log (a, b without AAO, the reference's top-1 without a reference) is left out.
"""

import argparse
import json
from pathlib import Path

PANELS = [  # (title, [(key, label suffix)])
    ("loss: total and pairwise", [("loss", ""), ("loss/preference", " pairwise")]),
    ("rewards/margins (β x log-ratio)", [("rewards/margins", "")]),
    ("rewards/accuracies", [("rewards/accuracies", "")]),
    (
        "logps/chosen, logps/rejected",
        [("logps/chosen", " chosen"), ("logps/rejected", " rejected")],
    ),
    ("thresholds a (upper), b (lower)", [("a/mean", " a"), ("b/mean", " b")]),
    ("token shares: ambiguous, key", [("tokens/ambiguous", " ambiguous"), ("tokens/key", " key")]),
    ("weights/mean", [("weights/mean", "")]),
    (
        "squeeze: top-1 p on chosen, held out",
        [
            ("eval/squeeze/policy_chosen_top1", " policy"),
            ("eval/squeeze/reference_chosen_top1", " reference"),
        ],
    ),
]


def read_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def plot(runs: list[Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(16, 6.5))
    for run in runs:
        rows = read_rows(run)
        for ax, (title, keys) in zip(axes.flat, PANELS):
            for key, suffix in keys:
                points = [(r["step"], r[key]) for r in rows if key in r]
                if points:
                    ax.plot(
                        *zip(*points),
                        label=run.name + suffix,
                        marker="." if key.startswith("eval/") else None,
                    )
            ax.set_title(title, fontsize=10)
    for ax in axes.flat:
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("runs", nargs="+", type=Path, help="run directories holding metrics.jsonl")
    p.add_argument("--out", type=Path, default=Path("metrics.png"))
    args = p.parse_args(argv)
    plot(args.runs, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
