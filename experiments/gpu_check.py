"""One GPU, measured: step time, tokens/s, MFU and peak memory of train.py's step on Llama-shaped
models with random weights, beside the memory experiments/scale_estimate.py predicts for the same
shape, and TRL's DPOTrainer on the same job when trl is installed.

    python experiments/gpu_check.py                  # ~5 minutes on one H100/H200: a Markdown table
    python experiments/gpu_check.py --quick          # ~1 minute: Llama-3.2-1B's shape, 8 pairs
    python experiments/gpu_check.py --compile both   # each setting eager and with compiled blocks
    python experiments/gpu_check.py --profile        # one step under torch.profiler: top kernels

The job: UltraFeedback-like pairs (a ~165-token prompt, two ~300-token answers), the policy and a
live bf16 reference, fp32 master weights, bf16 compute, FSDP2 on one GPU, AdamW, one micro-batch a
step (batch = micro-batch), DPO (--weighting none) and AAO. The models: Llama-3.2-1B's shape at 1 to
16 pairs a micro-batch, and Llama-3.1-8B's shape with as many of its 32 layers as the prediction
says fit in --memory-share of the GPU (the whole 8B and its AdamW state do not fit one GPU). Time:
the median of the steps after the first (after the first two with compiled blocks).
"""

import argparse
import copy
import dataclasses
import gc
import json
import random
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import benchmark  # noqa: E402
import scale_estimate  # noqa: E402

import aao  # noqa: E402
import data  # noqa: E402
import model as M  # noqa: E402
import train  # noqa: E402

# Llama-3.2-1B's config.json, without its rope scaling (no effect on time or memory)
LLAMA32_1B = M.ModelConfig(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128_256,
    tie_word_embeddings=True,
    rope_theta=500_000.0,
)
LLAMA31_8B = scale_estimate.LLAMA31_8B
PROMPT_TOKENS, ANSWER_TOKENS = 165, 300


def with_layers(cfg: M.ModelConfig, layers: int) -> M.ModelConfig:
    return M.ModelConfig(**{**cfg.__dict__, "num_hidden_layers": layers})


def predicted_bytes(cfg: M.ModelConfig, micro: int, checkpointing: bool) -> float:
    """scale_estimate's memory on one GPU (no sharding) for sequences of this job's length."""
    seq = PROMPT_TOKENS + ANSWER_TOKENS
    shapes = scale_estimate.Llama(cfg)
    return scale_estimate.memory_per_gpu(shapes, 1, micro, checkpointing, True, seq)


def layers_that_fit(cfg: M.ModelConfig, budget_bytes: float, settings: list) -> int:
    """The most layers (up to the config's) whose predicted memory stays within the budget for every
    (micro-batch, activation checkpointing) setting; 0 if not even one layer does."""
    fits = lambda n: all(predicted_bytes(with_layers(cfg, n), *s) <= budget_bytes for s in settings)
    return max((n for n in range(1, cfg.num_hidden_layers + 1) if fits(n)), default=0)


def job_rows(n: int, tokenizer, seed: int = 0) -> list:
    """n text pairs (benchmark.py's: answers that share most sentences), for both trainers."""
    rng = random.Random(seed)
    return [
        benchmark.benchmark_pair(rng, tokenizer, PROMPT_TOKENS, ANSWER_TOKENS) for _ in range(n)
    ]


def job_pairs(tokenizer, rows: list) -> list:
    """The text pairs tokenized as train.py tokenizes them (the tiny preset's plain template)."""
    where = [(f"job:{i}", row) for i, row in enumerate(rows)]
    return data.tokenize_rows(tokenizer, where, "plain", 1024, 512, keep_identical=True)[0]


def random_reader(cfg: M.ModelConfig, device):
    """read(name, start, stop) for model.build_sharded: N(0, 0.02) matrices and unit norms, made
    on the device, seeded by the parameter's name so that policy and reference start equal."""
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in M.Transformer(cfg).named_parameters()}

    def read(name, start, stop):
        if name.endswith("norm.weight"):
            return torch.ones(shapes[name], device=device)[start:stop]
        g = torch.Generator(device).manual_seed(zlib.crc32(name.encode()))
        return (torch.randn(shapes[name], generator=g, device=device) * 0.02)[start:stop]

    return read


