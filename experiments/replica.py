"""The replica: the paper's pipeline (SFT -> preference -> answers) at laptop scale, judged exactly.

    # 3 seeds, ~15-20 minutes on a laptop CPU, 1 thread
    python experiments/replica.py
    # 1 seed, 3 methods, a few steps: seconds (the test suite's)
    python experiments/replica.py --smoke
    # the CPU on a GPU host too (the results below are the CPU's)
    python experiments/replica.py --device cpu

Two synthetic families of questions whose answers are sentences stating a fact:
  facts   "What is the capital of France?" -> "The capital of France is Paris." (data.TASKS): a
          wrong answer differs from the right one in one value token, which Eq. 7 finds (no other
          token is like it);
  order   "Who won the match between Peru and Chile?" -> "Chile beat Peru.": the wrong answer swaps
          the two names, so all its tokens occur in the right one and Eq. 7 scores each S = 1.
Stages, per seed: (1) SFT of the tiny Llama from scratch (train.py --loss sft) on answers of the
right form whose value is drawn uniformly from the task's values (the order family: either name
first), so the SFT model knows the form but not which fact is right; (2) the preference stage from
it, the SFT model as reference (train.py --weights <sft>/final), one run per method and family, on
prompts of two of the three phrasings; (3) greedy answers (model.generate, temperature 0, the
template's stop id) to the third, held-out phrasing, judged by the task's rule: does the answer
state the right fact. A prompt scores 1 against the SFT model's answer if only the policy's is
right, 0.5 if both or neither are, 0 if only the SFT model's is (the win rate). Results:
docs/replica.md, docs/replica.jsonl, docs/replica-*.png; the runs themselves under out/replica/
(ignored by git).
"""

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import model as M  # noqa: E402
import train  # noqa: E402


