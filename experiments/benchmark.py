r"""Step time and peak memory of this trainer (DPO and AAO) beside TRL's DPOTrainer on the same job.

    python experiments/benchmark.py               # this trainer: DPO (--weighting none) and AAO
    python experiments/benchmark.py --trl         # and TRL's DPOTrainer (pip install trl==1.16.0)
    python experiments/benchmark.py --device cpu  # the CPU on a GPU host too (default: cuda if any)
    python experiments/benchmark.py --trl --spread ultrafeedback --shape smollm2 \
        --padded-from f5b0079

--spread ultrafeedback draws each pair's lengths the way UltraFeedback's are spread (seeded
log-normal, mean prompt ~165 and answer ~300 tokens, heavy-tailed, prompts cut at 512, rows at
1,024; --length-scale shrinks all of it for a CPU), so that padding and the second copy of the
prompt cost what they cost there. --shape smollm2 is SmolLM2-135M-Instruct's shape (30 layers x
576, 9 heads / 3 KV heads, MLP 1,536, vocabulary 49,152; untied, see SMOLLM2), random weights: the
layers, not the head, are the step, as at 8B. --weights DIR takes a checkpoint's config and weights
instead (the job's tokenizer still writes the rows: its ids are a subset of any vocabulary).
--padded-from REV also runs this trainer as it was at REV (the padded micro-batches). The table
starts with the tokens through the layers per step: computed by each layout, the real tokens of
the rows (prompt twice), and the prompt once with both answers.

The job: a Llama with Llama 3's 128,256-token vocabulary (4 layers x 256 hidden, 4 heads, 1 KV
head) in fp32 on the CPU, the same pairs (prompts ~120 tokens, answers ~250 tokens that share most
sentences), 2 pairs per step, a live reference, lr 5e-7, beta 0.1. At this size the vocabulary
dominates: the head and its log-softmax are most of the work, which is where an 8B run's memory
goes too.

Every trainer runs in its own process, in alternating order over --rounds, from the same HF
checkpoint and the same tokenizer.json; peak memory is the child's peak resident set (getrusage),
step time the median over the steps after the first (which pays for allocation and warm-up).
"""

import argparse
import json
import math
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import model as M  # noqa: E402

# ----------------------------------------------------------------------------- the job


def sentences_up_to(rng: random.Random, draw, n_tokens: int, tokenizer) -> list:
    """Draw (chosen, rejected) sentence pairs until the chosen side holds about n_tokens tokens."""
    out = []
    while len(tokenizer.encode(" ".join(c for c, _ in out)).ids) < n_tokens:
        out.append(draw(rng))
    return out


def benchmark_pair(rng: random.Random, tokenizer, prompt_tokens: int, answer_tokens: int) -> dict:
    """A long pair whose answers share most sentences: one sentence in five of the rejected answer
    states a wrong value. Many ambiguous tokens around a few key ones, the case AAO is built for."""

    def fact(r, i=iter(range(10**9))):
        f = data.synthetic_pair(r)
        wrong = next(i) % 5 == 0 and f["score_rejected"] > 5  # a wrong value, not an evasion
        return f["chosen"], f["rejected"] if wrong else f["chosen"]

    prompt = sentences_up_to(
        rng, lambda r: (data.synthetic_pair(r)["prompt"],) * 2, prompt_tokens, tokenizer
    )
    answer = sentences_up_to(rng, fact, answer_tokens, tokenizer)
    return {
        "prompt": " ".join(p for p, _ in prompt),
        "chosen": " ".join(c for c, _ in answer),
        "rejected": " ".join(r for _, r in answer),
    }


def ultrafeedback_lengths(rng: random.Random, scale: float) -> tuple[int, int, int]:
    """(prompt, chosen, rejected) token counts spread like UltraFeedback's: log-normal with means
    ~165 and ~300 and long tails (σ 0.9 and 0.6), the prompt cut at 512 and the answers at 1,024
    with it; all x scale."""
    draw = lambda mean, sigma: rng.lognormvariate(math.log(mean) - sigma**2 / 2, sigma)  # noqa: E731
    prompt = max(4, min(round(draw(165, 0.9) * scale), int(512 * scale)))
    room = int(1024 * scale) - prompt
    return prompt, *(max(2, min(round(draw(300, 0.6) * scale), room)) for _ in range(2))


def text_of(tokenizer, text: str, n: int) -> str:
    """The first n tokens of a text, as text."""
    return tokenizer.decode(tokenizer.encode(text).ids[:n])