@dataclasses.dataclass
class Setting:
    """What one measurement trains: the model's shape, pairs a micro-batch, the objective's token
    weighting (none: DPO, aao: AAO), activation checkpointing, compiled blocks."""

    cfg: M.ModelConfig
    micro: int
    weighting: str = "none"
    checkpointing: bool = False
    compiled: bool = False


def build_step(setting: Setting, pairs, device, mesh):
    """train.py's models, objective and optimizer for the job; -> step(s), which runs step s (its
    pairs s·micro to (s+1)·micro) and returns its metrics."""
    cfg, micro, weighting = setting.cfg, setting.micro, setting.weighting
    checkpointing, compiled = setting.checkpointing, setting.compiled
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    read = random_reader(cfg, device)
    options = {"checkpointing": checkpointing, "compile_blocks": compiled}
    policy = M.build_sharded(cfg, read, mesh, torch.float32, dtype, **options)
    reference = M.build_sharded(
        cfg, read, mesh, dtype, dtype, trainable=False, compile_blocks=compiled
    )
    thresholds = aao.ThresholdMLP(cfg.vocab_size).to(device) if weighting == "aao" else None
    objective = aao.Objective(weighting=weighting)
    run = train.Run(policy, reference, thresholds, objective, pairs, [], device, mesh, micro)
    optimizer = train.make_optimizer(policy, thresholds, 5e-7, 2e-5, 0.0)

    def step(s: int) -> dict:
        indices = [i % len(pairs) for i in range(s * micro, (s + 1) * micro)]
        return train.train_step(run, optimizer, indices, s, micro, 1.0, False, count_flops=True)

    return step


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_ours(setting: Setting, pairs, device, mesh, steps: int) -> dict:
    """train.train_step in one process (train.setup_distributed's device and mesh): median step
    time, tokens/s, MFU, peak memory. The models are built here and freed before returning."""
    step = build_step(setting, pairs, device, mesh)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, rows = [], []
    for s in range(steps):
        t0 = time.perf_counter()
        rows.append(step(s))
        synchronize(device)
        seconds.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del step
    train.free_memory(device)
    # the first step is warm-up (the first two when compiled: the second packing recompiles once)
    warmup = min(steps - 1, 2 if setting.compiled else 1)
    timed = range(warmup, steps)
    step_s = statistics.median(seconds[i] for i in timed)
    tokens = statistics.mean(rows[i]["tokens"] for i in timed)
    flops = statistics.mean(rows[i]["flops"] for i in timed)
    peak_flops = M.peak_flops(device)
    return {
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "loss": rows[-1]["loss"],
        "mfu": flops / step_s / peak_flops if peak_flops else None,
        "peak_bytes": peak,
    }


def profile_step(step, device, warmup: int = 3, rows: int = 25) -> str:
    """One step under torch.profiler after `warmup` steps: its wall time, the device's kernel time,
    and the top operators and kernels by the device's own time (the CPU's on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    for s in range(warmup):
        step(s)
    synchronize(device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        step(warmup)
        synchronize(device)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    busy = sum(getattr(e, key) for e in events) / 1e6
    where = "GPU kernel" if cuda else "CPU operator"
    head = f"one profiled step: {wall:.3f} s wall, {busy:.3f} s of {where} time"
    return head + "\n" + events.table(sort_by=key, row_limit=rows, max_name_column_width=70)


def measure_trl(cfg, rows: list, micro: int, checkpointing: bool, device, steps: int) -> dict:
    """TRL's DPOTrainer (its defaults: an fp32 model under bf16 autocast, a reference copied from
    it) on the same text pairs, shape and micro-batch: median step time and peak memory."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.seconds, self.t0 = [], None

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.seconds.append(time.perf_counter() - self.t0)

    hf_config = LlamaConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        vocab_size=cfg.vocab_size,
        tie_word_embeddings=cfg.tie_word_embeddings,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(hf_config)
    reference = copy.deepcopy(model)  # TRL loads it by the model's name, which this one lacks
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=data.tiny_tokenizer(),
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|end_of_text|>",
    )
    times = StepTimes()
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out,
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=1,
            learning_rate=5e-7,
            beta=0.1,
            max_steps=steps,
            max_length=1024,
            bf16=device.type == "cuda",
            use_cpu=device.type == "cpu",
            gradient_checkpointing=checkpointing,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            dataloader_num_workers=0,
            seed=0,
        )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer = DPOTrainer(
            model=model,
            ref_model=reference,
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[times],
        )
        trainer.train()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del trainer, model, reference
    train.free_memory(device)
    return {"step_s": statistics.median(times.seconds[1:] or times.seconds), "peak_bytes": peak}