def repo_path(path: Path) -> str:
    """A run's directory as the results record it: relative to the repository when inside it, so
    that docs/replica.jsonl names the same place on every clone."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


TEMPLATE = "plain"  # the tiny preset's
TEAMS = [country for country, _ in data.CAPITALS]
ORDER_QUESTIONS = [
    "Who won the match between {p} and {q}?",
    "Which team won when {p} played {q}?",
    "Tell me who won the game of {p} against {q}.",
]
FACT_TASKS = ("capital", "color", "opposite")
HELD_OUT = 2  # the phrasing (index into a task's questions) that the preference stage never sees

# name: train.py flags. The Fig. 3 ablation: λ_c = 0 drops Eq. 9-10, λ_r = 0 Eq. 11-12. A flag
# "{NAME}" stands for the final/ of the same seed and family's run NAME (of METHODS or HELPERS),
# trained first if it is not there: TIS-DPO's contrastive models, built from the same SFT model
# with the same budget (the paper's best variant: DPO on the pairs, and on the pairs reversed).
AAO = ["--loss", "dpo", "--weighting", "aao"]
TIS = ["--loss", "dpo", "--weighting", "tis"]
METHODS = {
    "DPO": ["--loss", "dpo", "--weighting", "none"],
    "DPO-Random": ["--loss", "dpo", "--weighting", "random"],
    "AAO": AAO,
    "AAO w/o contrastive": AAO + ["--lambda-c", "0"],
    "AAO w/o reward": AAO + ["--lambda-r", "0"],
    "AAO w/o both": AAO + ["--lambda-c", "0", "--lambda-r", "0"],
    "SimPO": ["--loss", "simpo", "--weighting", "none"],
    "SimPO+AAO": ["--loss", "simpo", "--weighting", "aao"],
    "AAO hidden": AAO + ["--similarity", "hidden"],
    "AAO alignment": AAO + ["--similarity", "alignment"],
    "AAO end=1": AAO + ["--end-token-weight", "one"],
    "KTO": ["--loss", "kto", "--weighting", "none"],
    "TDPO1": ["--loss", "tdpo1", "--weighting", "none"],
    "TDPO2": ["--loss", "tdpo2", "--weighting", "none"],
    "TIS-DPO": TIS + ["--tis-positive", "{DPO}", "--tis-negative", "{DPO reversed}"],
}
# Runs that only serve another method's run, not rows of the table.
HELPERS = {"DPO reversed": ["--loss", "dpo", "--weighting", "none", "--swap-pairs"]}
# the paper's Table 2 baselines added after the first table (RTO needs RL: not here)
BASELINES = ["KTO", "TDPO1", "TDPO2", "TIS-DPO"]
PLAN = {
    "facts": list(METHODS),
    "order": ["DPO", "DPO-Random", "AAO", "AAO hidden", "AAO alignment", "AAO end=1"] + BASELINES,
}
SMOKE_PLAN = {"facts": ["DPO", "AAO", "TIS-DPO"]}


# ----------------------------------------------------------------------------- the two families


def fact_items() -> list:
    """(family, questions, sentence, x, right value, all values) per fact of the facts family."""
    items = []
    for task in FACT_TASKS:
        questions, sentence, facts = data.TASKS[task]
        values = sorted({y for _, y in facts})
        items += [("facts", questions, sentence, x, y, values) for x, y in facts]
    return items


def order_items(seed: int, n_matches: int = 24) -> list:
    """Matches of two teams with a fixed winner; the answer states winner, then loser."""
    rng = random.Random(1000 + seed)
    pairs = set()
    while len(pairs) < n_matches:
        pairs.add(tuple(sorted(rng.sample(TEAMS, 2))))
    items = []
    for p, q in sorted(pairs):
        winner, loser = (p, q) if rng.random() < 0.5 else (q, p)
        items.append(("order", ORDER_QUESTIONS, "{x} beat {y}.", winner, loser, None))
    return items


def prompt_of(item, phrasing: int, rng: random.Random) -> str:
    family, questions, _, x, y, _ = item
    if family == "facts":
        return questions[phrasing].format(x=x)
    # the prompt's name order says nothing of the winner
    p, q = (x, y) if rng.random() < 0.5 else (y, x)
    return questions[phrasing].format(p=p, q=q)


def right_answer(item) -> str:
    return item[2].format(x=item[3], y=item[4])


def wrong_answer(item, rng: random.Random) -> str:
    family, _, sentence, x, y, values = item
    if family == "facts":
        return sentence.format(x=x, y=rng.choice([v for v in values if v != y]))
    return sentence.format(x=y, y=x)  # the names swapped: the same tokens in another order


def any_answer(item, rng: random.Random) -> str:
    """SFT's answer: the right form, the value drawn uniformly (right no likelier than wrong)."""
    family, _, sentence, x, y, values = item
    if family == "facts":
        return sentence.format(x=x, y=rng.choice(values))
    return right_answer(item) if rng.random() < 0.5 else wrong_answer(item, rng)


def is_right(item, answer: str) -> bool:
    """The judge: the answer opens with the sentence that states the fact rightly."""
    return answer.strip().startswith(right_answer(item))


def sft_rows(items, n: int, rng) -> list:
    """SFT rows on all three phrasings (the form of the held-out prompts too), values uniform."""
    rows = []
    for _ in range(n):
        item = rng.choice(items)
        rows.append(
            {
                "prompt": prompt_of(item, rng.randrange(3), rng),
                "completion": any_answer(item, rng) + rng.choice(data.SUFFIXES),
            }
        )
    return rows


def pair_rows(items, n: int, phrasings, rng) -> list:
    """Preference pairs: right vs wrong answer, both with the same suffix (and end token)."""
    rows = []
    for _ in range(n):
        item, suffix = rng.choice(items), rng.choice(data.SUFFIXES)
        rows.append(
            {
                "prompt": prompt_of(item, rng.choice(phrasings), rng),
                "chosen": right_answer(item) + suffix,
                "rejected": wrong_answer(item, rng) + suffix,
            }
        )
    return rows


def heldout_prompts(items, rng) -> list:
    """(item, prompt) on the held-out phrasing; the order family's matches in both name orders."""
    out = []
    for item in items:
        if item[0] == "facts":
            out.append((item, item[1][HELD_OUT].format(x=item[3])))
        else:
            out += [
                (item, item[1][HELD_OUT].format(p=p, q=q))
                for p, q in ((item[3], item[4]), (item[4], item[3]))
            ]
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- stages


def run_train(argv: list, device: str) -> None:
    code = train.main(argv + ["--quiet", "--device", device])
    if code != 0:
        raise SystemExit(f"train.py {' '.join(argv)}: exit code {code}")