def spread_pair(rng: random.Random, tokenizer, scale: float) -> dict:
    """A benchmark_pair cut to lengths drawn by ultrafeedback_lengths."""
    p, c, r = ultrafeedback_lengths(rng, scale)
    pair = benchmark_pair(rng, tokenizer, p + 8, max(c, r) + 8)
    return {
        "prompt": text_of(tokenizer, pair["prompt"], p),
        "chosen": text_of(tokenizer, pair["chosen"], c),
        "rejected": text_of(tokenizer, pair["rejected"], r),
    }


# SmolLM2-135M-Instruct's shape. It ties its head to the embedding; the padded revision the
# benchmark can run beside (--padded-from f5b0079) could not load a tied checkpoint, so the copy is
# untied: the same FLOPs, 28M more parameters held.
SMOLLM2 = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=False,
    rope_theta=100000.0,
)


def write_model(job: Path, args, tokenizer) -> None:
    if args.weights:  # a real checkpoint's config and weights; the job's tokenizer writes the rows
        for f in Path(args.weights).glob("*.safetensors*"):
            (job / f.name).write_bytes(f.read_bytes())
        (job / "config.json").write_text((Path(args.weights) / "config.json").read_text())
        return
    shape = (
        SMOLLM2
        if args.shape == "smollm2"
        else dict(
            hidden_size=args.dim,
            intermediate_size=args.dim * 7 // 2,
            num_hidden_layers=args.layers,
            num_attention_heads=4,
            num_key_value_heads=1,
            vocab_size=args.vocab,
        )
    )
    cfg = M.ModelConfig(
        **shape,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.token_to_id("<|begin_of_text|>"),
        eos_token_id=tokenizer.token_to_id("<|end_of_text|>"),
    )
    M.save_model(M.init_weights(M.Transformer(cfg), seed=0), job)


def write_job(job: Path, args) -> None:
    """The checkpoint (config.json, model.safetensors, tokenizer.json) and pairs.jsonl, which both
    trainers read."""
    job.mkdir(parents=True, exist_ok=True)
    tokenizer = data.tiny_tokenizer()
    write_model(job, args, tokenizer)
    tokenizer.save(str(job / "tokenizer.json"))
    (job / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|begin_of_text|>",
                "eos_token": "<|end_of_text|>",
                "pad_token": "<|end_of_text|>",
            }
        )
    )
    rng = random.Random(0)
    with open(job / "pairs.jsonl", "w") as f:
        for _ in range(args.pairs):
            pair = (
                spread_pair(rng, tokenizer, args.length_scale)
                if args.spread == "ultrafeedback"
                else benchmark_pair(rng, tokenizer, args.prompt_tokens, args.answer_tokens)
            )
            f.write(json.dumps(pair) + "\n")


def tokens_per_step(job: Path, max_length: int, pairs_per_step: int = 2) -> dict:
    """Tokens through the layers per step of pairs_per_step pairs, averaged over the job's pairs in
    order: padded rows (2 per pair x the longest row), the real tokens of the rows (each prompt
    twice), and packed (each prompt once, then both answers)."""
    tokenizer = data.tiny_tokenizer()
    rows = data.read_rows(job / "pairs.jsonl")
    pairs, _ = data.tokenize_rows(
        tokenizer, rows, "plain", max_length=max_length, max_prompt_length=max_length // 2
    )
    steps = [
        pairs[i : i + pairs_per_step]
        for i in range(0, len(pairs) - pairs_per_step + 1, pairs_per_step)
    ]
    rows_of = lambda step: [
        len(p["prompt_ids"]) + len(p[k]) for p in step for k in ("chosen_ids", "rejected_ids")
    ]  # noqa: E731
    mean = lambda f: statistics.mean(f(s) for s in steps)  # noqa: E731
    return {
        "padded": mean(lambda s: len(rows_of(s)) * max(rows_of(s))),
        "real": mean(lambda s: sum(rows_of(s))),
        "packed": mean(
            lambda s: sum(
                len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in s
            )
        ),
    }


# ------------------------------------------------------------------- the trainers, one process each