SMALL_MICROS, QUICK_MICROS = (1, 2, 4, 8, 16), (8,)  # Llama-3.2-1B: pairs a micro-batch
BIG_SETTINGS = [(1, False), (2, False), (4, True)]  # Llama-3.1-8B: (pairs, act. checkpointing)


def plan(quick: bool, gpu_bytes: float, share: float) -> list:
    """(name, config, micro-batch, activation checkpointing) of every measurement."""
    micros = QUICK_MICROS if quick else SMALL_MICROS
    small = [("Llama-3.2-1B", LLAMA32_1B, micro, False) for micro in micros]
    if quick:
        return small
    layers = layers_that_fit(LLAMA31_8B, share * gpu_bytes, BIG_SETTINGS)
    big = with_layers(LLAMA31_8B, layers)
    name = f"Llama-3.1-8B, {layers} of 32 layers"
    return small + [(name, big, micro, ac) for micro, ac in BIG_SETTINGS if layers]


def table(results: list, device_name: str) -> str:
    gb = lambda b: f"{b / 1e9:.1f} GB" if b is not None else "-"
    lines = [
        f"Measured on one {device_name}, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}; "
        f"pairs of {PROMPT_TOKENS}-token prompts and {ANSWER_TOKENS}-token answers, random "
        "weights.",
        "",
        "| model | trainer | micro-batch (pairs) | act. ckpt | compiled | step | tokens/s | MFU "
        "| peak memory | predicted |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        head = f"| {r['model']} | {r['trainer']} | {r['micro']} | {r['ckpt']} | {r['compiled']} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} | | | | {gb(r['predicted'])} |")
            continue
        mfu = f"{100 * r['mfu']:.0f}%" if r.get("mfu") else "-"
        tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
        lines.append(
            f"{head} {r['step_s']:.3f} s | {tps} | {mfu} | {gb(r['peak_bytes'])} | "
            f"{gb(r['predicted'])} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="Llama-3.2-1B's shape at 8 pairs only, and TRL at 8 (about a minute; 3 with "
        "--compile both)",
    )
    p.add_argument(
        "--compile",
        default="off",
        choices=["off", "on", "both"],
        help="the policy's blocks torch.compile'd (model.build_sharded's compile_blocks): off, "
        "on, or both, each setting measured twice (default: off)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="instead of the table: one step of Llama-3.2-1B's shape at --profile-micro pairs "
        "(DPO) under torch.profiler, its top kernels by GPU time",
    )
    p.add_argument("--profile-micro", type=int, default=8, help="pairs in the profiled step")
    p.add_argument(
        "--steps", type=int, default=4, help="steps per measurement, the first untimed (default: 4)"
    )
    p.add_argument(
        "--memory-share",
        type=float,
        default=0.8,
        help="the share of the GPU's memory the 8B-shaped model's predicted peak may "
        "fill (default: 0.8)",
    )
    p.add_argument("--no-trl", action="store_true", help="skip TRL's DPOTrainer even if installed")
    p.add_argument(
        "--out", type=Path, default=ROOT / "out" / "gpu_check", help="results.json and table.md"
    )
    return p.parse_args(argv)


def compile_choices(compile: str) -> list:
    """--compile -> the compiled values to measure."""
    return {"off": [False], "on": [True], "both": [False, True]}[compile]