@torch.no_grad()
def answers(weights: Path, prompts: list, max_new_tokens: int, device: str) -> list[list[int]]:
    """Greedy answers: token ids before the template's end-of-answer token (fp32, on device)."""
    model, tok = M.load_model(weights, device).eval(), M.load_tokenizer(weights)
    chat = data.as_chat(TEMPLATE, tok)
    ids = data.instruction_prompts(chat, tok, prompts)
    out = M.generate(
        model, ids, max_new_tokens, temperature=0.0, stop_ids=data.answer_stop_ids(chat, tok)
    )
    return [(tok.decode(a), len(a)) for a in out]


REFERENCE_ANSWERS = {}


def reference_answers(
    sft_final: Path, family: str, prompts, max_new_tokens: int, device: str
) -> list:
    """The SFT model's answers, the win rate's other side: generated once per seed and family."""
    key = (str(sft_final), family)
    if key not in REFERENCE_ANSWERS:
        REFERENCE_ANSWERS[key] = answers(sft_final, [p for _, p in prompts], max_new_tokens, device)
    return REFERENCE_ANSWERS[key]


def judge(items_prompts, policy, reference) -> dict:
    """Fact accuracy, win rate vs the reference's answers (1 / 0.5 / 0 per prompt), mean length."""
    right = [is_right(item, text) for (item, _), (text, _) in zip(items_prompts, policy)]
    ref_right = [is_right(item, text) for (item, _), (text, _) in zip(items_prompts, reference)]
    wins = [1.0 if r > s else 0.5 if r == s else 0.0 for r, s in zip(right, ref_right)]
    return {
        "accuracy": statistics.mean(right),
        "win_rate": statistics.mean(wins),
        "length": statistics.mean(n for _, n in policy),
    }


def last_eval(out: Path) -> dict:
    return json.loads((out / "eval.jsonl").read_text().splitlines()[-1])


# ----------------------------------------------------------------------------- the experiment


def seed_data(seed: int, out: Path, cfg) -> dict:
    """The seed's SFT set, training pairs and held-out pairs of each family, as JSONL files."""
    rng = random.Random(seed)
    facts, order = fact_items(), order_items(seed)
    out.mkdir(parents=True, exist_ok=True)
    files = {"sft": write_jsonl(out / "sft.jsonl", sft_rows(facts + order, cfg.sft_rows, rng))}
    train_phrasings = [i for i in range(3) if i != HELD_OUT]
    for family, items in (("facts", facts), ("order", order)):
        files[family] = write_jsonl(
            out / f"{family}-pairs.jsonl", pair_rows(items, cfg.pairs, train_phrasings, rng)
        )
        files[family + "-eval"] = write_jsonl(
            out / f"{family}-heldout.jsonl", pair_rows(items, 128, [HELD_OUT], rng)
        )
        files[family + "-prompts"] = heldout_prompts(items, rng)
    return files


def with_runs(flags: list, trained) -> list:
    """The flags with each "{NAME}" replaced by the final/ of run NAME, trained(NAME) its dir."""
    return [str(trained(f[1:-1]) / "final") if f.startswith("{") else f for f in flags]


def trained_run(name, family, seed, files, sft_final, out: Path, cfg, threads: int) -> Path:
    """The run of method (or helper) name for this seed and family, trained unless it is there (an
    experiment cut short continues where it stopped); the runs its flags name are trained first."""
    run_dir = out / f"{family}-{name.replace(' ', '_').replace('/', '')}-t{threads}"
    if not (run_dir / "final").exists():
        other = lambda n: trained_run(n, family, seed, files, sft_final, out, cfg, threads)  # noqa: E731
        run_train(
            with_runs({**METHODS, **HELPERS}[name], other)
            + [
                "--weights",
                str(sft_final),
                "--data",
                str(files[family]),
                "--eval-data",
                str(files[family + "-eval"]),
                "--out",
                str(run_dir),
                "--seed",
                str(seed),
                "--lr",
                str(cfg.lr),
                "--threshold-lr",
                str(cfg.threshold_lr),
                "--batch-size",
                "16",
                "--micro-batch-size",
                "16",
                "--max-steps",
                str(cfg.steps),
                "--eval-every",
                str(cfg.eval_every),
                "--save-dtype",
                "float32",
                "--max-length",
                "96",
                "--max-prompt-length",
                "48",
            ],
            cfg.device,
        )
    return run_dir


