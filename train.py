r"""Train a policy with AAO (or DPO, IPO, cDPO, hinge, SimPO, TIS-DPO), and the SFT stage first.

    python train.py                  # tiny Llama, synthetic pairs, AAO: a minute on a laptop CPU
    python train.py --loss sft --weights llama31-8b --data ultrachat/train_sft.jsonl --out out/sft
    torchrun --nproc_per_node 8 train.py --weights out/sft/final \
        --data ultrafeedback/train_prefs.jsonl
    python train.py --resume out/run # continue a run from its last checkpoint

One process without torchrun, N with it. N processes shard the model with FSDP2
(model.build_sharded): fp32 master weights, bf16 compute on CUDA, fp32 gradient reduction, NCCL on
CUDA, gloo on CPU; one process with nothing to cast (fp32 on a CPU) trains a plain module. The file
follows a run: arguments, processes, data, models, the objective on a micro-batch (aao.py's
equations), the optimizer, the step, the loop, evaluation, checkpoints, the reference cache,
preemption, the token-weight page, and `python train.py answers` for AlpacaEval.
"""

import argparse
import contextlib
import ctypes
import ctypes.util
import dataclasses
import gc
import html
import json
import math
import os
import shutil
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import aao
import data
import model as M


class TrainingError(RuntimeError):
    """A run that must stop (non-finite loss, nothing to resume, ...); says where and why."""


# ----------------------------------------------------------------------------- arguments

# Defaults that depend on the stage (preference or sft) and on the model that is loaded: the plain
# columns for a real checkpoint, /scratch for the tiny model and any model of its size (under
# SCRATCH_PARAMETERS), which trains from scratch on the synthetic set and needs learning rates
# thousands of times larger. Sources: the paper (preference: lr 5e-7, batch 16, one epoch);
# Zephyr's recipes, which the paper's base setting follows (SFT: lr 2e-5, batch 128, 2,048 tokens;
# preference: 1,024 / 512 tokens); scratch: measured here.
COLUMNS = ("preference", "sft", "preference/scratch", "sft/scratch")
DEFAULTS = {  # option: its default in each of COLUMNS
    "lr": (5e-7, 2e-5, 3e-3, 3e-3),
    "threshold_lr": (2e-5, None, 3e-4, None),
    "batch_size": (16, 128, 16, 16),
    "micro_batch_size": (2, 4, 16, 16),
    "epochs": (1.0, 1.0, 2.0, 2.0),
    "max_length": (1024, 2048, 128, 128),
    "max_prompt_length": (512, None, 64, None),
    "eval_every": (200, 200, 100, 100),
    "save_every": (500, 500, 0, 0),
    "out": ("out/run", "out/sft", "out/aao-tiny", "out/sft-tiny"),
}
SCRATCH_PARAMETERS = 20e6


def default_help(key: str, text: str) -> str:
    preference, sft, preference_scratch, sft_scratch = DEFAULTS[key]
    return (
        f"{text} (default: {preference} preference, {sft} sft; a model under "
        f"{SCRATCH_PARAMETERS / 1e6:.0f}M parameters, such as tiny: {preference_scratch} / "
        f"{sft_scratch})"
    )


def defaults_column(args) -> str:
    """Which defaults apply: the stage, and /scratch for a model the size of the tiny one (read from
    the config.json of the weights the run loads: a tiny SFT's final/ keeps the tiny defaults)."""
    stage = "sft" if args.loss == "sft" else "preference"
    if args.weights == "tiny":
        return stage + "/scratch"
    parameters = M.parameter_counts(M.read_config(M.resolve_weights(args.weights)))[2]
    return stage + ("/scratch" if parameters < SCRATCH_PARAMETERS else "")


EVAL_PAIRS = 256  # held out by default, at most a tenth of the data (held_out_count)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = p.add_argument_group("model and data").add_argument
    g(
        "--weights",
        default="tiny",
        help="a Hugging Face directory, or a preset: "
        + ", ".join(M.PRESETS)
        + " (weights/<preset> or $AAO_WEIGHTS_DIR/<preset>; default: tiny, built in)",
    )
    g(
        "--data",
        default="synthetic",
        help="JSON lines, a JSON array or parquet: preference pairs, or for --loss sft "
        "conversations / prompt-completion rows; 'synthetic' for the built-in set (default)",
    )
    g(
        "--eval-data",
        help="held-out rows (default: --eval-pairs rows of --data, or the synthetic held-out set)",
    )
    g(
        "--eval-pairs",
        type=int,
        help="rows of --data held out when there is no --eval-data, at most a tenth of them "
        f"(more is refused); 0: no held-out set (default: {EVAL_PAIRS}, or a tenth of the data)",
    )
    g(
        "--template",
        choices=sorted(data.TEMPLATES),
        help="a built-in chat template instead of the checkpoint's own (default: the "
        "checkpoint's Jinja chat_template; a preset's own; else an error)",
    )
    g(
        "--max-length",
        type=int,
        help=default_help("max_length", "tokens per sequence, prompt included"),
    )
    g(
        "--max-prompt-length",
        type=int,
        help=default_help("max_prompt_length", "prompt tokens, cut from the left"),
    )
    g(
        "--keep-identical",
        action="store_true",
        help="keep pairs whose two answers are identical (default: drop)",
    )
    g(
        "--swap-pairs",
        action="store_true",
        help="swap the chosen and rejected answer of every pair (training and held-out): DPO on "
        "the reversed data, TIS-DPO's negative model",
    )
    g = p.add_argument_group("objective (the paper's path)").add_argument
    g(
        "--loss",
        default="dpo",
        choices=["dpo", "ipo", "cdpo", "hinge", "simpo", "kto", "tdpo1", "tdpo2", "sft"],
        help="the pairwise loss (kto: KTO on each pair's desirable and undesirable answer; tdpo1, "
        "tdpo2: token-level DPO with the sequential KL), or sft for the SFT stage (default: dpo)",
    )
    g(
        "--weighting",
        default="aao",
        choices=["none", "random", "aao", "tis"],
        help="token weights: none (plain), random (DPO-Random, U(0, 2)), aao (Eq. 7-17; default), "
        "tis (TIS-DPO's, from --tis-positive and --tis-negative)",
    )
    g(
        "--beta",
        type=float,
        help="β (default: the loss's own: 0.1 for dpo/ipo/cdpo/hinge/kto/tdpo, 2.0 for simpo)",
    )
    g(
        "--label-smoothing",
        type=float,
        default=0.1,
        help="cdpo's ε, the assumed share of flipped labels (default: 0.1)",
    )
    g(
        "--ipo-sum",
        action="store_true",
        help="IPO on summed log-ratios (default: per-token means, TRL's form)",
    )
    g(
        "--simpo-gamma-beta-ratio",
        type=float,
        default=0.5,
        help="SimPO's γ/β (default: 0.5, Llama-3 base recipe)",
    )
    g(
        "--desirable-weight",
        type=float,
        default=1.0,
        help="KTO's λ_D, the weight of the desirable (chosen) examples' loss (default: 1, TRL's)",
    )
    g(
        "--undesirable-weight",
        type=float,
        default=1.0,
        help="KTO's λ_U, the weight of the undesirable (rejected) examples' loss (default: 1)",
    )
    g(
        "--tdpo-alpha",
        type=float,
        default=0.5,
        help="TDPO2's α on the sequential KL difference (default: 0.5, the authors')",
    )
    g("--alpha", type=float, default=200.0, help="Eq. 17's sharpness α (default: 200, the paper's)")
    g(
        "--lambda-c",
        type=float,
        default=1.0,
        help="Eq. 13: weight of the contrastive suppression loss (default: 1)",
    )
    g(
        "--lambda-r",
        type=float,
        default=1.0,
        help="Eq. 13: weight of the reward enhancement loss (default: 1)",
    )
    g = p.add_argument_group(
        "TIS-DPO's weights (--weighting tis): w = k·exp(μ·clamp(±(log π+ - log π-), L, U))"
    ).add_argument
    g(
        "--tis-positive",
        metavar="DIR",
        help="the positive contrastive model, e.g. a DPO run's final/ on these pairs",
    )
    g(
        "--tis-negative",
        metavar="DIR",
        help="the negative contrastive model, e.g. the final/ of DPO with --swap-pairs",
    )
    g("--tis-mu", type=float, default=1.0, help="μ (default: 1)")
    g("--tis-k", type=float, default=1.0, help="k (default: 1)")
    g(
        "--tis-bounds",
        type=float,
        nargs=2,
        default=[-0.5, 1.5],
        metavar=("L", "U"),
        help="the clamp of ±(log π+ - log π-) (default: -0.5 1.5)",
    )
    g = p.add_argument_group("AAO beyond the paper (this project's research)").add_argument
    g(
        "--similarity",
        default="embedding",
        choices=list(aao.SIMILARITIES),
        help="Eq. 7's S on: embedding (input embeddings, the paper's; default), hidden (the "
        "policy's hidden state after each token, detached), alignment (S = 1 for tokens every "
        "longest common subsequence of the two answers matches)",
    )
    g(
        "--end-token-weight",
        default="aao",
        choices=["aao", "one"],
        help="the answer's last (end-of-answer) token: aao (its Eq. 17 weight, ~0 since both "
        "answers share it; default) or one",
    )
    g(
        "--reward-form",
        default="weighted_mean",
        choices=["weighted_mean", "weighted_sum", "printed"],
        help="Eq. 11: Σ w log π / Σ w (default), Σ w log π, or the printed unweighted Σ log π",
    )
    g = p.add_argument_group("the neighbours: MixDPO and SP2DPO").add_argument
    g(
        "--curriculum",
        default="none",
        choices=["none", "margin"],
        help="MixDPO: order pairs easy -> "
        "hard by score_chosen - score_rejected (default: none, shuffled)",
    )
    g(
        "--sft-below-margin",
        type=float,
        metavar="TAU",
        help="MixDPO: pairs with margin < TAU take the SFT loss",
    )
    g(
        "--sft-below-quantile",
        type=float,
        metavar="Q",
        help="MixDPO: the hardest share Q of the pairs take the SFT loss",
    )
    g(
        "--sft-weight",
        type=float,
        default=1.0,
        help="MixDPO: weight of a routed pair's SFT loss (default: 1)",
    )
    g("--beta-column", metavar="NAME", help="SP2DPO: a per-pair β from this column of the data")
    g(
        "--beta-scale",
        type=float,
        default=1.0,
        help="SP2DPO: the column's β times this (default: 1)",
    )
    g("--beta-min", type=float, help="SP2DPO: clip the per-pair β from below (default: no clip)")
    g("--beta-max", type=float, help="SP2DPO: clip the per-pair β from above (default: no clip)")
    g = p.add_argument_group("optimization").add_argument
    g("--lr", type=float, help=default_help("lr", "AdamW learning rate of the policy"))
    g(
        "--threshold-lr",
        type=float,
        help=default_help("threshold_lr", "learning rate of the threshold MLP (Eq. 8)"),
    )
    g("--weight-decay", type=float, default=0.0, help="AdamW's, never on norms (default: 0)")
    g(
        "--warmup",
        type=float,
        default=0.1,
        help="share of the steps with linear warmup, then cosine to 0 (default: 0.1)",
    )
    g(
        "--batch-size",
        type=int,
        help=default_help("batch_size", "pairs (sft: rows) per optimizer step, all processes"),
    )
    g(
        "--micro-batch-size",
        type=int,
        help=default_help("micro_batch_size", "pairs (sft: rows) per forward, per process"),
    )
    g("--epochs", type=float, help=default_help("epochs", "passes over the training data"))
    g(
        "--max-steps",
        type=int,
        help="stop after this many steps; the cosine schedule ends there too",
    )
    g(
        "--grad-clip",
        type=float,
        default=1.0,
        help="gradient norm clip, policy and threshold MLP apart (default: 1)",
    )
    g(
        "--seed",
        type=int,
        default=0,
        help="data order, held-out split, random weights, threshold MLP (default: 0)",
    )
    g = p.add_argument_group("LoRA: train low-rank adapters on a frozen base").add_argument
    g(
        "--lora-rank",
        type=int,
        help="train LoRA adapters of this rank instead of every weight; the base is frozen, held "
        "in the compute dtype, and is the reference; adapters want a larger --lr than full "
        "fine-tuning's defaults (default: off, full fine-tuning)",
    )
    g(
        "--lora-alpha",
        type=float,
        help="LoRA's alpha: the update is scaled by alpha / rank (default: 2 x rank)",
    )
    g("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input (default: 0)")
    g(
        "--lora-targets",
        default=",".join(M.LORA_TARGETS),
        help="comma-separated names of the projections to adapt (default: all of attention's and "
        "the MLP's: %(default)s)",
    )
    g = p.add_argument_group("devices and distribution").add_argument
    g(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where to train: cuda (NCCL, one GPU per process), cpu (gloo, even on a GPU host) or "
        "auto = cuda when there is one (default: auto)",
    )
    g(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="compute dtype; master "
        "weights stay fp32 (default: auto = bfloat16 on CUDA, float32 on CPU)",
    )
    g(
        "--precompute-ref",
        action="store_true",
        help="compute the reference's log-probs once, then free it",
    )
    g(
        "--reference-placement",
        default="auto",
        choices=["auto", "sharded", "replicated"],
        help="the frozen reference: sharded like the policy (FSDP gathers each block every "
        "micro-batch), replicated (held whole on every rank in the compute dtype), or auto = "
        "replicated on CUDA where it fits beside the policy, else sharded (default: auto)",
    )
    g(
        "--activation-checkpointing",
        nargs="?",
        const="full",
        default="none",
        choices=["none", "full", "selective"],
        help="recompute in backward for less memory: full (the flag alone) keeps each block's "
        "input only; selective keeps its matmul and attention outputs too and recomputes the "
        "elementwise work (default: none)",
    )
    g(
        "--compile",
        action="store_true",
        help="torch.compile each transformer block (inductor; the root and the chunked head stay "
        "eager). Off by default: exact against eager on the CPU, but not yet measured faster on a "
        "GPU; the first steps pay the compile",
    )
    g(
        "--replicate",
        type=int,
        default=1,
        help="HSDP: shard within groups of world/R processes (a "
        "node), replicate across R groups (default: 1, shard over all)",
    )
    g(
        "--dist-timeout",
        type=float,
        default=60,
        help="minutes a collective may wait, e.g. for a checkpoint write (default: 60)",
    )
    g = p.add_argument_group("checkpoints").add_argument
    g("--out", help=default_help("out", "output directory"))
    g(
        "--resume",
        metavar="OUT",
        help="continue the run in OUT from its last step-N/ checkpoint, with "
        "the same number of processes; the saved flags apply, and flags given now override them",
    )
    g(
        "--save-every",
        type=int,
        help=default_help("save_every", "steps between step-N/ checkpoints; 0: none"),
    )
    g(
        "--keep-last",
        type=int,
        default=2,
        help="step-N/ checkpoints kept; older ones are deleted (default: 2)",
    )
    g(
        "--save-dtype",
        default="bfloat16",
        choices=["bfloat16", "float32"],
        help="dtype of final/'s weights (default: bfloat16)",
    )
    g = p.add_argument_group("logging").add_argument
    g(
        "--eval-every",
        type=int,
        help=default_help("eval_every", "steps between held-out evaluations"),
    )
    g(
        "--tensorboard",
        action="store_true",
        help="also log to <out>/tensorboard (needs the tensorboard package)",
    )
    g("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.resume:  # the saved run's flags are the defaults; flags given now override them
        saved = Path(args.resume) / "args.json"
        if not saved.is_file():
            raise TrainingError(
                f"--resume {args.resume}: no run there ({saved} not found); start one with "
                f"--out {args.resume}"
            )
        saved_args = {**json.loads(saved.read_text()), "resume": args.resume}
        args = p.parse_args(argv, namespace=argparse.Namespace(**saved_args))
        args.out = args.resume
    column = COLUMNS.index(defaults_column(args))
    micro_given = args.micro_batch_size is not None
    for key, values in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, values[column])
    check_values(args)
    fit_micro_batch(args, micro_given, int(os.environ.get("WORLD_SIZE", 1)))
    check_combinations(args, {key: p.get_default(key) for key in vars(args)})
    check_lora_targets(args.lora_targets)
    return args