def main(argv=None) -> int:
    args = parse_args(argv)
    compiled = compile_choices(args.compile)
    if not torch.cuda.is_available():
        print(
            "error: gpu_check.py measures one CUDA GPU, and torch sees none here", file=sys.stderr
        )
        return 1
    device, mesh = train.setup_distributed(1, 10, "cuda")
    name = torch.cuda.get_device_name(device)
    print(f"torch {torch.__version__}, {name}, {expandable_segments(device)}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = data.tiny_tokenizer()
    if args.profile:
        pairs = job_pairs(tokenizer, job_rows(args.profile_micro * 5, tokenizer))
        for c in compiled:
            step = build_step(
                Setting(LLAMA32_1B, args.profile_micro, compiled=c), pairs, device, mesh
            )
            report = profile_step(step, device)
            print(f"compiled: {c}\n{report}", flush=True)
            (args.out / f"profile{'-compiled' if c else ''}.txt").write_text(report + "\n")
            del step
            train.free_memory(device)
        return 0
    micros = QUICK_MICROS if args.quick else SMALL_MICROS
    rows = job_rows(max(micros) * args.steps, tokenizer)
    pairs = job_pairs(tokenizer, rows)
    results = measure_all(args, compiled, pairs, device, mesh)
    # TRL's Trainer would read a process group that exists as a distributed launch
    torch.distributed.destroy_process_group()
    if not args.no_trl and trl_installed():
        for micro in QUICK_MICROS if args.quick else (2, 8):
            row = {"model": "Llama-3.2-1B", "trainer": "TRL 1.16 DPO", "micro": micro}
            row |= {"ckpt": "no", "compiled": "no", "predicted": None}
            measure = (LLAMA32_1B, rows, micro, False, device, args.steps)
            results.append(row | out_of_memory_as_error(measure_trl, *measure))
            save(results, args.out)
    print(table(results, torch.cuda.get_device_name()))
    return 0


def save(results: list, out: Path) -> None:
    """The newest row on stdout; every row so far in results.json and table.md, so that a run cut
    short by a time limit leaves what it measured."""
    print(json.dumps(results[-1]), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(table(results, torch.cuda.get_device_name()) + "\n")


def expandable_segments(device) -> str:
    """Whether the CUDA allocator took train.setup_distributed's expandable_segments (a private
    field of its snapshot, read where this torch has it)."""
    torch.empty(1, device=device)  # the allocator starts with the first allocation
    try:
        value = torch.cuda.memory._snapshot()["allocator_settings"]["expandable_segments"]
    except (AttributeError, KeyError, RuntimeError, TypeError):
        value = "unknown"
    return f"expandable_segments: {value}"


def measure_all(args, compiled: list, pairs: list, device, mesh) -> list:
    """Our step at every setting of the plan, DPO and AAO, eager and/or compiled: one row each."""
    results = []
    gpu_bytes = torch.cuda.get_device_properties(device).total_memory
    for name, cfg, micro, ckpt in plan(args.quick, gpu_bytes, args.memory_share):
        for c in compiled:
            for weighting, trainer in (("none", "ours, DPO"), ("aao", "ours, AAO")):
                row = {"model": name, "trainer": trainer, "micro": micro}
                row |= {"ckpt": "yes" if ckpt else "no", "compiled": "yes" if c else "no"}
                row["predicted"] = predicted_bytes(cfg, micro, ckpt)
                setting = Setting(cfg, micro, weighting, ckpt, c)
                measure = (setting, pairs, device, mesh, args.steps)
                results.append(row | out_of_memory_as_error(measure_ours, *measure))
                save(results, args.out)
    return results


def out_of_memory_as_error(measure, *args) -> dict:
    """A measurement, or {"error": ...} when the GPU ran out of memory: the table says so."""
    try:
        return measure(*args)
    except torch.cuda.OutOfMemoryError:
        gc.collect()
        torch.cuda.empty_cache()
        return {"error": "out of memory"}


def trl_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("trl", "datasets"))


if __name__ == "__main__":
    sys.exit(main())