def preference_run(name, family, seed, files, sft_final, out: Path, cfg, threads: int) -> dict:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    run_dir = trained_run(name, family, seed, files, sft_final, out, cfg, threads)
    prompts = files[family + "-prompts"]
    policy = answers(run_dir / "final", [p for _, p in prompts], cfg.max_new_tokens, cfg.device)
    reference = reference_answers(sft_final, family, prompts, cfg.max_new_tokens, cfg.device)
    row = {
        "family": family,
        "method": name,
        "seed": seed,
        "threads": threads,
        "run": repo_path(run_dir),
        **judge(prompts, policy, reference),
        "heldout_pref_accuracy": last_eval(run_dir)["eval/accuracy"],
        "sft_accuracy": judge(prompts, reference, reference)["accuracy"],
        "sft_length": statistics.mean(n for _, n in reference),
        "seconds": time.perf_counter() - t0,
    }
    print(json.dumps(row), flush=True)
    return row


def deterministic(device: str) -> None:
    """Seeded runs that repeat exactly. On the CPU they do, bitwise. On CUDA cuBLAS needs a fixed
    workspace (set before its first call, or the first matmul raises), and index_add_, scatter_add_
    and attention's backward have no bitwise-deterministic kernel for every case: there a warning,
    and runs that track."""
    if device == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=device == "cuda")