POSITIVE, AT_LEAST_0, AT_LEAST_1, SHARE = (
    (lambda v: v > 0, "> 0"),
    (lambda v: v >= 0, ">= 0"),
    (lambda v: v >= 1, ">= 1"),
    (lambda v: 0 <= v <= 1, "in [0, 1]"),
)
LIMITS = {
    "lr": POSITIVE,
    "threshold_lr": POSITIVE,
    "beta": POSITIVE,
    "alpha": POSITIVE,
    "epochs": POSITIVE,
    "grad_clip": POSITIVE,
    "dist_timeout": POSITIVE,
    "beta_scale": POSITIVE,
    "tis_mu": POSITIVE,
    "tis_k": POSITIVE,
    "weight_decay": AT_LEAST_0,
    "lambda_c": AT_LEAST_0,
    "lambda_r": AT_LEAST_0,
    "sft_weight": AT_LEAST_0,
    "eval_pairs": AT_LEAST_0,
    "save_every": AT_LEAST_0,
    "batch_size": AT_LEAST_1,
    "micro_batch_size": AT_LEAST_1,
    "max_length": AT_LEAST_1,
    "max_prompt_length": AT_LEAST_1,
    "max_steps": AT_LEAST_1,
    "eval_every": AT_LEAST_1,
    "keep_last": AT_LEAST_1,
    "replicate": AT_LEAST_1,
    "warmup": SHARE,
    "sft_below_quantile": SHARE,
    "simpo_gamma_beta_ratio": AT_LEAST_0,
    "beta_min": POSITIVE,
    "desirable_weight": POSITIVE,
    "undesirable_weight": POSITIVE,
    "tdpo_alpha": POSITIVE,
    "beta_max": POSITIVE,
    "label_smoothing": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    "lora_rank": AT_LEAST_1,
    "lora_alpha": POSITIVE,
    "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
}


def check_values(args) -> None:
    """Values argparse's types let through but no run can use, refused by name before loading."""
    for key, (ok, need) in LIMITS.items():
        value = getattr(args, key)
        if value is not None and not (ok(value) and math.isfinite(value)):
            raise TrainingError(f"--{key.replace('_', '-')} {value}: must be {need}")
    if not args.tis_bounds[0] < args.tis_bounds[1] or not all(map(math.isfinite, args.tis_bounds)):
        raise TrainingError(f"--tis-bounds {args.tis_bounds[0]} {args.tis_bounds[1]}: need L < U")
    if args.max_prompt_length is not None and args.max_prompt_length >= args.max_length:
        raise TrainingError(
            f"--max-prompt-length {args.max_prompt_length} leaves no room for an answer in "
            f"--max-length {args.max_length}"
        )


def fit_micro_batch(args, given: bool, world: int) -> None:
    """--batch-size is global (over all processes), --micro-batch-size per process: a process
    trains on batch / world pairs a step, in micro-batches of at most the micro-batch size. A
    micro-batch size larger than that share would never be reached: refused when given, and a
    default one is cut to the share. (A share not divisible by it is fine: the last micro-batch
    of a step is smaller, and the loss is still the mean over the whole batch; the "steps of"
    line says so.)"""
    if args.batch_size % world:
        raise TrainingError(
            f"--batch-size {args.batch_size} must be a multiple of the {world} processes"
        )
    share = args.batch_size // world
    if args.micro_batch_size <= share:
        return
    if not given:
        args.micro_batch_size = share
        return
    larger = f"--micro-batch-size {args.micro_batch_size} is larger than"
    if world == 1:
        larger += f" --batch-size {args.batch_size}: a micro-batch would never hold more than that"
    else:
        larger += (
            f" the {share} items each of the {world} processes trains on a step (--batch-size "
            f"{args.batch_size} is over all processes, --micro-batch-size per process)"
        )
    raise TrainingError(
        f"{larger}; give --micro-batch-size {share} or less, or a larger --batch-size"
    )


def step_layout(args, total: int, world: int) -> str:
    """What a step computes, per process: "8 steps of 7 pairs (micro-batches of 4 + 3)"."""
    share, micro = args.batch_size // world, args.micro_batch_size
    sizes = [len(c) for c in data.micro_batches(list(range(share)), micro)]
    items = "rows" if args.loss == "sft" else "pairs"
    layout = " + ".join(map(str, sizes)) if len(sizes) <= 4 else f"{len(sizes)} x {micro}"
    if len(sizes) > 4 and sizes[-1] != micro:
        layout = f"{len(sizes) - 1} x {micro} + {sizes[-1]}"
    layout = "one micro-batch" if len(sizes) == 1 else f"micro-batches of {layout}"
    step = "step" if total == 1 else "steps"
    if world == 1:
        return f"{total} {step} of {args.batch_size} {items} ({layout})"
    each = f"{share} on each of {world} processes"
    return f"{total} {step} of {args.batch_size} {items}: {each}, {layout}"


def chat_of(args, tokenizer) -> data.Chat:
    """The chat template the weights were trained with, never a silent guess: --template, a preset's
    own, else the checkpoint's (its Jinja chat template, or the built-in this project recorded)."""
    given = args.template or M.PRESETS.get(args.weights, {}).get("template")
    weights = None if args.weights == "tiny" else M.resolve_weights(args.weights)
    return data.load_chat(weights, tokenizer, given)


def pairwise(a) -> bool:
    return a.loss != "sft"


def routes_to_sft(a) -> bool:
    """MixDPO: some pairs take the SFT loss (--sft-below-margin or --sft-below-quantile)."""
    return a.sft_below_margin is not None or a.sft_below_quantile is not None


# Options that mean something in one kind of run only: given another value than their default
# elsewhere, the run would ignore them without a word. option -> (where it means something, test).
ONLY_WITH = {
    **{
        k: ("preference pairs (not --loss sft)", pairwise)
        for k in (
            "weighting",
            "beta",
            "curriculum",
            "sft_below_margin",
            "sft_below_quantile",
            "beta_column",
            "keep_identical",
            "max_prompt_length",
            "swap_pairs",
        )
    },
    "label_smoothing": ("--loss cdpo", lambda a: a.loss == "cdpo"),
    "ipo_sum": ("--loss ipo", lambda a: a.loss == "ipo"),
    "simpo_gamma_beta_ratio": ("--loss simpo", lambda a: a.loss == "simpo"),
    "desirable_weight": ("--loss kto", lambda a: a.loss == "kto"),
    "undesirable_weight": ("--loss kto", lambda a: a.loss == "kto"),
    "tdpo_alpha": ("--loss tdpo2", lambda a: a.loss == "tdpo2"),
    **{
        k: ("--weighting aao", lambda a: pairwise(a) and a.weighting == "aao")
        for k in ("alpha", "lambda_c", "lambda_r", "reward_form", "similarity", "end_token_weight")
    },
    **{
        k: ("--weighting tis", lambda a: pairwise(a) and a.weighting == "tis")
        for k in ("tis_positive", "tis_negative", "tis_mu", "tis_k", "tis_bounds")
    },
    "sft_weight": ("--sft-below-margin or --sft-below-quantile", routes_to_sft),
    **{
        k: ("--beta-column", lambda a: a.beta_column is not None)
        for k in ("beta_scale", "beta_min", "beta_max")
    },
    **{
        k: ("--lora-rank", lambda a: a.lora_rank is not None)
        for k in ("lora_alpha", "lora_dropout", "lora_targets")
    },
    "precompute_ref": (
        "a loss with a reference read on the pairs alone (not sft, simpo, or kto, whose "
        "reference point reads it on answers mismatched within each shuffled micro-batch)",
        lambda a: a.loss not in ("sft", "simpo", "kto"),
    ),
    "reference_placement": (
        "a loss with a reference (not sft or simpo) and no --lora-rank (the base is the reference)",
        lambda a: a.loss not in ("sft", "simpo") and a.lora_rank is None,
    ),
}