def ours_command(
    job: Path, out: Path, weighting: str, steps: int, device: str, root: Path = ROOT
) -> list:
    # An earlier revision (--padded-from) predates --device: it picks CUDA when there is one.
    device_flag = ["--device", device] if root == ROOT else []
    return [
        sys.executable,
        str(root / "train.py"),
        *device_flag,
        "--weights",
        str(job),
        "--template",
        "plain",
        "--data",
        str(job / "pairs.jsonl"),
        "--eval-pairs",
        "0",
        "--weighting",
        weighting,
        "--batch-size",
        "2",
        "--micro-batch-size",
        "2",
        "--lr",
        "5e-7",
        "--beta",
        "0.1",
        "--max-steps",
        str(steps),
        "--max-length",
        "1024",
        "--dtype",
        "float32",
        "--save-every",
        "0",
        "--out",
        str(out),
        "--quiet",
    ]


def source_at(rev: str, out: Path) -> Path:
    """This repository's files at a revision, in out/source-REV (git archive), to run the trainer as
    it was."""
    where = out / f"source-{rev}"
    if not where.exists():
        where.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    return where


def ours_step_times(out: Path) -> list:
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return [r["tokens"] / r["tokens_per_s"] for r in rows]


def trl_child(job: Path, out: Path, steps: int, checkpointing: bool, device: str) -> None:
    """TRL's DPOTrainer on the same checkpoint and pairs; its step times to out/steps.json."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)

    torch.manual_seed(0)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(job))
    model = AutoModelForCausalLM.from_pretrained(str(job), dtype=torch.float32)
    pairs = Dataset.from_list([json.loads(line) for line in open(job / "pairs.jsonl")])
    config = DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        learning_rate=5e-7,
        beta=0.1,
        max_steps=steps,
        max_length=1024,
        bf16=False,
        use_cpu=device == "cpu",
        gradient_checkpointing=checkpointing,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        seed=0,
    )
    times = StepTimes()
    DPOTrainer(
        model=model, args=config, train_dataset=pairs, processing_class=tokenizer, callbacks=[times]
    ).train()
    (out / "steps.json").write_text(json.dumps(times.times))


def trl_command(job: Path, out: Path, steps: int, checkpointing: bool, device: str) -> list:
    return [
        sys.executable,
        __file__,
        "--child-trl",
        str(job),
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--device",
        device,
    ] + (["--trl-checkpointing"] if checkpointing else [])


def run_child(command: list, threads: int) -> int:
    """Run a trainer; returns its peak resident set in bytes (Linux reports ru_maxrss in KiB)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{output[-3000:]}")
    return usage.ru_maxrss * 1024


# ----------------------------------------------------------------------------- the table


def trainers(args) -> dict:
    """name -> (command maker, step-time reader) for every trainer this run compares."""
    flags = shlex.split(args.ours_flags)
    name = "ours" + (f" {args.ours_flags}" if flags else "")
    out = {
        f"{name}, DPO": (
            lambda o: ours_command(args.job, o, "none", args.steps, args.device) + flags,
            ours_step_times,
        ),
        f"{name}, AAO": (
            lambda o: ours_command(args.job, o, "aao", args.steps, args.device) + flags,
            ours_step_times,
        ),
    }
    if args.dpo_only:
        del out[f"{name}, AAO"]
    if args.padded_from:
        old = source_at(args.padded_from, args.out)
        out[f"padded ({args.padded_from}), DPO"] = (
            lambda o: ours_command(args.job, o, "none", args.steps, args.device, old),
            ours_step_times,
        )
        if not args.dpo_only:
            out[f"padded ({args.padded_from}), AAO"] = (
                lambda o: ours_command(args.job, o, "aao", args.steps, args.device, old),
                ours_step_times,
            )
    if args.trl:
        read = lambda o: json.loads((o / "steps.json").read_text())  # noqa: E731
        out["TRL 1.16 DPO"] = (
            lambda o: trl_command(args.job, o, args.steps, False, args.device),
            read,
        )
        if args.trl_keep_freed:
            # TRL under the allocator setting this trainer makes on a CPU (train.keep_freed_memory)
            keep = ["env", "MALLOC_MMAP_MAX_=0", f"MALLOC_TRIM_THRESHOLD_={2**31 - 1}"]
            out["TRL 1.16 DPO, MALLOC_MMAP_MAX_=0"] = (
                lambda o: keep + trl_command(args.job, o, args.steps, False, args.device),
                read,
            )
        if not args.no_trl_checkpointing:
            out["TRL 1.16 DPO, grad. checkpointing"] = (
                lambda o: trl_command(args.job, o, args.steps, True, args.device),
                read,
            )
    return out