def experiment(cfg) -> list:
    deterministic(cfg.device)
    rows, plan = [], SMOKE_PLAN if cfg.smoke else PLAN
    if cfg.methods:
        plan = {f: [m for m in ms if m in cfg.methods] for f, ms in plan.items()}
    for seed in cfg.seeds:
        out = cfg.out / f"seed{seed}"
        files = seed_data(seed, out, cfg)
        torch.set_num_threads(cfg.threads)
        sft = out / "sft"
        if not (sft / "final").exists():
            run_train(
                [
                    "--loss",
                    "sft",
                    "--data",
                    str(files["sft"]),
                    "--eval-pairs",  # at most a tenth of the rows (train.held_out_count)
                    str(min(64, cfg.sft_rows // 20)),
                    "--out",
                    str(sft),
                    "--seed",
                    str(seed),
                    "--max-steps",
                    str(cfg.sft_steps),
                    "--batch-size",
                    "32",
                    "--micro-batch-size",
                    "32",
                    "--eval-every",
                    str(cfg.sft_steps),
                    "--save-dtype",
                    "float32",
                ],
                cfg.device,
            )
        for family, methods in plan.items():
            for name in methods:
                rows.append(
                    preference_run(name, family, seed, files, sft / "final", out, cfg, cfg.threads)
                )
        # the thread-count spread: one run again on 1 thread
        if seed == cfg.seeds[0] and not cfg.smoke and "AAO" in plan.get("facts", []):
            rows.append(
                preference_run(
                    "AAO", "facts", seed, files, sft / "final", out, cfg, 3 - cfg.threads
                )
            )
    return rows


# ----------------------------------------------------------------------------- results


def mean_std(values) -> str:
    values = list(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


COLUMNS = [
    ("win_rate", "win rate vs SFT"),
    ("accuracy", "fact accuracy"),
    ("length", "length (tokens)"),
    ("heldout_pref_accuracy", "held-out pref. acc."),
]


def table(rows, family) -> str:
    mine = [r for r in rows if r["family"] == family and r["threads"] == rows[0]["threads"]]
    seeds = sorted({r["seed"] for r in mine})
    head = (
        "| method | "
        + " | ".join(t for _, t in COLUMNS)
        + " |\n|---|"
        + "---|" * len(COLUMNS)
        + "\n"
    )
    sft = [r for r in mine if r["method"] == mine[0]["method"]]
    lines = [
        f"| SFT (reference) | 0.500 | {mean_std(r['sft_accuracy'] for r in sft)} | "
        f"{mean_std(r['sft_length'] for r in sft)} | 0.500 |"
    ]
    for method in dict.fromkeys(r["method"] for r in mine):
        rs = [r for r in mine if r["method"] == method]
        lines.append(
            f"| {method} | " + " | ".join(mean_std(r[k] for r in rs) for k, _ in COLUMNS) + " |"
        )
    return f"**{family}** (mean ± std over seeds {seeds})\n\n" + head + "\n".join(lines) + "\n"


def thread_spread(rows) -> str:
    pair = [
        r
        for r in rows
        if r["family"] == "facts" and r["method"] == "AAO" and r["seed"] == rows[0]["seed"]
    ]
    if len(pair) < 2:
        return ""
    a, b = sorted(pair, key=lambda r: r["threads"])[:2]
    diffs = ", ".join(f"{t} {abs(a[k] - b[k]):.3f}" for k, t in COLUMNS)
    return (
        f"Thread spread (facts, AAO, seed {a['seed']}, {a['threads']} vs {b['threads']} threads): "
        f"absolute differences {diffs}.\n"
    )


def curves(run: Path, keys) -> dict:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {k: [(r["step"], r[k]) for r in rows if k in r] for k in keys}


def plot_squeeze_and_thresholds(rows, docs: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = [
        r
        for r in rows
        if r["family"] == "facts"
        and r["seed"] == rows[0]["seed"]
        and r["threads"] == rows[0]["threads"]
    ]
    runs = {r["method"]: ROOT / r["run"] for r in first if r["method"] in ("DPO", "AAO")}
    keys = [
        "eval/squeeze/policy_chosen_top1",
        "eval/squeeze/policy_rejected_top1",
        "eval/squeeze/reference_chosen_top1",
    ]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for (method, run), color in zip(runs.items(), ("tab:blue", "tab:red")):
        c = curves(run, keys)
        ax.plot(*zip(*c[keys[0]]), color=color, marker=".", label=f"{method}: chosen")
        ax.plot(*zip(*c[keys[1]]), color=color, ls="--", marker=".", label=f"{method}: rejected")
    ax.plot(
        *zip(*curves(next(iter(runs.values())), keys)[keys[2]]),
        color="grey",
        ls=":",
        label="SFT reference: chosen",
    )
    ax.set(
        xlabel="step",
        ylabel="mean top-1 probability at answer tokens",
        title="Squeeze probe, held-out pairs (facts, seed %d)" % rows[0]["seed"],
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    squeeze = docs / "replica-squeeze.png"
    fig.savefig(squeeze, dpi=110)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    c = curves(runs["AAO"], ["a/mean", "b/mean"])
    ax.plot(*zip(*c["a/mean"]), label="a (upper)")
    ax.plot(*zip(*c["b/mean"]), label="b (lower)")
    ax.set(
        xlabel="step",
        ylabel="threshold (mean over the batch)",
        title="AAO thresholds (Eq. 8), facts, seed %d" % rows[0]["seed"],
        ylim=(0, 1),
    )
    ax.legend()
    fig.tight_layout()
    thresholds = docs / "replica-thresholds.png"
    fig.savefig(thresholds, dpi=110)
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "plot_metrics.py"),
            str(runs["DPO"]),
            str(runs["AAO"]),
            "--out",
            str(docs / "metrics.png"),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return [squeeze, thresholds, docs / "metrics.png"]


def with_earlier_rows(rows, cfg, seconds: float) -> tuple[list, str]:
    """--methods: the other rows kept from docs/replica.jsonl (those of the methods and seeds run
    now replaced), in the table's order; and the header's account of the runs' time. An earlier
    row of a seed run now is kept only if its SFT model is this run's: the same seed and family
    gave the same reference answers (length and accuracy); a row from another SFT model (a
    trainer that has changed since) would not compare, and is dropped, and the header says so."""
    file, md = cfg.docs / "replica.jsonl", cfg.docs / "replica.md"
    earlier = [json.loads(x) for x in file.read_text().splitlines()] if file.exists() else []
    sft = {(r["seed"], r["family"]): (r["sft_length"], r["sft_accuracy"]) for r in rows}
    others = [r for r in earlier if r["method"] not in cfg.methods or r["seed"] not in cfg.seeds]
    reference = lambda r: (r["sft_length"], r["sft_accuracy"])  # noqa: E731
    same = lambda r: sft.get((r["seed"], r["family"]), reference(r)) == reference(r)  # noqa: E731
    kept = [r for r in others if same(r)]
    order = lambda r: (r["seed"], r["family"] != "facts", list(METHODS).index(r["method"]))  # noqa: E731
    rows = sorted(kept + rows, key=lambda r: (*order(r), r["threads"]))
    # what the earlier runs took, as the header said: "`python ...`: N minutes[; then ...]"
    found = re.search(r"\n\n(`python experiments/replica.py.*?), torch threads", md.read_text())
    earlier_runs = f"{found.group(1)}; then " if found and kept else ""
    names = " ".join(f"'{m}'" if " " in m else m for m in cfg.methods)
    names += "" if cfg.seeds == [0, 1, 2] else " --seeds " + " ".join(map(str, cfg.seeds))
    dropped = sorted({r["method"] for r in others if not same(r)}, key=list(METHODS).index)
    note = (
        f"; the earlier rows of {', '.join(dropped)} dropped: their SFT models are not "
        "these seeds' SFT models today)"
        if dropped
        else ""
    )
    return rows, (
        f"{earlier_runs}`python experiments/replica.py --methods {names}` (these rows again, the "
        f"others kept{note}): {seconds / 60:.1f} minutes"
    )


def write_results(rows, cfg, seconds: float, command: str | None = None) -> None:
    cfg.docs.mkdir(parents=True, exist_ok=True)
    write_jsonl(cfg.docs / "replica.jsonl", rows)
    families = list(dict.fromkeys(r["family"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    smoke = " --smoke" if cfg.smoke else ""
    command = command or f"`python experiments/replica.py{smoke}`: {seconds / 60:.1f} minutes"
    text = (
        f"# Replica results\n\n{command}, torch threads {cfg.threads}, seeds {seeds}, "
        f"{cfg.steps} preference steps of 16 pairs after {cfg.sft_steps} SFT steps of 32 rows. "
        "Win rate: per held-out prompt 1 if only the policy's greedy answer states the fact "
        "rightly, 0.5 if both or neither do, 0 if only the SFT model's does.\n\n"
        + "\n".join(table(rows, f) for f in families)
        + "\n"
        + thread_spread(rows)
    )
    (cfg.docs / "replica.md").write_text(text)
    # the figures read DPO's and AAO's runs of this --out
    if not cfg.smoke and {"DPO", "AAO"} <= set(cfg.methods or METHODS):
        plot_squeeze_and_thresholds(rows, cfg.docs)
    print(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default: 1; the spread run uses the other of 1 and 2)",
    )
    p.add_argument(
        "--out", type=Path, default=ROOT / "out" / "replica", help="the runs (default: out/replica)"
    )
    p.add_argument(
        "--docs", type=Path, default=ROOT / "docs", help="results and PNGs (default: docs)"
    )
    p.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        help="only these methods; the other rows of --docs' replica.jsonl are kept (default: all)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="1 seed, DPO, AAO and TIS-DPO on facts, a few steps; no PNGs",
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="training and answers (default: auto = cuda, bf16 training, when there is one)",
    )
    cfg = p.parse_args(argv)
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg.sft_steps, cfg.sft_rows, cfg.steps, cfg.pairs, cfg.eval_every = 500, 8000, 60, 2048, 10
    cfg.lr, cfg.threshold_lr, cfg.max_new_tokens = 1e-3, 3e-4, 32
    if cfg.smoke:
        cfg.seeds, cfg.sft_steps, cfg.sft_rows, cfg.steps, cfg.pairs, cfg.eval_every = (
            cfg.seeds[:1],
            4,
            256,
            3,
            128,
            3,
        )
        cfg.max_new_tokens = 8
    return cfg


def main(argv=None) -> None:
    cfg = parse_args(argv)
    t0 = time.perf_counter()
    rows, command = experiment(cfg), None
    seconds = time.perf_counter() - t0
    if cfg.methods and not cfg.smoke:
        rows, command = with_earlier_rows(rows, cfg, seconds)
    write_results(rows, cfg, seconds, command)


if __name__ == "__main__":
    main()