def check_combinations(args, defaults: dict) -> None:
    """Flags that contradict each other, or that this run would ignore: refused by name before any
    work. Read from the values (a default means "not given"): a resumed run's saved flags pass."""
    flag = lambda key: "--" + key.replace("_", "-")
    for key, (need, applies) in ONLY_WITH.items():
        if getattr(args, key) != defaults[key] and not applies(args):
            raise TrainingError(
                f"{flag(key)} means something only with {need}: this run would ignore it"
            )
    if pairwise(args) and args.weighting == "tis":
        check_contrastive_flags(args)
    if args.sft_below_margin is not None and args.sft_below_quantile is not None:
        raise TrainingError(
            "--sft-below-margin and --sft-below-quantile both choose MixDPO's "
            "routed pairs: give one"
        )
    if args.beta is not None and args.beta_column:
        raise TrainingError(
            f"--beta {args.beta} beside --beta-column {args.beta_column}: the "
            "column gives every pair its β; scale the column with --beta-scale"
        )
    if args.beta_min is not None and args.beta_max is not None and args.beta_max < args.beta_min:
        raise TrainingError(
            f"--beta-max {args.beta_max} is below --beta-min {args.beta_min}: "
            "every pair's β would be clipped to the wrong bound"
        )
    if args.loss == "kto" and args.micro_batch_size < 2:
        raise TrainingError(
            "--loss kto estimates its reference point from the answers of the other pairs of a "
            "micro-batch: --micro-batch-size must be at least 2"
        )
    if args.eval_data and args.eval_pairs != defaults["eval_pairs"]:
        raise TrainingError(
            "--eval-pairs holds rows of --data out, --eval-data brings its own: give one"
        )


def check_lora_targets(targets: str) -> None:
    unknown = [t for t in targets.split(",") if t not in M.LORA_TARGETS]
    if unknown or not targets:
        raise TrainingError(
            f"--lora-targets {targets}: {', '.join(unknown) or 'empty'} is not a projection of "
            f"the model (choose from {','.join(M.LORA_TARGETS)})"
        )


def lora_of(args) -> M.LoRAConfig | None:
    """--lora-rank and its companions as a LoRAConfig; None for full fine-tuning."""
    if args.lora_rank is None:
        return None
    alpha = 2.0 * args.lora_rank if args.lora_alpha is None else args.lora_alpha
    return M.LoRAConfig(
        args.lora_rank, alpha, args.lora_dropout, tuple(args.lora_targets.split(","))
    )


def check_contrastive_flags(args) -> None:
    """--weighting tis: both contrastive models given, as directories (their tokenizers are checked
    against the policy's when they load)."""
    for flag, path in (
        ("--tis-positive", args.tis_positive),
        ("--tis-negative", args.tis_negative),
    ):
        if path is None:
            raise TrainingError(
                f"--weighting tis needs {flag} DIR: TIS-DPO's weights are the log-prob "
                "differences of a positive and a negative model (see --help)"
            )
        if not Path(path).is_dir():
            raise TrainingError(f"{flag} {path}: no such directory")


# ----------------------------------------------------------------------------- processes, devices


def choose_device(name: str) -> torch.device:
    """--device: cuda:LOCAL_RANK (one GPU per process), or the CPU, also on a host that has GPUs."""
    cuda = torch.cuda.is_available() if name == "auto" else name == "cuda"
    if not cuda:
        return torch.device("cpu")
    local_rank, count = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    if not torch.cuda.is_available():
        raise TrainingError("--device cuda: this machine has no CUDA device that torch can use")
    if local_rank >= count:
        raise TrainingError(
            f"--device cuda: process {local_rank} of this node has no GPU of its "
            f"own ({count} visible): start as many processes per node as GPUs, or "
            "train with --device cpu"
        )
    return torch.device("cuda", local_rank)


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed host memory for the next allocation. It maps every block over
    32 MiB fresh from the OS and unmaps it when freed: the embedding's gradient and the head's logit
    blocks come back each step as new pages, and the first write to each page faults. Measured:
    10-20% of a CPU step at SmolLM2-135M's shape. Same as MALLOC_MMAP_MAX_=0 in the environment.
    Returns False where the C library has no mallopt (musl, macOS): nothing changes there."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
    # No block from mmap; give the heap's top back to the OS only past 2 GiB free.
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


# The CUDA caching allocator's settings a run wants: segments that grow in place, so that
# micro-batches of varying length do not leave the memory in pieces too small to reuse.
CUDA_ALLOCATOR = "expandable_segments:True"