def measure(args) -> dict:
    """name -> {"step_s": [median per round], "rss": [bytes per round]}, the trainers in alternating
    order."""
    results = {name: {"step_s": [], "rss": []} for name in trainers(args)}
    for r in range(args.rounds):
        names = list(results) if r % 2 == 0 else list(results)[::-1]
        for name in names:
            make, read = trainers(args)[name]
            out = args.out / f"round{r}" / name.replace(" ", "_").replace(",", "").replace(".", "")
            if out.exists():
                subprocess.run(["rm", "-rf", str(out)], check=True)
            rss = run_child(make(out), args.threads)
            times = read(out)
            results[name]["step_s"].append(
                statistics.median(times[1:] if len(times) > 1 else times)
            )
            results[name]["rss"].append(rss)
            print(
                f"round {r}: {name}: step {results[name]['step_s'][-1]:.2f} s, "
                f"peak RSS {rss / 2**30:.2f} GiB",
                flush=True,
            )
    return results


def table(results: dict, tokens: dict) -> str:
    base = "TRL 1.16 DPO" if "TRL 1.16 DPO" in results else next(iter(results))  # ours, DPO
    t0, m0 = (statistics.median(results[base][k]) for k in ("step_s", "rss"))
    lines = [
        "| tokens through the layers per step | computed | real (prompt twice) "
        "| prompt once + answers |",
        "|---|---|---|---|",
    ]
    for name, computed in (
        ("padded rows (TRL, the padded trainer)", tokens["padded"]),
        ("packed (ours)", tokens["packed"]),
    ):
        lines.append(
            f"| {name} | {computed:.0f} ({computed / tokens['packed']:.2f}x) "
            f"| {tokens['real']:.0f} | {tokens['packed']:.0f} |"
        )
    lines += [
        "",
        f"| trainer | step time, median | vs {base} | peak RSS | vs {base} |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        t, m = statistics.median(r["step_s"]), statistics.median(r["rss"])
        lines.append(
            f"| {name} | {t:.2f} s | {t / t0:.2f}x | {m / 2**30:.2f} GiB | {m / m0:.2f}x |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--trl", action="store_true", help="also run TRL's DPOTrainer (needs trl==1.16.0)"
    )
    p.add_argument(
        "--steps", type=int, default=6, help="optimizer steps per trainer and round (default: 6)"
    )
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (default: 2)")
    p.add_argument("--pairs", type=int, default=80)
    p.add_argument("--prompt-tokens", type=int, default=120)
    p.add_argument("--answer-tokens", type=int, default=250)
    p.add_argument("--vocab", type=int, default=128256, help="Llama 3's vocabulary (default)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where both trainers run, in fp32 (default: auto = cuda when there is one); "
        "the memory column is the host's peak RSS either way",
    )
    p.add_argument(
        "--spread",
        choices=["fixed", "ultrafeedback"],
        default="fixed",
        help="fixed: --prompt-tokens / --answer-tokens; ultrafeedback: drawn like UltraFeedback's",
    )
    p.add_argument(
        "--length-scale", type=float, default=1.0, help="ultrafeedback lengths and cuts x this"
    )
    p.add_argument(
        "--shape",
        choices=["small", "smollm2"],
        default="small",
        help="small: --vocab --dim --layers",
    )
    p.add_argument(
        "--weights", help="a Hugging Face directory whose config and weights the job uses"
    )
    p.add_argument(
        "--padded-from", help="also run train.py as it was at this git revision (padded batches)"
    )
    p.add_argument(
        "--no-trl-checkpointing", action="store_true", help="with --trl, skip its checkpointing run"
    )
    p.add_argument(
        "--ours-flags",
        default="",
        help="train.py flags for this trainer's runs: --ours-flags=--compile, or several in "
        'quotes, "--compile --activation-checkpointing selective" (the first step, in '
        "metrics.jsonl, pays the compile)",
    )
    p.add_argument("--dpo-only", action="store_true", help="skip the AAO runs")
    p.add_argument("--out", type=Path, default=ROOT / "out" / "benchmark")
    p.add_argument("--child-trl", type=Path, help=argparse.SUPPRESS)
    p.add_argument(
        "--trl-keep-freed",
        action="store_true",
        help="with --trl, also run TRL with glibc keeping freed memory, as this trainer does",
    )
    p.add_argument("--trl-checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "auto":  # decided once here, so that every child runs where the first did
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child_trl:
        trl_child(args.child_trl, args.out, args.steps, args.trl_checkpointing, args.device)
        return 0
    args.job = args.out / "job"
    write_job(args.job, args)
    results = measure(args)
    report = table(results, tokens_per_step(args.job, 1024))
    print(report)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "table.md").write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