def set_cuda_allocator(environ: dict) -> str:
    """PYTORCH_CUDA_ALLOC_CONF=CUDA_ALLOCATOR in environ unless the user set it (or its newer name
    PYTORCH_ALLOC_CONF): the allocator reads it once, when CUDA first allocates, so this must run
    before. -> what was done, for rank 0 to say."""
    given = [k for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF") if k in environ]
    if given:
        return f"CUDA allocator: {given[0]}={environ[given[0]]} as you set it"
    environ["PYTORCH_CUDA_ALLOC_CONF"] = CUDA_ALLOCATOR
    return f"CUDA allocator: PYTORCH_CUDA_ALLOC_CONF={CUDA_ALLOCATOR} (set it to choose another)"


def setup_distributed(replicate: int, timeout_minutes: float, device_name: str = "auto"):
    """RANK / WORLD_SIZE / LOCAL_RANK from torchrun, or a group of one held in memory. Returns the
    device and the mesh FSDP shards over: 1-D, or with --replicate R a 2-D (replicate, shard) mesh
    (HSDP: shard inside groups of world/R ranks, say a node, replicate across them, so the gathers
    stay in the node)."""
    device = choose_device(device_name)
    cuda = device.type == "cuda"
    if cuda:
        allocator = set_cuda_allocator(os.environ)
        if os.environ.get("RANK", "0") == "0":  # the process group does not exist yet
            print(allocator, flush=True)
        torch.cuda.set_device(device)
    else:
        keep_freed_memory()  # CUDA's caching allocator already does this for the GPU's memory
    # device_id binds the process to its GPU and starts NCCL now; the timeout must outlast the
    # longest wait of one rank for the others (a checkpoint write), or NCCL's default 10 minutes
    # ends the job.
    kw = {
        "backend": "nccl" if cuda else "gloo",
        "timeout": timedelta(minutes=timeout_minutes),
        "device_id": device if cuda else None,
    }
    if "RANK" in os.environ:
        dist.init_process_group(**kw)
    else:
        dist.init_process_group(**kw, store=dist.HashStore(), rank=0, world_size=1)
    world = dist.get_world_size()
    if replicate < 1 or world % replicate:
        raise TrainingError(f"--replicate {replicate} must divide the {world} processes")
    shape, names = ((world,), ("shard",))
    if replicate > 1:
        shape, names = (replicate, world // replicate), ("replicate", "shard")
    # fully_shard gets this mesh: its default one picks CUDA whenever it exists, even for gloo.
    return device, init_device_mesh(device.type, shape, mesh_dim_names=names)


def compute_dtype(name: str, device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def rank0_print(*a):
    if dist.get_rank() == 0:
        print(*a, flush=True)


def check_shared_out(out: Path, device) -> None:
    """Every rank writes its share of each checkpoint into --out and reads all of them on resume: a
    node that does not see the directory would fail at the first checkpoint, hours in. Check now."""
    nonce = torch.randint(1, 2**62, (1,), device=device)
    dist.broadcast(nonce, 0)
    probe = out / f".rank-check-{int(nonce)}"
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        probe.touch()
    dist.barrier()
    seen = [torch.zeros(1, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(seen, torch.tensor([float(probe.exists())], device=device))
    dist.barrier()
    if dist.get_rank() == 0:
        probe.unlink()
    blind = [r for r, s in enumerate(seen) if not s.item()]
    if blind:
        raise TrainingError(
            f"--out {out}: rank(s) {blind} do not see what rank 0 wrote there; put --out on a "
            "file system that every node mounts at the same path"
        )


# ----------------------------------------------------------------------------- data


def load_data(args, tokenizer, chat: data.Chat) -> tuple[list, list]:
    """Tokenized training and held-out items: pairs, or for --loss sft single examples."""
    if args.data == "synthetic":
        train_rows, eval_rows = data.synthetic_rows(args.seed)
    else:
        train_rows, eval_rows = data.read_rows(args.data), []
    if args.eval_data:
        eval_rows = data.read_rows(args.eval_data)
    if args.loss == "sft":
        tokenize = lambda rows: data.sft_examples(tokenizer, rows, chat, args.max_length)
    else:
        options = (args.max_length, args.max_prompt_length, args.keep_identical)
        beta = args.beta_column or "beta"
        tokenize = lambda rows: data.tokenize_rows(tokenizer, rows, chat, *options, beta)
    train, report = tokenize(train_rows)
    if eval_rows:
        heldout = tokenize(eval_rows)[0]
    else:
        train, heldout = data.hold_out(
            train, held_out_count(args.eval_pairs, len(train)), args.seed
        )
    if args.swap_pairs:  # the reversed data: chosen and rejected trade places, margins flip sign
        for p in train + heldout:
            p["chosen_ids"], p["rejected_ids"] = p["rejected_ids"], p["chosen_ids"]
            p["margin"] = None if p["margin"] is None else -p["margin"]
    if args.loss != "sft":
        mixdpo = args.curriculum == "margin" or routes_to_sft(args)
        data.check_pair_columns(train + heldout, args.beta_column, mixdpo)
    drops = {k: v for k, v in report.items() if k not in ("rows", "pairs", "examples") and v}
    dropped = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in drops.items())
    dropped = f" ({dropped})" if dropped else ""
    template = "the checkpoint's chat template" if chat.jinja else f"template {chat.name}"
    rank0_print(
        f"data: {len(train) + len(heldout)} items of {report['rows']} rows{dropped}, "
        f"{len(train)} for training, {len(heldout)} held out, {template}"
    )
    return train, heldout


def held_out_count(given: int | None, n_items: int) -> int:
    """How many of n_items --data items are held out: --eval-pairs, or by default EVAL_PAIRS; at
    most a tenth of them, so that training keeps nine tenths. A value given above that cap would be
    cut without a word: refused instead."""
    cap = n_items // 10
    if given is None:
        return min(EVAL_PAIRS, cap)
    if given > cap:
        raise TrainingError(
            f"--eval-pairs {given}: at most a tenth of the {n_items} items of --data is held out "
            f"({cap}); give --eval-pairs {cap} or less, or a held-out file with --eval-data"
        )
    return given


# ----------------------------------------------------------------------------- models


@dataclasses.dataclass
class Run:
    """What a training run trains with. Items are pairs, or SFT examples when objective is None."""

    policy: M.Transformer  # FSDP-sharded, fp32 master weights (LoRA: fp32 adapters, frozen base)
    # frozen, sharded or replicated (--reference-placement), or under LoRA the policy with its
    # adapters off; None for SFT / SimPO, or once its log-probs are cached
    reference: "M.Transformer | AdaptersOff | None"
    # Eq. 8, replicated on every rank; None unless aao weighting
    thresholds: aao.ThresholdMLP | None
    objective: aao.Objective | None  # None: the SFT stage
    train_items: list
    heldout: list
    device: torch.device
    mesh: object  # the DeviceMesh the models are sharded over
    micro_batch_size: int
    seed: int = 0
    beta_scaling: tuple | None = None  # SP2DPO: (scale, min, max) of the per-pair β column
    mixdpo: bool = False  # MixDPO: pairs marked "routed" take the SFT loss
    ref_train: "ReferenceCache | None" = None  # --precompute-ref
    ref_eval: "ReferenceCache | None" = None
    tis_train: "ReferenceCache | None" = None  # --weighting tis: log π+ - log π- per answer token
    tis_eval: "ReferenceCache | None" = None
    max_length: int = 1024  # KTO cuts its mismatched prompt + answer to it, as the pairs were
    # TDPO: the reference's head weight (vocab, D), gathered once (the reference is frozen)
    reference_head: torch.Tensor | None = None


def build_run(args, device, mesh, tokenizer, train_items, heldout, resume_from) -> Run:
    """Policy, reference, threshold MLP, objective: what a run trains with, beside its data."""
    cfg, read_weights = model_config(args, tokenizer)
    dtype, lora = compute_dtype(args.dtype, device), lora_of(args)
    start = policy_reader(read_weights, resume_from, mesh, cfg, lora, args.seed)
    objective = objective_of(args)
    options = {"checkpointing": args.activation_checkpointing, "compile_blocks": args.compile}
    policy = M.build_sharded(cfg, start, mesh, torch.float32, dtype, lora=lora, **options)
    micro, seed = args.micro_batch_size, args.seed
    run = Run(policy, None, None, objective, train_items, heldout, device, mesh, micro, seed)
    run.max_length = args.max_length
    # Only run holds the frozen reference, so that --precompute-ref can free it.
    if objective is not None and args.loss != "simpo":
        run.reference = build_reference(args, cfg, read_weights, dtype, run, lora)
        if args.loss in aao.TDPO_VARIANTS:  # a collective under FSDP: every rank, once
            head = (policy if lora is not None else run.reference).lm_head.weight  # LoRA: frozen
            run.reference_head = M.full(head).detach()
    if args.beta_column:  # SP2DPO: each pair's β from a column of the data
        run.beta_scaling = (args.beta_scale, args.beta_min, args.beta_max)
    if routes_to_sft(args):
        run.mixdpo = True
        for items in (train_items, heldout):
            mark_routed(items, args.sft_below_margin, args.sft_below_quantile, args.seed)
    if objective is not None and args.weighting == "aao":
        torch.manual_seed(args.seed)  # the same MLP whatever the number of processes
        run.thresholds = aao.ThresholdMLP(cfg.vocab_size).to(device)
    if args.precompute_ref and run.reference is not None:
        cache_reference(run)
    if objective is not None and args.weighting == "tis":
        cache_contrastive(run, args, tokenizer, dtype)
    objective_name = "sft" if objective is None else f"{args.loss} + {args.weighting} weighting"
    rank0_print(
        f"training {trained_parameters(cfg, lora)} with {objective_name} "
        f"on {dist.get_world_size()} x {device.type} ({str(dtype).split('.')[1]})"
    )
    return run


def build_reference(args, cfg, read_weights, dtype, run: Run, lora):
    """The frozen reference: under LoRA the policy with its adapters off (the base, no second copy);
    else a copy of the weights, sharded like the policy or whole on every rank
    (--reference-placement)."""
    if lora is not None:
        return AdaptersOff(run.policy)
    choice = args.reference_placement
    placement = reference_placement(choice, cfg, dtype, run.device, run.policy)
    rank0_print(f"reference: {placement} (--reference-placement {choice})")
    if placement == "replicated":
        return M.build_replicated(cfg, read_weights, dtype, run.device)
    compiled = args.compile  # the reference's blocks are compiled like the policy's
    return M.build_sharded(
        cfg, read_weights, run.mesh, dtype, dtype, trainable=False, compile_blocks=compiled
    )


def trained_parameters(cfg, lora) -> str:
    total = M.parameter_counts(cfg)[2] / 1e6
    if lora is None:
        return f"{total:.1f}M parameters"
    with torch.device("meta"):
        adapted = M.add_adapters(M.Transformer(cfg), lora).named_parameters()
        adapters = sum(p.numel() for n, p in adapted if M.is_adapter(n)) / 1e6
    return f"{adapters:.2f}M LoRA parameters (rank {lora.rank}) on a frozen {total:.1f}M base"


def policy_reader(read_weights, resume_from, mesh, cfg, lora, seed: int):
    """Where the policy's first values come from (model.build_sharded's reader): the weights, or a
    step-N/ train state on resume. LoRA: the base from the weights always, the adapters fresh
    (model.initial_adapters) or from the train state, which holds only them."""
    if lora is None:
        return read_weights if resume_from is None else train_state_reader(resume_from, mesh)
    if resume_from is None:
        return M.initial_adapters(read_weights, cfg, lora, seed)
    saved = train_state_reader(resume_from, mesh)
    return lambda name, s, e: saved(name, s, e) if M.is_adapter(name) else read_weights(name, s, e)


class AdaptersOff:
    """A LoRA run's reference: the policy's forward with its adapters switched off, the frozen
    base itself (TRL's way): no second copy of the weights."""

    def __init__(self, policy):
        self.policy = policy

    def __call__(self, **kw):
        with M.adapters_off(self.policy):
            return self.policy(**kw)


# A replicated reference may fill this share of the device memory left beside the policy's shards
# and what is still to come of their size (gradients, AdamW's two moments); the rest is for
# activations and the gathered blocks.
REPLICATED_REFERENCE_SHARE = 0.5


def reference_placement(choice: str, cfg, dtype, device, policy) -> str:
    """--reference-placement: "sharded" or "replicated". auto: replicated on CUDA when the whole
    reference in dtype fits in REPLICATED_REFERENCE_SHARE of the memory free on every rank beside
    the policy's shards, counted four times (the shards, their gradients, AdamW's moments); on a
    CPU sharded, as the ranks share one host's memory."""
    if choice != "auto" or device.type != "cuda":
        return "sharded" if choice == "auto" else choice
    shards = sum(M.local(p).numel() * M.local(p).element_size() for p in policy.parameters())
    free = torch.cuda.mem_get_info(device)[0] - 3 * shards  # the shards are allocated already
    whole = M.parameter_counts(cfg)[2] * dtype.itemsize
    fits = torch.tensor([float(whole <= REPLICATED_REFERENCE_SHARE * free)], device=device)
    dist.all_reduce(fits, op=dist.ReduceOp.MIN)  # every rank must choose the same
    return "replicated" if fits.item() else "sharded"


def model_config(args, tokenizer):
    """The model's config and model.weight_reader's reader of its weights, checked against the
    tokenizer."""
    weights = M.resolve_weights(args.weights)
    cfg, read_weights = M.weight_reader(weights, tokenizer.get_vocab_size(), args.seed)
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise M.CheckpointError(
            f"{weights}: tokenizer.json has {tokenizer.get_vocab_size()} tokens, "
            f"config.json's vocab_size is {cfg.vocab_size}: they do not belong together"
        )
    return cfg, read_weights


def objective_of(args) -> aao.Objective | None:
    """The pairwise objective the flags ask for (aao.Objective); None for the SFT stage."""
    if args.loss == "sft":
        return None
    objective = aao.Objective(
        loss=args.loss,
        weighting=args.weighting,
        beta=args.beta,
        label_smoothing=args.label_smoothing,
        simpo_gamma_beta_ratio=args.simpo_gamma_beta_ratio,
        ipo_normalized=not args.ipo_sum,
        desirable_weight=args.desirable_weight,
        undesirable_weight=args.undesirable_weight,
        tdpo_alpha=args.tdpo_alpha,
        alpha=args.alpha,
        lambda_c=args.lambda_c,
        lambda_r=args.lambda_r,
        reward_form=args.reward_form,
        similarity=args.similarity,
        end_token_weight=args.end_token_weight,
        sft_weight=args.sft_weight,
        tis_mu=args.tis_mu,
        tis_k=args.tis_k,
        tis_bounds=tuple(args.tis_bounds),
    )
    if args.beta_column and args.loss == "simpo" and args.beta_scale == 1.0:
        rank0_print(
            f"warning: --beta-column {args.beta_column} drives SimPO, whose β (2.0 in its "
            "recipes) is ~20x DPO's: per-pair β made for DPO need a --beta-scale"
        )
    return objective


def cache_reference(run: Run) -> None:
    """--precompute-ref: the reference's log-probs of every pair (for TDPO also its hidden states at
    the answer tokens), computed once; the reference is then freed."""
    micro, device = run.micro_batch_size, run.device
    hidden = run.reference_head is not None  # TDPO: its sequential KL reads the reference's states
    run.ref_train = ReferenceCache.compute(run.reference, run.train_items, micro, device, hidden)
    run.ref_eval = ReferenceCache.compute(run.reference, run.heldout, micro, device, hidden)
    run.reference = None
    M.reshard(run.policy)  # LoRA: the reference was the policy; no backward ran
    free_memory(device)
    n_pairs = len(run.train_items) + len(run.heldout)
    what = "log-probs"
    if hidden:  # every answer token's D numbers, on every process: say how much
        tensors = run.ref_train.hiddens + run.ref_eval.hiddens
        size = sum(t.numel() * t.element_size() for t in tensors) / 2**30
        what = f"log-probs and hidden states ({size:.3g} GiB on every process)"
    rank0_print(f"reference {what} cached for {n_pairs} pairs; reference freed")


def free_memory(device) -> None:
    """Give a freed model's memory back: Python's references, then CUDA's cached blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def cache_contrastive(run: Run, args, tokenizer, dtype) -> None:
    """--weighting tis: TIS-DPO's reward estimate r_t = log π+(y_t) - log π-(y_t) at every answer
    token of every pair, computed once as the reference's log-probs are (ReferenceCache). The
    positive model is loaded, run over the pairs and freed, then the negative one: one model in
    memory at a time, and afterwards two floats per answer token (as --precompute-ref keeps)."""
    both, sets = [], (run.train_items, run.heldout)
    for flag, path in (
        ("--tis-positive", args.tis_positive),
        ("--tis-negative", args.tis_negative),
    ):
        cfg, read = contrastive_model(flag, path, tokenizer, args.seed)
        model = M.build_sharded(cfg, read, run.mesh, dtype, dtype, trainable=False)
        micro, device = run.micro_batch_size, run.device
        both.append([ReferenceCache.compute(model, items, micro, device) for items in sets])
        del model
        free_memory(device)
    # the log-probs' difference is r_t (ReferenceCache.states(batch, "tis").logps); top-1 unread
    positive, negative = both
    run.tis_train, run.tis_eval = (
        ReferenceCache(items, [p - n for p, n in zip(pos.flats, neg.flats)])
        for items, pos, neg in zip(sets, positive, negative)
    )
    n_pairs = len(run.train_items) + len(run.heldout)
    rank0_print(f"TIS-DPO: contrastive log-probs cached for {n_pairs} pairs; both models freed")


def contrastive_model(flag: str, path: str, tokenizer, seed: int):
    """A contrastive model's config and weight reader; it must score the policy's token ids."""
    cfg, read = M.weight_reader(path, tokenizer.get_vocab_size(), seed)
    if M.load_tokenizer(path).get_vocab() != tokenizer.get_vocab():
        raise M.CheckpointError(
            f"{flag} {path}: its tokenizer is not the policy's: the contrastive models must "
            "score the same token ids (train them from the same starting model)"
        )
    return cfg, read


def mark_routed(pairs, tau: float | None, q: float | None, seed: int) -> None:
    """MixDPO: mark each pair ("routed") that takes the SFT loss, once for the whole set: a margin
    below τ, or the hardest q of the pairs (exactly round(q·N) of them, ties broken by the seed)."""
    margins = torch.tensor([p["margin"] for p in pairs], dtype=torch.float64)
    routed = aao.mixdpo_routed(margins, tau) if q is None else aao.mixdpo_hardest(margins, q, seed)
    for pair, r in zip(pairs, routed.tolist()):
        pair["routed"] = r


# ----------------------------------------------------------------------------- the objective


@dataclasses.dataclass
class PairForward:
    """The pairwise objective on a micro-batch, and what evaluation and the weights page read."""

    out: aao.ObjectiveOutput  # per-pair losses, rewards, token weights, a and b
    policy: M.AnswerStates  # the policy's states at the answer tokens
    reference: M.AnswerStates | None  # the reference's log-probs (live or cached); None for SimPO
    batch: dict  # data.micro_batch's tensors: answer_mask, answer_ids, ...
    metrics: dict  # 0-dim tensors, summed over micro-batches by accumulate


def forward_pairs(run: Run, items, indices, step=0, ref_cache=None) -> PairForward:
    """The pairwise objective on a micro-batch: a policy forward, the reference's log-probs (live or
    cached), the thresholds of Eq. 8, then aao.preference_objective."""
    cached = ref_cache.values(indices) if ref_cache is not None else {}
    tis = (
        None
        if run.tis_train is None
        else run.tis_train
        if items is run.train_items
        else run.tis_eval
    )
    if tis is not None:
        cached["tis"] = tis.values(indices)["reference"]
    batch = data.micro_batch(items, indices, False, run.device, cached)
    mask = batch["answer_mask"]
    reference = reference_states(run, batch, ref_cache)
    reference_head = None
    if run.reference_head is not None:  # TDPO: the reference's states that predict each answer
        at = batch["packed"].answer_index
        reference_head = (reference.hidden.flatten(0, 1).index_select(0, at), run.reference_head)
    packed, sums = batch["packed"], run.thresholds is not None
    policy = run.policy(packed=packed, sum_logits=sums, reference_head=reference_head)
    a = b = None
    if run.thresholds is not None:
        a, b = run.thresholds(aao.pooled_answer_logits(policy.logit_sums, mask))
    seeds = aao.random_weight_seeds(run.seed, step, indices)
    pairs = aao.PairBatch(mask, ids=batch["answer_ids"], seeds=seeds)
    if run.beta_scaling:  # SP2DPO
        pairs.beta = aao.per_pair_beta(batch["beta"].float(), *run.beta_scaling)
    if run.mixdpo:  # marked once for the whole set (mark_routed)
        pairs.routed = batch["routed"]
    if tis is not None:  # TIS-DPO: these pairs' r_t, cached before training, came with the batch
        pairs.tis_reward = ReferenceCache.states(batch, "tis").logps
    if run.objective.loss == "kto":
        pairs.kto_kl = kto_reference_point(run, items, indices)
    out = aao.preference_objective(run.objective, policy, reference, pairs, a, b)
    ref_top1 = reference.top1 if reference is not None else None
    metrics = {
        **aao.objective_metrics(out, mask, a, b),
        **aao.squeeze_probe(policy.top1, ref_top1, mask),
    }
    return PairForward(out, policy, reference, batch, metrics)


@torch.no_grad()
def kto_reference_point(run: Run, items, indices) -> torch.Tensor:
    """KTO's z_0 for a micro-batch, as TRL 1.16 computes it: one more forward of the policy and the
    reference, without gradient, on the mismatched pairs (data.mismatched_pairs: each prompt with
    the previous pair's answers, packed prompt-once), the mean summed log-ratio, then the mean over
    processes, clamped at 0 (aao.kto_reference_point)."""
    mismatched = data.mismatched_pairs(items, indices, run.max_length)
    batch = data.micro_batch(mismatched, list(range(len(mismatched))), False, run.device)
    policy = run.policy(packed=batch["packed"])
    reference = run.reference(packed=batch["packed"])
    kl = aao.kto_reference_point(policy.logps - reference.logps, batch["answer_mask"])
    kl = kl.to(dist_device()).reshape(1)
    dist.all_reduce(kl)
    return (kl[0] / dist.get_world_size()).clamp(min=0).to(run.device)


def reference_states(run: Run, batch, cache) -> M.AnswerStates | None:
    """The frozen reference's per-token and top-1 log-probs (and for TDPO the states that predict
    each answer token): live, cached (their values came with the batch), or none (SimPO)."""
    if cache is not None:
        return ReferenceCache.states(batch)
    if run.reference is None:
        return None
    with torch.no_grad():
        return run.reference(packed=batch["packed"])


def forward_sft(run: Run, items, indices):
    """The SFT stage on a micro-batch: the summed NLL of its answer tokens (divided by the token
    count of the whole batch, it is TRL's token mean), and that sum and count as metrics."""
    batch = data.micro_batch(items, indices, True, run.device)
    states = run.policy(packed=batch["packed"])
    nll_sum = aao.sft_loss(states.logps, batch["answer_mask"], 1)
    answer_tokens = sum(n for _, _, n in data.segment_lengths(items, indices))
    return nll_sum, {"nll_sum": nll_sum.detach(), "tokens/answer": float(answer_tokens)}


# ----------------------------------------------------------------------------- the optimizer


def make_optimizer(policy, thresholds, lr: float, threshold_lr: float, weight_decay: float):
    """AdamW: the policy at lr (no weight decay on norms), the threshold MLP at its own rate, since
    the policy's 5e-7 would leave a freshly initialized MLP where it started."""
    params = [p for p in policy.parameters() if p.requires_grad]  # LoRA: the adapters
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "lr": lr, "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "lr": lr, "weight_decay": 0.0},
    ]
    if thresholds is not None:
        mlp = list(thresholds.parameters())
        groups.append({"params": mlp, "lr": threshold_lr, "weight_decay": 0.0})
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["base_lr"] = g["lr"]
    # fused: one kernel over all tensors; the threshold MLP's vocab x 512 update stays cheap.
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, fused=True)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ----------------------------------------------------------------------------- the step


def train_step(
    run: Run,
    optimizer,
    indices: list,
    step: int,
    batch_size: int,
    grad_clip: float,
    stop_requested: bool,
    count_flops=False,
) -> dict:
    """One optimizer step on this rank's share of a global batch: micro-batches (forward, objective,
    backward) accumulate gradients, then clip, update, and the step's metrics over all ranks, read
    from the device once."""
    sums, spread = {"stop": float(stop_requested)}, []
    micro_step = sft_micro_step if run.objective is None else pair_micro_step
    scale = loss_scale(run, indices, batch_size)
    for chunk in data.micro_batches(indices, run.micro_batch_size):
        loss, m = micro_step(run, chunk, step, spread)
        # No no_sync between micro-batches: FSDP2 would then hold unsharded fp32 gradients (32 GB
        # for 8B); reduce-scattering each micro-batch's gradients keeps only the shards.
        (loss * scale).backward()
        lengths = data.segment_lengths(run.train_items, chunk)
        m["tokens"] = float(sum(q for q, _, _ in lengths))  # through the layers: each prompt once
        if count_flops:
            m["flops"] = M.training_flops(run.policy.config, lengths, run.reference is not None)
            if run.objective is not None and run.objective.loss == "kto":  # z_0's two forwards
                mismatched = data.mismatched_pairs(run.train_items, chunk, run.max_length)
                lengths = data.segment_lengths(mismatched, range(len(chunk)))
                m["flops"] += M.training_flops(run.policy.config, lengths, True, False)
        accumulate(sums, m, len(chunk))
    norms = {"grad_norm": clip_gradients(run.policy.parameters(), grad_clip)}
    # The threshold MLP is clipped apart, so that its gradient does not shrink the policy's step.
    if run.thresholds is not None:
        M.average_replicated_gradients(run.thresholds)
        norms["grad_norm/thresholds"] = clip_gradients(run.thresholds.parameters(), grad_clip)
    stats = reduce_metrics(sums, len(indices), norms | batch_spread(spread))
    if run.objective is None:
        stats["loss"] = stats.pop("nll_sum") / max(stats["tokens/answer"], 1.0)
    check_finite(run, stats, indices, step)
    optimizer.step()
    run.policy.zero_grad(set_to_none=True)
    if run.thresholds is not None:
        # Kept, not set to None: aao.VocabLinear adds into fc1's gradient in place.
        run.thresholds.zero_grad(set_to_none=False)
    return stats


def loss_scale(run: Run, indices: list, batch_size: int) -> torch.Tensor | float:
    """What a micro-batch's summed loss is multiplied by so that the step's loss is a mean over the
    global batch: per pair, or for SFT per answer token of it (TRL's token mean, the count
    all-reduced). FSDP averages gradients over the processes, hence x world."""
    world = dist.get_world_size()
    if run.objective is not None:
        return world / batch_size
    lengths = data.segment_lengths(run.train_items, indices)
    n_tokens = torch.tensor(float(sum(n for _, _, n in lengths)), device=dist_device())
    dist.all_reduce(n_tokens)
    return world / n_tokens.to(run.device)


def pair_micro_step(run: Run, chunk: list, step: int, spread: list):
    """A micro-batch of pairs: the summed per-pair losses and the metrics; a, b and β go to
    `spread`, for batch_spread."""
    f = forward_pairs(run, run.train_items, chunk, step, run.ref_train)
    per_pair = {"a": f.out.a, "b": f.out.b, "beta": f.out.beta}
    spread.append({k: v.detach() for k, v in per_pair.items() if isinstance(v, torch.Tensor)})
    return f.out.losses.sum(), f.metrics


def sft_micro_step(run: Run, chunk: list, step: int, spread: list):
    """A micro-batch of SFT examples: the summed NLL of its answer tokens and the metrics."""
    return forward_sft(run, run.train_items, chunk)


def check_finite(run: Run, stats: dict, indices: list, step: int) -> None:
    """Stop before the update on a non-finite loss or gradient norm, naming the batch's rows."""
    for key in ("loss", "grad_norm", "grad_norm/thresholds"):
        if key in stats and not math.isfinite(stats[key]):
            rows = [run.train_items[i]["where"] for i in indices]
            where = ", ".join(rows[:8]) + (", ..." if len(rows) > 8 else "")
            raise TrainingError(
                f"step {step + 1}: {key} is {stats[key]} on the batch of {where}; "
                "stopped without an update"
            )


def clip_gradients(params, max_norm: float) -> torch.Tensor:
    norm = torch.nn.utils.clip_grad_norm_(list(params), max_norm)
    return M.full(norm)  # FSDP's norm is a DTensor


def batch_spread(per_micro_batch: list) -> dict:
    """Mean, std, min and max over every pair of the global batch of the per-pair values (B,) that
    each micro-batch gave: AAO's thresholds a and b (Eq. 8), SP2DPO's β."""
    if not per_micro_batch or not per_micro_batch[0]:
        return {}
    names = sorted(per_micro_batch[0])
    # (values, pairs of this rank)
    local = torch.stack([torch.cat([m[k] for m in per_micro_batch]) for k in names])
    every = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(every, local)
    spread = {}
    for name, x in zip(names, torch.cat(every, dim=1)):
        stats = {"mean": x.mean(), "std": x.std(correction=0), "min": x.min(), "max": x.max()}
        spread |= {f"{name}/{stat}": v for stat, v in stats.items()}
    return spread


# Metrics summed over micro-batches and ranks; every other metric is averaged, weighted by pairs.
TOTALS = ("tokens", "tokens/answer", "nll_sum", "flops", "stop")


def accumulate(sums: dict, metrics: dict, weight: float, totals=TOTALS) -> None:
    """Add a micro-batch's metrics, each weighted by the pairs it is a mean over: all `weight` of
    them, or under MixDPO for aao.KEPT_PAIR_METRICS the pairs not routed to SFT, counted in
    pairs/kept."""
    kept = weight * (1 - metrics["mixdpo/routed"]) if "mixdpo/routed" in metrics else None
    if kept is not None:
        sums["pairs/kept"] = sums.get("pairs/kept", 0.0) + kept
    for k, v in metrics.items():
        w = kept if kept is not None and k.startswith(aao.KEPT_PAIR_METRICS) else weight
        sums[k] = sums.get(k, 0.0) + (v if k in totals else v * w)


def reduce_metrics(sums: dict, count: float, extra: dict | None = None, totals=TOTALS) -> dict:
    """Over every micro-batch of every rank: means of the pair-weighted sums, except `totals`,
    summed. One all-reduce and one device-to-host copy, that also reads `extra` (already global)."""
    extra, device = extra or {}, dist_device()
    # The device's sums, then the host's (token counts, FLOPs, the count) in one copy.
    on_device = sorted(k for k, v in sums.items() if isinstance(v, torch.Tensor))
    keys = on_device + sorted(k for k in sums if k not in on_device)
    host = [float(sums[k]) for k in keys[len(on_device) :]] + [float(count)]
    f64 = [sums[k].to(device, torch.float64).reshape(1) for k in on_device]
    total = torch.cat(f64 + [torch.tensor(host, dtype=torch.float64).to(device)])
    dist.all_reduce(total)
    extras = [v.double().reshape(()) for v in extra.values()]
    values = (torch.cat([total, torch.stack(extras)]) if extras else total).tolist()
    summed, count = dict(zip(keys, values)), values[len(keys)]
    kept = summed.pop("pairs/kept", None)
    out = {}
    for k, v in sorted(summed.items()):
        over = kept if kept is not None and k.startswith(aao.KEPT_PAIR_METRICS) else count
        # a batch MixDPO routed whole has no kept pair: no rewards/* to log
        if k in totals or over > 0:
            out[k] = v if k in totals else v / over
    return out | dict(zip(extra, values[len(keys) + 1 :]))


def dist_device():
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------------- the loop


def train(args, device, mesh) -> int:
    """The run: evaluate, the steps (train_loop), then the final weights and the token-weight page.
    Returns the exit code: 0, or 128 + a signal's number if stopped by one."""
    out = Path(args.out)
    check_shared_out(out, device)
    if not args.resume and (latest_checkpoint(out) or (out / "final").exists()):
        raise TrainingError(
            f"{out} already holds a run: continue it with --resume {out}, or choose another --out"
        )
    tokenizer = tokenizer_of(args)
    chat = chat_of(args, tokenizer)
    train_items, heldout = load_data(args, tokenizer, chat)
    sampler, total = schedule(args, train_items, dist.get_rank())
    if already_finished(args, out, total, sampler.steps_per_epoch):
        return 0
    resume_from = resume_point(args, out)
    run = build_run(args, device, mesh, tokenizer, train_items, heldout, resume_from)
    optimizer = make_optimizer(
        run.policy, run.thresholds, args.lr, args.threshold_lr, args.weight_decay
    )
    start = load_train_state(run, optimizer, resume_from) if resume_from else 0
    log = RunLog(out, args, start, resumed=resume_from is not None)
    resuming = f", resuming from {resume_from} at step {start}" if resume_from else ""
    rank0_print(step_layout(args, total, dist.get_world_size()) + resuming)
    first_eval = {}
    if start == 0 and run.heldout:
        first_eval = log.write("eval", {"step": 0, **evaluate(run)})
    stop = StopSignal()
    try:
        code = train_loop(args, run, optimizer, log, stop, sampler, start, total)
    finally:
        stop.restore()
        log.close()
    if code:
        return code
    source = None if args.weights == "tiny" else Path(M.resolve_weights(args.weights))
    dtype = getattr(torch, args.save_dtype)
    final = save_weights(run, tokenizer, out / "final", dtype, chat, source)
    if args.lora_rank is not None:
        base = "tiny" if source is None else str(source.resolve())
        save_adapter_dir(run, tokenizer, out / "adapter", chat, source, (lora_of(args), base))
    if run.objective is not None and run.objective.weighting == "aao" and run.heldout:
        write_weights_page(run, tokenizer, out / "weights.html", args.data)
    if dist.get_rank() == 0:
        summarize(first_eval, last_row(out / "eval.jsonl"), len(run.heldout), final, out)
    return 0


def tokenizer_of(args):
    if args.weights == "tiny":
        return data.tiny_tokenizer()
    return M.load_tokenizer(M.resolve_weights(args.weights))


def train_loop(args, run: Run, optimizer, log, stop, sampler, start: int, total: int) -> int:
    """Steps start to total: train, log, evaluate and save every so often. Returns 0, or after a
    signal (StopSignal) 128 + its number, once the step's checkpoint is written."""
    out, rank, peak = Path(args.out), dist.get_rank(), M.peak_flops(run.device)
    warmup = max(1, round(args.warmup * total))
    batch_size, clip, count_flops = args.batch_size, args.grad_clip, peak is not None
    steps, quiet = range(start, total), rank != 0 or args.quiet
    bar = tqdm(steps, initial=start, total=total, disable=quiet, desc="train", dynamic_ncols=True)
    with bar:
        for step in bar:
            t0 = time.perf_counter()
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * lr_factor(step, total, warmup)
            indices = sampler.batch(step)
            try:
                stats = train_step(
                    run, optimizer, indices, step, batch_size, clip, stop.requested, count_flops
                )
            except TrainingError as e:
                last = latest_checkpoint(out)
                last = f"; the last good checkpoint is {last}" if last else ""
                raise TrainingError(f"{e}{last}") from None
            stopping = stats.pop("stop")
            row = step_row(step, stats, optimizer, time.perf_counter() - t0, peak)
            if run.heldout and ((step + 1) % args.eval_every == 0 or step + 1 == total):
                row.update(log.write("eval", {"step": step + 1, **evaluate(run)}))
            log.write("metrics", row)
            if rank == 0:
                shown = "loss/preference" if "loss/preference" in row else "loss"
                bar.set_postfix({shown: f"{row[shown]:.4f}"})
                if report_due(step + 1, total, args.eval_every):
                    tqdm.write(progress_line(row, total))
            if stopping:
                path = save_train_state(run, optimizer, out, step + 1, args.keep_last)
                rank0_print(
                    f"stopped by {stop.name} after step {step + 1}: checkpoint {path}; continue "
                    f"with --resume {out} (same number of processes)"
                )
                return 128 + stop.signum
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total:
                save_train_state(run, optimizer, out, step + 1, args.keep_last)
    return 0


# The numbers that say whether a preference run works (README, "Is it working?"), in the names
# metrics.jsonl and eval.jsonl use, with the digits each needs; an SFT run has loss and eval/loss.
PROGRESS = {
    "loss/preference": 4,
    "rewards/margins": 3,
    "rewards/accuracies": 2,
    "a": 3,
    "b": 3,
    "eval/accuracy": 3,
    "eval/margin": 2,
}
SFT_PROGRESS = {"loss": 4, "eval/loss": 4}


def report_due(step: int, total: int, eval_every: int) -> bool:
    """Whether step (1-based) prints a progress line: each evaluation, every tenth of the run, the
    last step."""
    return step % eval_every == 0 or step % max(1, total // 10) == 0 or step == total


def progress_line(row: dict, total: int) -> str:
    """One short line of a metrics row: "step 4/8  loss/preference 0.6764  rewards/margins ...";
    the eval/ numbers when the step evaluated."""
    digits = PROGRESS if "loss/preference" in row or "rewards/margins" in row else SFT_PROGRESS
    shown = [f"{k} {row[k]:.{d}f}" for k, d in digits.items() if k in row]
    return f"step {row['step']}/{total}  " + "  ".join(shown)


def step_row(step: int, stats: dict, optimizer, seconds: float, peak: float | None) -> dict:
    """A line of metrics.jsonl: the step's metrics, learning rate, throughput, and MFU on a GPU."""
    row = {
        "step": step + 1,
        **stats,
        "lr": optimizer.param_groups[0]["lr"],
        "tokens_per_s": stats["tokens"] / seconds,
    }
    if peak:
        row["mfu"] = row.pop("flops") / seconds / (peak * dist.get_world_size())
    return row


def schedule(args, train_items: list, rank: int) -> tuple[data.PairSampler, int]:
    """Which pairs each step trains on, and how many steps: the fewer of --epochs x steps per epoch
    and --max-steps."""
    margins = [p["margin"] for p in train_items] if args.curriculum == "margin" else None
    sampler = data.PairSampler(
        len(train_items), args.batch_size, args.seed, rank, dist.get_world_size(), margins
    )
    total = int(args.epochs * sampler.steps_per_epoch)
    return sampler, min(total, args.max_steps) if args.max_steps else total


def already_finished(args, out: Path, total: int, steps_per_epoch: int) -> bool:
    """--resume of a run that ended (a requeued job): nothing to redo, said so."""
    if not (args.resume and (out / "final").is_dir()):
        return False
    if last_row(out / "metrics.jsonl").get("step", 0) < total:
        return False
    rank0_print(
        f"--resume {out}: the run there already finished ({total} steps, {out / 'final'} "
        f"written); nothing to do; the steps are the fewer of --epochs x {steps_per_epoch} and "
        "--max-steps: raise both (or the one that binds) to continue it"
    )
    return True


def resume_point(args, out: Path) -> Path | None:
    """The step-N/ checkpoint --resume continues from (None for a new run)."""
    if not args.resume:
        return None
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        raise TrainingError(
            f"--resume {args.resume}: the run there saved no step-N/ checkpoint yet "
            f"(see --save-every); start it again with --out {args.resume}"
        )
    return ckpt


def summarize(first: dict, last: dict, n_heldout: int, final: Path, out: Path) -> None:
    """The run's last lines: the held-out result before and after, the files written, and a warning
    if the policy never moved."""
    if "eval/accuracy" in last:
        before = f"{first['eval/accuracy']:.3f} before, " if first else ""
        print(
            f"held-out preference accuracy: {before}{last['eval/accuracy']:.3f} after "
            f"({n_heldout} pairs; log-ratio margin {last['eval/margin']:.2f} nats)"
        )
    elif "eval/loss" in last:
        before = f"{first['eval/loss']:.3f} before, " if first else ""
        after = f"{last['eval/loss']:.3f} after ({n_heldout} examples)"
        print(f"held-out NLL per answer token: {before}{after}")
    written = [out / f for f in ("eval.jsonl", "weights.html", "adapter") if (out / f).exists()]
    files = [final, out / "metrics.jsonl"] + written
    print("output: " + ", ".join(map(str, files)))
    evidence = stillness_evidence(out / "metrics.jsonl", first, last)
    if evidence:
        print(
            f"warning: the policy did not move: {evidence}. The learning rate (--lr) is most "
            "likely too small for this model and this many steps (the defaults are the paper's "
            "for 8B models; see --help)"
        )


def stillness_evidence(metrics: Path, first: dict, last: dict, tol: float = 1e-3) -> str | None:
    """What shows that the policy's log-ratios never left 0, in words; None when something shows
    that it moved, or when nothing can tell. A step's metrics are computed before its update, so
    step 1's are the starting policy's (log 2, margin 0) by construction: only the steps after the
    first, and the held-out evaluation after training against before, can show movement. For a
    loss with a reference (a policy equal to it has rewards 0); SimPO's never read as still."""
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    rows = [r for r in map(json.loads, lines) if r["step"] > 1 and "rewards/chosen" in r]
    evidence = []
    if rows:
        rewards = [abs(r[k]) for r in rows for k in ("rewards/chosen", "rewards/rejected")]
        if max(rewards) >= tol:
            return None
        steps = f"{rows[0]['step']}-{rows[-1]['step']}" if len(rows) > 1 else rows[0]["step"]
        evidence.append(f"the rewards of steps {steps} stayed within {tol:g} of 0")
    if "eval/margin" in first and "eval/margin" in last and last["step"] > first["step"]:
        before, after = first["eval/margin"], last["eval/margin"]
        if abs(after - before) >= tol:
            return None
        evidence.append(
            f"the held-out log-ratio margin went from {before:.4f} to {after:.4f} nats "
            f"(step {first['step']} to {last['step']})"
        )
    return " and ".join(evidence) or None


class RunLog:
    """metrics.jsonl and eval.jsonl on rank 0 (and TensorBoard with --tensorboard). On resume, the
    rows that the killed run logged after its last checkpoint (past its step) are dropped."""

    def __init__(self, out: Path, args, start: int, resumed: bool):
        self.rank0, self.board = dist.get_rank() == 0, None
        self.files = {"metrics": out / "metrics.jsonl", "eval": out / "eval.jsonl"}
        if not self.rank0:
            return
        saved = {k: v for k, v in vars(args).items() if k != "resume"}
        (out / "args.json").write_text(json.dumps(saved, indent=1))
        for f in self.files.values():
            rows = f.read_text().splitlines() if resumed and f.exists() else []
            kept = [r for r in rows if json.loads(r)["step"] <= start]
            f.write_text("".join(r + "\n" for r in kept))
        if args.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TrainingError(
                    "--tensorboard needs the tensorboard package: pip install tensorboard"
                ) from None
            self.board = SummaryWriter(str(out / "tensorboard"))

    def write(self, file: str, row: dict) -> dict:
        """Append {"step": N, metric: value, ...} to metrics.jsonl or eval.jsonl; returns it."""
        if self.rank0:
            with self.files[file].open("a") as f:
                f.write(json.dumps(row) + "\n")
            for k, v in row.items() if self.board is not None else ():
                if k != "step":
                    self.board.add_scalar(k, v, row["step"])
        return row

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def last_row(file: Path) -> dict:
    """The last row of metrics.jsonl or eval.jsonl ({} when there is none)."""
    rows = file.read_text().splitlines() if file.is_file() else []
    return json.loads(rows[-1]) if rows else {}


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(run: Run) -> dict:
    """Held-out metrics. Pairs: preference accuracy and margin by the plain (unweighted) DPO
    implicit reward, log π_θ/π_ref(y_w) - log π_θ/π_ref(y_l) in nats without β, one yardstick for
    every loss and weighting (SimPO, with no reference: its length-normalized log-prob margin); the
    squeeze probe; for AAO the thresholds and token shares. SFT examples: NLL per answer token."""
    run.policy.eval()
    sums, count = {}, 0.0
    rank, world = dist.get_rank(), dist.get_world_size()
    for real, weight in data.lockstep_chunks(len(run.heldout), run.micro_batch_size, rank, world):
        if run.objective is None:
            m = forward_sft(run, run.heldout, real)[1]
        else:
            f = forward_pairs(run, run.heldout, real, 0, run.ref_eval)
            m, mask, logps = f.metrics, f.batch["answer_mask"], f.policy.logps
            if f.reference is not None:
                ratio = logps - f.reference.logps
            else:
                ratio = logps / mask.sum(1, keepdim=True)
            chosen, rejected = aao.split_pairs((ratio * mask).sum(1))
            margin = chosen - rejected
            m["accuracy"], m["margin"] = aao.preference_accuracy(margin), margin.mean()
        accumulate(sums, m if weight else {k: 0 * v for k, v in m.items()}, weight)
        count += weight
    M.reshard(run.policy)  # no backward ran: the root would keep its gathered parameters
    run.policy.train()
    stats = reduce_metrics(sums, count)
    if run.objective is None:
        stats = {"loss": stats["nll_sum"] / max(stats["tokens/answer"], 1.0)}
    return {f"eval/{k}": v for k, v in stats.items()}


# ----------------------------------------------------------------------------- checkpoints


def train_state_file(ckpt: Path, shard: int, shards: int) -> Path:
    return ckpt / f"train-state-{shard:05d}-of-{shards:05d}.safetensors"


def named_trainables(run: Run) -> dict:
    # LoRA: the adapters only; the base is read from its checkpoint again on resume
    named = {f"policy.{n}": p for n, p in run.policy.named_parameters() if p.requires_grad}
    if run.thresholds is not None:
        named.update({f"thresholds.{n}": p for n, p in run.thresholds.named_parameters()})
    return named


@contextlib.contextmanager
def written_whole(final: Path):
    """A directory every rank writes into under a temporary name, renamed once all are done: a kill
    never leaves half of one, and what was there before stays until the new one is whole."""
    tmp = final.parent / f".tmp-{final.name}"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    yield tmp
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    dist.barrier()


def save_train_state(run: Run, optimizer, out: Path, step: int, keep_last: int) -> Path:
    """<out>/step-N/, for --resume: every rank writes its own shard of the fp32 master weights and
    of AdamW's moments (under --replicate, the first replica only); rank 0 also the replicated
    threshold MLP with its moments. No rank writes the whole model and none waits on one that does.
    Then all but the last keep_last step-N/ are deleted."""
    rank, final = dist.get_rank(), out / f"step-{step}"
    shard, shards = M.shard_position(run.mesh)
    with written_whole(final) as tmp:
        # Replicas hold the same shards: the first one writes them.
        if run.mesh.ndim == 1 or run.mesh.get_local_rank("replicate") == 0:
            tensors = {}
            for name, p in named_trainables(run).items():
                if name.startswith("thresholds.") and rank != 0:
                    continue  # replicated: rank 0's copy is every rank's
                tensors[name] = M.local(p).detach().cpu().contiguous()
                for k, v in optimizer.state.get(p, {}).items():
                    tensors[f"optim/{name}/{k}"] = M.local(v).detach().cpu().contiguous()
            save_file(tensors, train_state_file(tmp, shard, shards))
        if rank == 0:
            meta = {"step": step, "shards": shards, "world_size": dist.get_world_size()}
            (tmp / "train_state.json").write_text(json.dumps(meta))
    if rank == 0:
        for old in sorted(checkpoints(out), key=checkpoints(out).get)[: -keep_last or None]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def save_weights(
    run: Run, tokenizer, final: Path, dtype, chat: data.Chat, source: Path | None
) -> Path:
    """<out>/final/: the policy in Hugging Face layout, in dtype (bf16 unless --save-dtype float32),
    with the tokenizer and its chat template: what serving and the next stage read; no optimizer
    state."""
    with written_whole(final) as tmp:
        M.save_sharded(run.policy, tmp, dtype)
        if dist.get_rank() == 0:
            write_tokenizer_files(tmp, tokenizer, chat, source, run.policy.config)
    return final


def write_tokenizer_files(tmp: Path, tokenizer, chat: data.Chat, source: Path | None, cfg) -> None:
    """tokenizer.json, its config with the chat template, generation_config.json."""
    tokenizer.save(str(tmp / "tokenizer.json"))
    data.write_tokenizer_config(tmp, chat, source)
    M.write_generation_config(tmp, source, cfg, data.answer_stop_ids(chat, tokenizer))


def save_adapter_dir(run: Run, tokenizer, path: Path, chat, source: Path | None, lora_base):
    """<out>/adapter/: a LoRA run's adapters alone in peft's layout (model.save_adapters), which
    peft loads onto the base it names, with the tokenizer files, so that `train.py answers` reads
    it as it reads final/. Beside final/, not in it: transformers would take final/ for an adapter
    and load the base under it."""
    lora, base = lora_base
    with written_whole(path) as tmp:
        M.save_adapters(run.policy, tmp, lora, base)
        if dist.get_rank() == 0:
            write_tokenizer_files(tmp, tokenizer, chat, source, run.policy.config)
    return path


def checkpoints(out: Path) -> dict:
    """step-N/ directories that hold a finished train state, with their step."""
    return {
        d: json.loads((d / "train_state.json").read_text())["step"]
        for d in out.glob("step-*")
        if (d / "train_state.json").is_file()
    }


def latest_checkpoint(out: Path) -> Path | None:
    found = checkpoints(out) if out.is_dir() else {}
    return max(found, key=found.get, default=None)


def train_state_reader(ckpt: Path, mesh):
    """read(name, start, stop) for model.build_sharded from a step-N/ train state: this rank's file
    holds exactly the rows start:stop of each of its parameters, the fp32 master weights, so a
    resume continues exactly."""
    meta = json.loads((ckpt / "train_state.json").read_text())
    shard, shards = M.shard_position(mesh)
    if meta["shards"] != shards:
        raise TrainingError(
            f"{ckpt}: written with the model sharded over {meta['shards']} processes, resumed "
            f"over {shards}: resume with the same number of processes (and --replicate)"
        )
    state = M.open_safetensors(train_state_file(ckpt, shard, shards))
    saved = set(state.keys())

    def read(name, start, stop):
        if (
            f"policy.{name}" not in saved
        ):  # LoRA's state holds the adapters, a full run's no adapter
            raise TrainingError(
                f"{ckpt}: its train state holds no {name}: resume with the --lora-rank the run "
                "was started with"
            )
        return state.get_tensor(f"policy.{name}")

    return read


def load_train_state(run: Run, optimizer, ckpt: Path) -> int:
    """AdamW's moments and the threshold MLP from step-N/; returns the step to continue from."""
    shard, shards = M.shard_position(run.mesh)
    mine = M.open_safetensors(train_state_file(ckpt, shard, shards))
    # The replicated threshold MLP and its moments are in rank 0's file only.
    rank0 = None
    if run.thresholds is not None:
        rank0 = M.open_safetensors(train_state_file(ckpt, 0, shards))
    for name, p in named_trainables(run).items():
        f = rank0 if name.startswith("thresholds.") else mine
        if name.startswith("thresholds."):
            with torch.no_grad():
                p.copy_(f.get_tensor(name))
        state = {
            k.rsplit("/", 1)[1]: f.get_tensor(k).to(M.local(p).device)
            for k in f.keys()
            if k.startswith(f"optim/{name}/")
        }
        # The moments are sharded like their parameter; the step count is not.
        for k, v in state.items():
            if k != "step" and isinstance(p, DTensor):
                state[k] = sharded_like(p, v)
        if state:
            optimizer.state[p] = state
    return json.loads((ckpt / "train_state.json").read_text())["step"]


def sharded_like(p: DTensor, local: torch.Tensor) -> DTensor:
    """A shard read from a train state, as a DTensor laid out like its parameter p."""
    layout = {"shape": p.shape, "stride": p.stride(), "run_check": False}
    return DTensor.from_local(local, p.device_mesh, p.placements, **layout)


# ----------------------------------------------------------------------------- the reference cache


class ReferenceCache:
    """--precompute-ref: the reference's log-probs and top-1 log-probs at every answer token,
    computed once; for TDPO also its final hidden states that predict them (with its head weight,
    kept once in Run.reference_head, they give its whole next-token distribution). Rank r computes
    the pairs i = r, r + world, ... and lays their values out flat, pair after pair (the chosen
    answer, then the rejected); every rank then gathers every rank's flat tensor. Where pair i's
    values sit follows from the answers' lengths, which every rank knows: no index travels."""

    def __init__(self, pairs: list, flats: list, hiddens: list | None = None):
        self.flats, self.hiddens = flats, hiddens
        self.lengths = [(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs]
        self.starts, world = [0] * len(pairs), len(flats)
        for r in range(world):  # where each pair starts in its rank's flat tensor
            offset = 0
            for i in range(r, len(pairs), world):
                self.starts[i], offset = offset, offset + sum(self.lengths[i])

    @classmethod
    @torch.no_grad()
    def compute(cls, reference, pairs, micro, device, hidden=False) -> "ReferenceCache":
        mine, mine_hidden, rank, world = [], [], dist.get_rank(), dist.get_world_size()
        for real, weight in data.lockstep_chunks(len(pairs), micro, rank, world):
            batch = data.micro_batch(pairs, real, False, device)
            states = reference(packed=batch["packed"])
            # The answer tokens in row order (chosen rows, then rejected), regrouped by pair.
            if weight:
                at = batch["packed"].answer_index
                both = torch.stack([states.logps, states.top1]).flatten(1)
                chosen = [len(pairs[i]["chosen_ids"]) for i in real]
                rejected = [len(pairs[i]["rejected_ids"]) for i in real]
                by_pair = lambda rows: [x for k in range(len(real)) for x in rows[k :: len(real)]]
                mine += by_pair(both[:, at].float().cpu().split(chosen + rejected, dim=1))
                if hidden:  # (answer tokens, D) in the reference's compute dtype
                    h = states.hidden.flatten(0, 1)[at].cpu()
                    mine_hidden += by_pair(h.split(chosen + rejected))
        flats = gather_ragged(torch.cat(mine, dim=1).T if mine else torch.zeros(0, 2))
        hiddens = gather_ragged(torch.cat(mine_hidden)) if hidden else None
        return cls(pairs, [f.T for f in flats], hiddens)

    def values(self, indices) -> dict:
        """{"reference": (2, tokens)} on the host: the log-probs and top-1 log-probs of a
        micro-batch's answer tokens (its chosen answers, then its rejected ones), and for TDPO
        {"reference_hidden": (tokens, D)}, to travel with the batch (data.micro_batch)."""
        world, spans, hidden = len(self.flats), [], []
        for side in (0, 1):
            for i in indices:
                start = self.starts[i] + side * self.lengths[i][0]
                span = slice(start, start + self.lengths[i][side])
                spans.append(self.flats[i % world][:, span])
                if self.hiddens is not None:
                    hidden.append(self.hiddens[i % world][span])
        values = {"reference": torch.cat(spans, dim=1)}
        return values | ({"reference_hidden": torch.cat(hidden)} if hidden else {})

    @staticmethod
    def states(batch, key: str = "reference") -> M.AnswerStates:
        """The values that came with a micro-batch under key, on the device -> their AnswerStates on
        its (rows, width) grid: log-probs, top-1 log-probs and, if cached, hidden states (TIS-DPO's
        cache under "tis": the log-probs' difference r_t)."""
        answer_index, shape = batch["packed"].answer_index, batch["answer_mask"].shape
        values = batch[key]
        grid = torch.zeros(2, shape[0] * shape[1], device=values.device)
        grid[:, answer_index] = values
        states = M.AnswerStates(*grid.view(2, *shape).unbind(0))
        if f"{key}_hidden" in batch:  # TDPO: (tokens, D) -> (rows, width, D)
            h = batch[f"{key}_hidden"]
            grid = h.new_zeros(shape[0] * shape[1], h.shape[1]).index_put_((answer_index,), h)
            states.hidden = grid.view(*shape, -1)
        return states


def gather_ragged(t: torch.Tensor) -> list:
    """Every rank's 2-D tensor (row counts differ between ranks), on every rank, on the CPU."""
    n = torch.tensor([t.shape[0]], device=dist_device())
    counts = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, n)
    padded = torch.zeros(int(max(counts)), *t.shape[1:], dtype=t.dtype, device=dist_device())
    padded[: t.shape[0]] = t
    every = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(every, padded)
    return [e[: int(c)].cpu() for e, c in zip(every, counts)]


# ----------------------------------------------------------------------------- preemption


class StopSignal:
    """SIGTERM (a scheduler preempting the job) or SIGINT (Ctrl-C): the step in flight finishes,
    every rank agrees at its end, a step-N/ checkpoint is written and the run exits with 128 + the
    signal's number (143, 130): what a shell reports for a job ended by that signal, and what
    Kubernetes' ExitCode restart policy retries. A second signal stops at once. torchrun forwards
    the signal it gets to its workers, which under Ctrl-C or a scheduler's group kill got it
    already: a repeat within 2 s is that echo."""

    def __init__(self):
        self.signum, self.first = 0, 0.0
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        if self.signum and time.monotonic() - self.first > 2:
            os._exit(128 + signum)
        if not self.signum:
            self.signum, self.first = signum, time.monotonic()
            print(
                f"rank {dist.get_rank()}: {self.name}: finishing the step, then saving a "
                "checkpoint; a second signal stops at once",
                file=sys.stderr,
                flush=True,
            )

    @property
    def requested(self) -> bool:
        return self.signum != 0

    @property
    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGTERM).name

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------- token-weight page

WEIGHT_PAGE_STYLE = """\
body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;line-height:1.9}
.t{padding:1px 0;border-radius:3px;white-space:pre-wrap}.ambiguous{background:#e0e0e0;color:#888}
.transitional{background:#fff6c8}.key{background:#7dd87d;font-weight:600}.pair{margin:1.5em 0}
.who{display:inline-block;width:6em;color:#555}small{color:#666}"""

# The page: {style}, {source} and {blocks} (the pairs) are filled in; a trailing \ joins two lines.
# The legend says how to read the colours, and why the tokens that decide a pair are not always key.
WEIGHT_PAGE = """\
<!doctype html><html><head><meta charset="utf-8"><title>AAO token weights</title>
<style>{style}</style></head><body><h1>AAO token weights</h1>
<p>Held-out pairs from {source}, weighed by the trained policy and threshold MLP. Each answer \
token has a similarity S in [0, 1] (Eq. 7): the largest cosine, min-max normalized over the pair, \
between its input embedding and <em>any</em> token of the other answer, whatever its position. \
The pair's thresholds a &gt; b (Eq. 8, shown beside its prompt) sort the tokens (Eq. 14&ndash;16):
<span class="t ambiguous">ambiguous</span> (S &gt; a, weight (1&minus;S)&sup2;, suppressed),
<span class="t transitional">transitional</span> (b &le; S &le; a, weight 1, as in DPO),
<span class="t key">key</span> (S &lt; b, weight 1+S, emphasized). \
Hover a token for S and its weight.</p>
<p>A token that both answers contain has S = 1: ambiguous. The tokens that decide a pair (a \
different name, number or symbol) are key only when nothing in the other answer is close to \
them: a deciding token whose embedding is moderately similar to some token of the other \
answer (&ldquo;Na&rdquo; against &ldquo;H&rdquo;, both element symbols; &ldquo;Rome&rdquo; \
against &ldquo;Athens&rdquo;) lands between b and a, transitional, and one very similar to it \
(one digit against another) lands above a, ambiguous. Early in training a and b are near where \
they start (0.8 and 0.4), so the middle band is wide: its tokens keep DPO's weight 1, and a run \
whose deciding tokens are transitional still learns from them as DPO does.</p>
{blocks}</body></html>"""


@torch.no_grad()
def write_weights_page(run: Run, tokenizer, path: Path, source: str, n: int = 12) -> None:
    """A page that shows, for a few held-out pairs, every answer token coloured by its AAO category
    (Eq. 16's hard thresholds on the learned a, b), with S and the weight of Eq. 17 on hover. Every
    rank runs the same micro-batches (FSDP gathers collectively); rank 0 writes."""
    shown = list(range(min(n, len(run.heldout))))
    chunks = data.micro_batches(shown, run.micro_batch_size)
    blocks = "".join(pairs_html(run, tokenizer, chunk) for chunk in chunks)
    M.reshard(run.policy)
    if dist.get_rank() == 0:
        source = html.escape(str(source))
        page = WEIGHT_PAGE.format(style=WEIGHT_PAGE_STYLE, source=source, blocks=blocks)
        path.write_text(page, encoding="utf-8")


def pairs_html(run: Run, tokenizer, chunk: list) -> str:
    """A micro-batch of held-out pairs on the page: the prompt with a and b, then each answer token
    as a span of its category's class, with S and its weight in the title."""
    f = forward_pairs(run, run.heldout, chunk, 0, run.ref_eval)
    ids, mask = f.batch["answer_ids"].cpu(), f.batch["answer_mask"].cpu().bool()
    S, w = f.out.similarity.cpu(), f.out.weights.cpu()
    a, b = f.out.a.cpu().repeat(2), f.out.b.cpu().repeat(2)
    blocks = []
    for k, i in enumerate(chunk):
        lines = []
        for row, who in ((k, "chosen"), (k + len(chunk), "rejected")):
            spans = []
            for t in mask[row].nonzero().flatten().tolist():
                s = float(S[row, t])
                kind = "ambiguous" if s > a[row] else "key" if s < b[row] else "transitional"
                text = html.escape(tokenizer.decode([int(ids[row, t])], skip_special_tokens=False))
                title = f"{kind}: S={s:.3f}, w={float(w[row, t]):.3f}"
                spans.append(f'<span class="t {kind}" title="{title}">{text}</span>')
            lines.append(f'<div><span class="who">{who}</span>{"".join(spans)}</div>')
        prompt = tokenizer.decode(run.heldout[i]["prompt_ids"], skip_special_tokens=True)
        head = f"<small>{html.escape(prompt)} &nbsp; (a={a[k]:.3f}, b={b[k]:.3f})</small>"
        blocks.append(f'<div class="pair">{head}{"".join(lines)}</div>')
    return "".join(blocks)


# ----------------------------------------------------------------------------- AlpacaEval answers


def parse_answers_args(argv):
    p = argparse.ArgumentParser(
        prog="train.py answers",
        description="Write a model's answers to AlpacaEval's instructions: each "
        "`instruction` of --prompts as one user turn of the chat template, answered.",
    )
    p.add_argument(
        "--weights",
        required=True,
        help="a Hugging Face directory, a LoRA run's adapter/ directory (peft's layout), or "
        + ", ".join(M.PRESETS),
    )
    p.add_argument(
        "--base",
        help="for an adapter directory: the base weights (default: base_model_name_or_path of its "
        "adapter_config.json)",
    )
    p.add_argument(
        "--prompts", required=True, help="JSON lines (or a JSON list) of rows with an 'instruction'"
    )
    p.add_argument(
        "--out", required=True, help="answers.json: a list of {instruction, output, generator, ...}"
    )
    p.add_argument(
        "--template",
        choices=sorted(data.TEMPLATES),
        help="a built-in chat template instead of the checkpoint's own",
    )
    p.add_argument(
        "--generator",
        help="the name AlpacaEval shows (default: the run's "
        "directory for <run>/final, else the weights directory's)",
    )
    p.add_argument("--max-new-tokens", type=int, default=2048)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="auto: cuda when there is one",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="auto: bf16 on CUDA",
    )
    args = p.parse_args(argv)
    bad_sizes = args.max_new_tokens < 1 or args.batch_size < 1
    if bad_sizes or args.temperature < 0 or not 0 < args.top_p <= 1:
        p.error(
            "--max-new-tokens and --batch-size must be >= 1, --temperature >= 0, --top-p in (0, 1]"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this machine has no CUDA device that torch can use")
    return args


def read_instructions(path) -> list[dict]:
    rows = []
    for where, row in data.read_rows(path):
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str):
            raise data.DataError(f"{where}: a row needs a string 'instruction'")
        rows.append(row)
    return rows


def generator_name(weights: str) -> str:
    """The name AlpacaEval shows for a model: its run's directory for out/<run>/final, adapter/ or
    step-N/."""
    path = Path(weights).resolve()
    in_run = path.name in ("final", "adapter") or path.name.startswith("step-")
    return path.parent.name if in_run else path.name


def answering_model(weights: str, base: str | None, device, dtype) -> M.Transformer:
    """The model that answers: a checkpoint (final/ is one, merged), or the base of an adapter
    directory with its adapters merged in (model.merge_adapters: as fast as the base)."""
    config = Path(weights) / "adapter_config.json"
    if not config.is_file():
        if base is not None:
            raise M.CheckpointError(f"--base {base}: {weights} is a checkpoint, not adapters")
        return M.load_model(weights, device, dtype).eval()
    base = base or json.loads(config.read_text()).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise M.CheckpointError(
            f"{config}: its base_model_name_or_path {base!r} is not a directory here; give the "
            "base weights with --base"
        )
    model = M.load_adapters(M.load_model(base, device, torch.float32), weights)
    model = M.merge_adapters(model).to(dtype)
    model.reset_buffers()  # .to(dtype) cast the rope frequencies too
    return model.eval()


def write_answers(args) -> None:
    """The model's answer to every instruction of --prompts, written as AlpacaEval reads them."""
    t0, rows = time.perf_counter(), read_instructions(args.prompts)
    weights = M.resolve_weights(args.weights)
    tokenizer = M.load_tokenizer(weights)
    chat = data.load_chat(weights, tokenizer, args.template)
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    device = torch.device("cuda" if cuda else "cpu")
    model = answering_model(weights, args.base, device, compute_dtype(args.dtype, device))
    prompts = data.instruction_prompts(chat, tokenizer, [r["instruction"] for r in rows])
    context = model.config.max_position_embeddings
    prompts, n_cut = M.fit_prompts(prompts, context)
    if n_cut:
        print(
            f"warning: {n_cut} prompt(s) longer than the model's context ({context} tokens) were "
            "cut from the left",
            file=sys.stderr,
        )
    stop_ids = data.answer_stop_ids(chat, tokenizer) + M.stop_ids_of(weights, model.config)
    stop_ids = list(dict.fromkeys(stop_ids))
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "stop_ids": stop_ids}
    # Prompts of like length batch together (little padding); longest first, so running out of
    # memory shows at once.
    order = sorted(range(len(rows)), key=lambda i: -len(prompts[i]))
    outputs = [None] * len(rows)
    with tqdm(total=len(rows), unit="answer", disable=None) as bar:
        for n, start in enumerate(range(0, len(order), args.batch_size)):
            batch = order[start : start + args.batch_size]
            new_tokens = min(args.max_new_tokens, context - max(len(prompts[i]) for i in batch))
            batch_prompts = [prompts[i] for i in batch]
            answers = M.generate(model, batch_prompts, new_tokens, seed=args.seed + n, **sampling)
            for i, ids in zip(batch, answers):
                outputs[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
            bar.update(len(batch))
    generator = args.generator or generator_name(weights)
    ours = ("instruction", "output", "generator")
    answers = [
        {"instruction": r["instruction"], "output": out, "generator": generator}
        | {k: v for k, v in r.items() if k not in ours}
        for r, out in zip(rows, outputs)
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(answers, indent=2, ensure_ascii=False) + "\n"
    Path(args.out).write_text(text, encoding="utf-8")
    sampling = "greedy" if args.temperature == 0 else f"temperature {args.temperature:g}"
    print(
        f"wrote {len(answers)} answers of {generator} ({sampling}, at most {args.max_new_tokens} "
        f"new tokens) to {args.out} in {time.perf_counter() - t0:.1f} s"
    )


def answers_main(argv) -> int:
    try:
        write_answers(parse_answers_args(argv))
    except (M.CheckpointError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- entry point


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["answers"]:  # python train.py answers ...: the last stage of the pipeline
        return answers_main(argv[1:])
    code, torchrun = 1, "RANK" in os.environ
    try:
        args = parse_args(argv)
        device, mesh = setup_distributed(args.replicate, args.dist_timeout, args.device)
        code = train(args, device, mesh)
    except (M.CheckpointError, data.DataError, TrainingError) as e:
        several = dist.is_initialized() and dist.get_world_size() > 1
        rank = f" (rank {dist.get_rank()})" if several else ""
        print(f"error{rank}: {e}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    if dist.is_initialized():
        # gloo's destroy_process_group aborts a rank now and then after all work is done.
        if torchrun and dist.get_backend() == "gloo":
            os._exit(code)
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
