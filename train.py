"""Train a policy with AAO (or DPO, IPO, cDPO, hinge, SimPO, SFT; token weighting none / random / aao).

    python train.py                        # the embedded default: tiny Llama, synthetic pairs, AAO, CPU, < 2 min
    torchrun --nproc_per_node 8 train.py --weights llama31-8b --data ultrafeedback.jsonl
    python train.py --resume out/run       # continue a run from its last checkpoint
    python train.py --benchmark            # step time, tokens/s, memory; our model vs transformers; AAO vs DPO
    python train.py --experiment           # the DPO / DPO-Random / AAO / SimPO table of the README

One process without torchrun, N with it. Either way the model is sharded with FSDP2 (a single process
is a group of one), so one code path serves the laptop and the 8-GPU node: fp32 master weights,
bf16 compute on CUDA (MixedPrecisionPolicy), fp32 gradient reduction, NCCL on CUDA, gloo on CPU.
"""
import argparse
import dataclasses
import html
import json
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path

# CPU runs: back large tensors with transparent huge pages. Each step frees and re-allocates its large
# tensors (logits, the threshold MLP's 65 MB gradient), and with 4 KiB pages every one is page-faulted
# afresh: 39 ms to zero 65 MB here, 8 ms with huge pages. Read by torch's CPU allocator, so set first.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import aao
import data
import model as M

# Training defaults: the paper's for real models (lr 5e-7, batch 16, one epoch); the tiny model trains
# from scratch on the synthetic set, so it needs a far larger learning rate. The paper gives no learning
# rate for the threshold MLP; these let Adam move it about as far over one UltraFeedback epoch (~3,700
# steps) as over the tiny run's 256: far enough to learn, not so far that a and b pin to their bounds
# (at 3e-3 they did, on every seed of the tiny run).
DEFAULTS = {"lr": 5e-7, "aw_lr": 2e-5, "micro_batch_size": 2, "max_length": 1024, "max_prompt_length": 512,
            "epochs": 1.0, "eval_every": 200, "save_every": 500, "out": "out/run"}
TINY_DEFAULTS = {"lr": 3e-3, "aw_lr": 3e-4, "micro_batch_size": 16, "max_length": 128, "max_prompt_length": 64,
                 "epochs": 2.0, "eval_every": 100, "save_every": 0, "out": "out/aao-tiny"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="tiny", help="a Hugging Face directory, or " + ", ".join(M.PRESETS))
    p.add_argument("--data", default="synthetic", help="JSON lines / parquet of preference pairs, or 'synthetic'")
    p.add_argument("--eval-data", help="held-out pairs (default: the synthetic held-out split, or --eval-pairs of --data)")
    p.add_argument("--eval-pairs", type=int, default=256, help="pairs of --data held out when there is no --eval-data")
    p.add_argument("--template", choices=sorted(data.TEMPLATES), help="chat template (default: the preset's)")
    p.add_argument("--out", help="output directory")
    p.add_argument("--resume", metavar="OUT", help="continue the run in OUT from its last checkpoint")
    g = p.add_argument_group("objective")
    g.add_argument("--loss", default="dpo", choices=["dpo", "ipo", "cdpo", "hinge", "simpo", "sft"])
    g.add_argument("--weighting", default="aao", choices=["none", "random", "aao"])
    g.add_argument("--beta", type=float, help="default 0.1, or 2.0 for simpo")
    g.add_argument("--label-smoothing", type=float, default=0.1, help="cdpo's ε")
    g.add_argument("--simpo-gamma", type=float, default=0.5)
    g.add_argument("--alpha", type=float, default=200.0, help="Eq. 17's sharpness")
    g.add_argument("--lambda-c", type=float, default=1.0, help="Eq. 13: contrastive suppression")
    g.add_argument("--lambda-r", type=float, default=1.0, help="Eq. 13: reward enhancement")
    g.add_argument("--reward-sum", action="store_true", help="Eq. 11 as a raw sum, not length-normalized")
    g.add_argument("--curriculum", default="none", choices=["none", "margin"], help="MixDPO: easy -> hard by margin")
    g.add_argument("--sft-below-margin", type=float, metavar="TAU", help="MixDPO: pairs with margin < TAU take SFT")
    g.add_argument("--beta-column", metavar="NAME", help="SP2DPO: per-pair β from this column of the data")
    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=float)
    g.add_argument("--aw-lr", type=float, help="learning rate of the threshold MLP (Eq. 8)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's, never on norms")
    g.add_argument("--warmup", type=float, default=0.1, help="fraction of steps of linear warmup, then cosine")
    g.add_argument("--batch-size", type=int, default=16, help="pairs per optimizer step, over all processes")
    g.add_argument("--micro-batch-size", type=int, help="pairs per forward pass and process")
    g.add_argument("--epochs", type=float)
    g.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--max-length", type=int)
    g.add_argument("--max-prompt-length", type=int)
    g.add_argument("--keep-identical", action="store_true", help="keep pairs whose answers are identical")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="compute dtype")
    g.add_argument("--precompute-ref", action="store_true", help="cache the reference log-probs, free its memory")
    g.add_argument("--activation-checkpointing", action="store_true")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("logging and modes")
    g.add_argument("--eval-every", type=int)
    g.add_argument("--save-every", type=int, help="0: only the final checkpoint")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--benchmark", action="store_true", help="measure speed and memory instead of training")
    g.add_argument("--experiment", action="store_true", help="run the small-scale method comparison")
    g.add_argument("--experiment-seeds", type=int, default=3)
    args = p.parse_args(argv)
    if args.resume:  # the saved run's flags are the defaults; flags given now override them
        saved = json.loads((Path(args.resume) / "args.json").read_text())
        args = p.parse_args(argv, namespace=argparse.Namespace(**{**saved, "resume": args.resume}))
        args.out = args.resume
    if (args.experiment or args.benchmark) and args.out is None:
        args.out = "out"
    for k, v in (TINY_DEFAULTS if args.weights == "tiny" else DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.beta = args.beta if args.beta is not None else 2.0 if args.loss == "simpo" else 0.1
    args.template = args.template or M.PRESETS.get(args.weights, {}).get("template", "plain")
    return args


# ----------------------------------------------------------------------------- processes and devices

def setup_distributed():
    """RANK / WORLD_SIZE / LOCAL_RANK from torchrun, or a group of one held in memory."""
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    # mesh= explicitly: the default mesh picks CUDA whenever it exists, even for a gloo group.
    return dist.get_rank(), dist.get_world_size(), device, init_device_mesh(device.type, (dist.get_world_size(),))


def compute_dtype(args, device):
    if args.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, args.dtype)


def rank0_print(*a):
    if dist.get_rank() == 0:
        print(*a, flush=True)


# ----------------------------------------------------------------------------- models

def model_source(weights: str, vocab_size: int, seed: int):
    """(config, read) where read(name, start, stop) returns rows start:stop of a full parameter: from
    the safetensors files (only those rows are read), or from the seeded random tiny model."""
    if weights == "tiny":
        state = M.tiny_model(vocab_size, seed).state_dict()
        return M.tiny_config(vocab_size), lambda name, s, e: state[name][s:e]
    cfg = M.read_config(weights)
    files = M.checkpoint_files(weights)
    with torch.device("meta"):
        M.check_checkpoint(weights, files, M.expected_shapes(M.Transformer(cfg)))

    def read(name, s, e):
        with safe_open(files[M.hf_name(name)], framework="pt") as f:
            return f.get_slice(M.hf_name(name))[s:e]
    return cfg, read


def fill_parameters(module, read) -> None:
    """Copy each parameter's rows from read(name, start, stop): this rank's Shard(0) rows of the FSDP
    parameter (torch.chunk layout), so no rank ever holds the whole model."""
    rank, world = dist.get_rank(), dist.get_world_size()
    with torch.no_grad():
        for name, p in module.named_parameters():
            local = p.to_local()
            start = rank * -(-p.shape[0] // world)
            local.copy_(read(name, start, start + local.shape[0]))


def build_model(cfg, read, device, mesh, param_dtype, compute, checkpointing=False, trainable=True):
    """Build on the meta device, shard every block and then the root with FSDP2, allocate the local
    shards, fill them from the checkpoint. Parameters are kept in param_dtype, cast to compute."""
    with torch.device("meta"):
        model = M.Transformer(cfg).to(param_dtype)
    mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32) if compute != param_dtype \
        else MixedPrecisionPolicy()
    for block in model.layers:
        block.activation_checkpointing = checkpointing
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model.to_empty(device=device)
    model.reset_buffers()
    fill_parameters(model, read)
    model.requires_grad_(trainable)
    return model.train(trainable)


def count_parameters(cfg) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in M.Transformer(cfg).parameters())


# ----------------------------------------------------------------------------- data

def load_data(args, tokenizer):
    """Tokenized training and held-out pairs."""
    kw = dict(max_length=args.max_length, max_prompt_length=args.max_prompt_length,
              keep_identical=args.keep_identical, beta_column=args.beta_column or "beta")
    if args.data == "synthetic":
        train_rows, eval_rows = data.synthetic_rows(args.seed)
    else:
        train_rows = data.read_rows(args.data)
        eval_rows = data.read_rows(args.eval_data) if args.eval_data else []
    train, report = data.tokenize_rows(tokenizer, train_rows, args.template, **kw)
    if eval_rows:
        heldout, _ = data.tokenize_rows(tokenizer, eval_rows, args.template, **kw)
    else:  # hold out the first pairs of a seeded shuffle
        n = min(args.eval_pairs, len(train) // 10)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
        heldout, train = [train[i] for i in order[:n]], [train[i] for i in order[n:]]
    if args.beta_column and any(p["beta"] is None for p in train):
        raise data.DataError(f"{args.data}: --beta-column {args.beta_column}: some rows have no such column")
    if (args.curriculum == "margin" or args.sft_below_margin is not None) and any(p["margin"] is None for p in train):
        raise data.DataError(f"{args.data}: MixDPO needs score_chosen and score_rejected in every row")
    dropped = {k: v for k, v in report.items() if k not in ("rows", "pairs") and v}
    rank0_print(f"data: {report['pairs']} pairs of {report['rows']} rows" + (f" ({dropped})" if dropped else "")
                + f", {len(train)} for training, {len(heldout)} held out, template {args.template}")
    return train, heldout


def pad_id(cfg) -> int:
    eos = cfg.eos_token_id
    return (eos[0] if isinstance(eos, list) else eos) or 0


def row_seeds(seed: int, step: int, indices: list) -> list:
    """Seeds of the random token weights: one per (step, pair, answer), whatever the batch layout."""
    base = (seed * 1_000_003 + step) * 2**21
    return [base + 2 * i for i in indices] + [base + 2 * i + 1 for i in indices]


# ----------------------------------------------------------------------------- the run and its step

@dataclasses.dataclass
class Run:
    """What a training run holds."""
    args: argparse.Namespace
    device: torch.device
    obj: aao.Objective
    policy: M.Transformer  # FSDP-sharded, fp32 master weights
    reference: M.Transformer | None  # frozen, sharded; None once its log-probs are cached
    mlp: aao.ThresholdMLP | None  # Eq. 8, replicated; None unless aao weighting
    train_pairs: list
    heldout: list
    ref_train: list | None = None  # --precompute-ref caches
    ref_eval: list | None = None


def answer_states(model, batch, sum_logits=False) -> M.AnswerStates:
    """One forward pass, read at the answer tokens only (the logits are never made whole)."""
    return model(batch["input_ids"], answer_index=batch["answer_index"], sum_logits=sum_logits)


def to_device(batch: dict, device) -> dict:
    """Collated CPU tensors -> the device, with the flat index of the answer tokens among the predicted
    ones (computed here, on the host, so that the device never waits on a nonzero())."""
    batch = dict(batch, answer_index=batch["loss_mask"][:, 1:].flatten().nonzero().squeeze(1))
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return batch


def reference_logps(run: Run, batch, indices, cache):
    """The frozen reference's per-token log-probs (and top-1), live or from the precomputed cache."""
    if cache is None:
        with torch.no_grad():
            ref = answer_states(run.reference, batch)
        return ref.logps, ref.top1
    mask = batch["loss_mask"][:, 1:].bool()
    rows = [cache[i][0] for i in indices] + [cache[i][1] for i in indices]
    logps, top1 = torch.zeros(mask.shape, device=mask.device), torch.zeros(mask.shape, device=mask.device)
    logps[mask] = torch.cat([r[0] for r in rows]).to(mask.device)  # row-major order = the rows' order
    top1[mask] = torch.cat([r[1] for r in rows]).to(mask.device)
    return logps, top1


def pair_step(run: Run, pairs, indices, cache=None, step=0):
    """The objective on a micro-batch of pairs: (aao.ObjectiveOutput, the policy's AnswerStates, the
    reference's log-probs, mask, a, b) and the metrics."""
    batch = to_device(data.collate([pairs[i] for i in indices], pad_id(run.policy.config)), run.device)
    mask = batch["loss_mask"][:, 1:]
    aao_weighting = run.obj.weighting == "aao"
    states = answer_states(run.policy, batch, sum_logits=aao_weighting)
    ref_lp, ref_top1 = reference_logps(run, batch, indices, cache)
    a = b = None
    if aao_weighting:
        a, b = run.mlp(aao.pooled_answer_logits(states.logit_sums, mask))
    beta = batch["beta"].float() if run.args.beta_column else None
    out = aao.preference_objective(run.obj, states.logps, ref_lp, mask, beta=beta, embeds=states.embeds,
                                   hidden=states.hidden, a=a, b=b, margin=batch["margin"],
                                   seeds=row_seeds(run.args.seed, step, indices))
    real_tokens = batch["input_ids"].shape[1] - (batch["loss_mask"].flip(1).cumsum(1) == 0).sum(1)  # no padding
    metrics = {**aao.objective_metrics(out, mask, a, b), **squeeze_probe(states.top1, ref_top1, mask),
               "tokens": real_tokens.sum()}
    return out, (states, ref_lp, mask, a, b), {k: float(v) for k, v in metrics.items()}


def squeeze_probe(top1, ref_top1, mask) -> dict:
    """After Ren & Sutherland: the token-mean of max_v π(v | x, y_<t) at teacher-forced answer positions,
    on chosen and on rejected answers, for the policy and the reference. DPO's squeeze effect shows as
    the policy's top-1 probability falling below the reference's."""
    out = {}
    for name, lp in (("policy", top1), ("reference", ref_top1)):
        for side, l, m in zip(("chosen", "rejected"), aao.split_pairs(lp.detach()), aao.split_pairs(mask.bool())):
            out[f"squeeze/{name}_{side}_top1"] = float(l[m].exp().mean())
            out[f"squeeze/{name}_{side}_top1_logp"] = float(l[m].mean())
    return out


def train_step(run: Run, optimizer, indices: list, step: int) -> dict:
    """One optimizer step on this rank's share of a global batch: micro-batches with gradient accumulation,
    a check for a non-finite loss, clipping, AdamW. Returns the step's metrics over all ranks."""
    args, world = run.args, dist.get_world_size()
    chunks = data.micro_batches(indices, args.micro_batch_size)
    sums = {}
    for j, chunk in enumerate(chunks):
        run.policy.set_requires_gradient_sync(j == len(chunks) - 1)  # reduce once per step, not per micro-batch
        out, _, m = pair_step(run, run.train_pairs, chunk, run.ref_train, step)
        # Per pair of the global batch, not per micro-batch; FSDP then averages over the processes.
        (out.losses.sum() * world / args.batch_size).backward()
        accumulate(sums, m, len(chunk))
    stats = reduce_metrics(sums, len(indices))
    if not math.isfinite(stats["loss"]):
        where = ", ".join(run.train_pairs[i]["where"] for i in indices[:8]) + (", ..." if len(indices) > 8 else "")
        last = latest_checkpoint(Path(args.out))
        raise TrainingError(f"step {step + 1}: the loss is {stats['loss']} on the batch of pairs {where}; stopped "
                            "without an update" + (f", the last good checkpoint is {last}" if last else ""))
    stats["grad_norm"] = clip_gradients(run.policy, args.grad_clip)
    if run.mlp is not None:
        # Clip the threshold MLP apart from the policy: its gradient must not shrink the policy's step.
        average_gradients(run.mlp)
        stats["grad_norm/aw"] = clip_gradients(run.mlp, args.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stats


# ----------------------------------------------------------------------------- passes over a whole set

def rank_share(n: int, rank: int, world: int) -> list:
    """This rank's indices of n items for a pass in lockstep (FSDP gathers weights collectively, so every
    rank runs the same number of forwards): equal counts, padded with -1."""
    share = list(range(rank, n, world))
    return share + [-1] * (-(-n // world) - len(share))


@torch.no_grad()
def precompute_reference(reference, pairs, micro, device) -> list:
    """--precompute-ref: the reference's answer-token log-probs and top-1 log-probs for every pair, in one
    pass; each rank computes its share and all ranks gather the whole cache."""
    cache = {}
    for chunk in data.micro_batches(rank_share(len(pairs), dist.get_rank(), dist.get_world_size()), micro):
        real = [i for i in chunk if i >= 0] or [0]
        batch = to_device(data.collate([pairs[i] for i in real], pad_id(reference.config)), device)
        states = answer_states(reference, batch)
        logps, top1 = states.logps, states.top1
        mask = batch["loss_mask"][:, 1:].bool()
        for row, i in enumerate(real + real):
            cache.setdefault(i, [None, None])[row >= len(real)] = (logps[row][mask[row]].cpu(), top1[row][mask[row]].cpu())
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, cache)
    merged = {i: v for part in gathered for i, v in part.items()}
    return [merged[i] for i in range(len(pairs))]


@torch.no_grad()
def evaluate(run: Run) -> dict:
    """Held-out preference accuracy and margin by the plain (unweighted) DPO implicit reward: the margin is
    log π_θ/π_ref(y_w) - log π_θ/π_ref(y_l) in nats, without β, one yardstick for every loss and weighting.
    Also the squeeze probe, and for AAO the thresholds and token shares on held-out pairs."""
    run.policy.eval()
    sums, count = {}, 0.0
    for chunk in data.micro_batches(rank_share(len(run.heldout), dist.get_rank(), dist.get_world_size()),
                                    run.args.micro_batch_size):
        real = [i for i in chunk if i >= 0] or [0]
        _, (states, ref_lp, mask, _, _), m = pair_step(run, run.heldout, real, run.ref_eval)
        chosen, rejected = aao.split_pairs(((states.logps - ref_lp) * mask).sum(1))
        m = {k: v for k, v in m.items() if k.startswith(("squeeze/", "tokens/")) or k in ("a", "b", "loss")}
        m.update(accuracy=float(aao.preference_accuracy(chosen - rejected)), margin=float((chosen - rejected).mean()))
        weight = float(sum(i >= 0 for i in chunk))
        accumulate(sums, m, weight)
        count += weight
    run.policy.train()
    return {f"eval/{k}": v for k, v in reduce_metrics(sums, count).items()}


def reduce_metrics(sums: dict, count: float, totals=("tokens",)) -> dict:
    """Over every micro-batch of every rank: means of the pair-weighted sums, except `totals`, summed."""
    keys = sorted(sums)
    on = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces GPU tensors only
    total = torch.tensor([sums[k] for k in keys] + [count], dtype=torch.float64, device=on)
    dist.all_reduce(total)
    return {k: float(v if k in totals else v / total[-1]) for k, v in zip(keys, total[:-1])}


def accumulate(sums: dict, metrics: dict, weight: float, totals=("tokens",)) -> None:
    for k, v in metrics.items():
        sums[k] = sums.get(k, 0.0) + (v if k in totals else v * weight)


# ----------------------------------------------------------------------------- checkpoints

class TrainingError(RuntimeError):
    """A run that must stop (non-finite loss, nothing to resume); the message says where and why."""


def named_trainables(run: Run) -> dict:
    named = {f"policy.{n}": p for n, p in run.policy.named_parameters()}
    if run.mlp is not None:
        named.update({f"mlp.{n}": p for n, p in run.mlp.named_parameters()})
    return named


def local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def train_state_file(ckpt: Path, rank: int, world: int) -> Path:
    return ckpt / f"train-state-{rank:05d}-of-{world:05d}.safetensors"


def save_checkpoint(run: Run, optimizer, tokenizer, name: str, step: int) -> Path:
    """<out>/<name>/: the policy in Hugging Face layout (config.json, safetensors, tokenizer.json) and the
    training state: each rank's local shards of AdamW's moments, the step and the RNG, and in rank 0's file
    the threshold MLP with its moments (safetensors, no pickle). Written under a temporary name and renamed, so a kill
    never leaves half a checkpoint. The weights are the fp32 master weights: a resume continues exactly."""
    rank, world, out, weights = dist.get_rank(), dist.get_world_size(), Path(run.args.out), run.args.weights
    tmp, final = out / f".tmp-{name}", out / name
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    full = get_model_state_dict(run.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        M.save_state_dict(full, run.policy.config, tmp)
        tokenizer.save(str(tmp / "tokenizer.json"))
        for extra in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            source = Path(M.resolve_weights(weights)) / extra if weights != "tiny" else None
            if source and source.is_file():  # the chat template and stop tokens, for vLLM
                shutil.copy(source, tmp / extra)
        (tmp / "train_state.json").write_text(json.dumps({"step": step, "world_size": world}))
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    for pname, p in named_trainables(run).items():
        if pname.startswith("mlp.") and rank != 0:
            continue  # replicated and updated alike on every rank: one copy (~0.8 GB at Llama's vocabulary) is enough
        for k, v in optimizer.state.get(p, {}).items():
            tensors[f"optim/{pname}/{k}"] = local(v).detach().cpu().contiguous()
        if pname.startswith("mlp."):
            tensors[pname] = p.detach().cpu().contiguous()
    save_file(tensors, train_state_file(tmp, rank, world))
    dist.barrier()
    if rank == 0:
        old = out / f".old-{name}"
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def latest_checkpoint(out: Path):
    steps = {d: json.loads((d / "train_state.json").read_text())["step"]
             for d in out.glob("*") if d.is_dir() and not d.name.startswith(".") and (d / "train_state.json").is_file()}
    return max(steps, key=steps.get, default=None)


def load_train_state(run: Run, optimizer, ckpt: Path) -> int:
    """Restore what save_checkpoint wrote besides the weights; returns the step to continue from."""
    rank, world = dist.get_rank(), dist.get_world_size()
    meta = json.loads((ckpt / "train_state.json").read_text())
    if meta["world_size"] != world:
        raise TrainingError(f"{ckpt}: written by {meta['world_size']} processes, resumed with {world}: "
                            "resume with the same number of processes")
    tensors = load_file(train_state_file(ckpt, rank, world))
    if rank != 0:  # the replicated threshold MLP and its moments are in rank 0's file only
        with safe_open(train_state_file(ckpt, 0, world), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys() if k.startswith(("mlp.", "optim/mlp."))})
    for pname, p in named_trainables(run).items():
        if pname.startswith("mlp."):
            with torch.no_grad():
                p.copy_(tensors[pname])
        state = {k.rsplit("/", 1)[1]: v.to(p.device) for k, v in tensors.items() if k.startswith(f"optim/{pname}/")}
        for k, v in state.items():  # the moments are sharded like their parameter; the step count is not
            if k != "step" and isinstance(p, DTensor):
                state[k] = DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                                              run_check=False)
        if state:
            optimizer.state[p] = state
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    return meta["step"]


# ----------------------------------------------------------------------------- optimization

def make_optimizer(policy, mlp, args):
    """AdamW, policy at --lr (no weight decay on norms), the threshold MLP at its own --aw-lr: the policy's
    5e-7 would leave a freshly initialized MLP where it started."""
    params = list(policy.parameters())
    groups = [{"params": [p for p in params if p.ndim >= 2], "lr": args.lr, "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "lr": args.lr, "weight_decay": 0.0}]
    if mlp is not None:
        groups.append({"params": list(mlp.parameters()), "lr": args.aw_lr, "weight_decay": 0.0})
    for g in groups:
        g["base_lr"] = g["lr"]
    # fused: one kernel for all tensors, 5x faster than foreach on this CPU; it keeps the update of the
    # threshold MLP's 16M-65M parameters inside AAO's budget of a few percent over DPO.
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, fused=True)


def average_gradients(module) -> None:
    """The replicated threshold MLP: average its gradients over the processes, as FSDP does the policy's."""
    if dist.get_world_size() > 1:
        for p in module.parameters():
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def clip_gradients(module, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)  # FSDP: a DTensor


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def peak_flops(device) -> float | None:
    """Dense bf16 peak of one GPU, for MFU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    table = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "B200": 2250e12, "A100": 312e12, "A800": 312e12,
             "L40S": 362e12, "L4": 121e12, "A10": 125e12}
    return next((v for k, v in table.items() if k in name), None)


# ----------------------------------------------------------------------------- the training run

def build_run(args, device, mesh, tokenizer, resume_from) -> Run:
    """Data, policy, reference, threshold MLP: everything a run trains with."""
    weights = M.resolve_weights(args.weights)
    cfg, read_weights = model_source(weights, tokenizer.get_vocab_size(), args.seed)
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise M.CheckpointError(f"{weights}: tokenizer.json has {tokenizer.get_vocab_size()} tokens, "
                                f"config.json's vocab_size is {cfg.vocab_size}: they do not belong together")
    train_pairs, heldout = load_data(args, tokenizer)
    dtype = compute_dtype(args, device)
    start_weights = read_weights if resume_from is None else model_source(str(resume_from), 0, 0)[1]
    obj = aao.Objective(loss=args.loss, weighting=args.weighting, beta=args.beta,
                        label_smoothing=args.label_smoothing, gamma=args.simpo_gamma, alpha=args.alpha,
                        lambda_c=args.lambda_c, lambda_r=args.lambda_r, reward_length_normalized=not args.reward_sum,
                        sft_below_margin=args.sft_below_margin)
    run = Run(args, device, obj, policy=build_model(cfg, start_weights, device, mesh, torch.float32, dtype,
                                                    args.activation_checkpointing),
              reference=build_model(cfg, read_weights, device, mesh, dtype, dtype, trainable=False),
              mlp=None, train_pairs=train_pairs, heldout=heldout)
    if obj.weighting == "aao":
        # Replicated, not sharded: vocab x 512 is 0.8% of an 8B model, and FSDP's gathers and copies cost
        # more than its update (x2.7 on a CPU). Seeded: the same MLP whatever the number of processes.
        torch.manual_seed(args.seed)
        run.mlp = aao.ThresholdMLP(cfg.vocab_size).to(device)
    if args.precompute_ref:
        run.ref_train = precompute_reference(run.reference, train_pairs, args.micro_batch_size, device)
        run.ref_eval = precompute_reference(run.reference, heldout, args.micro_batch_size, device)
        run.reference = None
        rank0_print(f"reference log-probs cached for {len(train_pairs) + len(heldout)} pairs; reference freed")
    rank0_print(f"training {count_parameters(cfg) / 1e6:.1f}M parameters with {args.loss} + {args.weighting} "
                f"weighting on {dist.get_world_size()} x {device.type} ({str(dtype).split('.')[1]})")
    return run


def train(args, device, mesh) -> dict:
    """The run: evaluate, then for every step train, log, evaluate and save; the final checkpoint and the
    token-weight page at the end. Returns the held-out metrics before and after."""
    rank, out = dist.get_rank(), Path(args.out)
    resume_from = latest_checkpoint(out) if args.resume else None
    if args.resume and resume_from is None:
        raise TrainingError(f"--resume {args.resume}: no checkpoint there to continue from")
    if not args.resume and out.is_dir() and latest_checkpoint(out):
        raise TrainingError(f"{out} already holds a run: continue it with --resume {out}, or choose another --out")
    tokenizer = data.tiny_tokenizer() if args.weights == "tiny" else M.load_tokenizer(M.resolve_weights(args.weights))
    run = build_run(args, device, mesh, tokenizer, resume_from)
    sampler = data.PairSampler(len(run.train_pairs), args.batch_size, args.seed, rank, dist.get_world_size(),
                               [p["margin"] for p in run.train_pairs] if args.curriculum == "margin" else None)
    total = int(args.epochs * sampler.steps_per_epoch)
    total = min(total, args.max_steps) if args.max_steps else total
    warmup = max(1, round(args.warmup * total))
    optimizer = make_optimizer(run.policy, run.mlp, args)
    start = load_train_state(run, optimizer, resume_from) if resume_from else 0
    metrics_file, eval_file = out / "metrics.jsonl", out / "eval.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps({k: v for k, v in vars(args).items() if k != "resume"}, indent=1))
        for f in (metrics_file, eval_file):  # a killed run may have logged steps past its last checkpoint
            rows = [r for r in f.read_text().splitlines() if json.loads(r)["step"] <= start] if resume_from and f.exists() else []
            f.write_text("".join(r + "\n" for r in rows))
    rank0_print(f"{total} steps of {args.batch_size} pairs" + (f", resuming from {resume_from} at step {start}" if resume_from else ""))

    def log_eval(step):
        ev = evaluate(run) if run.heldout else {}
        if rank == 0 and ev:
            with eval_file.open("a") as f:
                f.write(json.dumps({"step": step, **ev}) + "\n")
        return ev

    first_eval = log_eval(0) if start == 0 else {}
    n_params, peak = count_parameters(run.policy.config), peak_flops(device)
    bar = tqdm(range(start, total), initial=start, total=total, disable=rank != 0 or args.quiet, desc="train",
               dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(step, total, warmup)
        stats = train_step(run, optimizer, sampler.batch(step), step)
        dt = time.perf_counter() - t0
        tokens = stats.pop("tokens")
        row = {"step": step + 1, **stats, "lr": optimizer.param_groups[0]["lr"], "tokens_per_s": tokens / dt}
        if peak:  # 6N per token for the policy's forward and backward, 2N for the reference's forward
            row["mfu"] = (6 + 2 * (run.reference is not None)) * n_params * tokens / dt / (peak * dist.get_world_size())
        if (step + 1) % args.eval_every == 0 or step + 1 == total:
            row.update(log_eval(step + 1))
        if rank == 0:
            with metrics_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['rewards/accuracy']:.2f}")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total:
            save_checkpoint(run, optimizer, tokenizer, f"step-{step + 1}", step + 1)
    bar.close()
    final = save_checkpoint(run, optimizer, tokenizer, "final", total)
    if run.obj.weighting == "aao" and run.heldout:
        write_weights_page(run, tokenizer, out / "weights.html")
    last_eval = json.loads(eval_file.read_text().splitlines()[-1]) if rank == 0 and eval_file.exists() else {}
    if rank == 0 and last_eval:
        before = f"{first_eval['eval/accuracy']:.3f} before, " if first_eval else ""
        print(f"held-out preference accuracy: {before}{last_eval['eval/accuracy']:.3f} after "
              f"({len(run.heldout)} pairs; log-ratio margin {last_eval['eval/margin']:.2f} nats)")
        print(f"output: {final} (Hugging Face layout), {metrics_file}, {eval_file}"
              + (f", {out / 'weights.html'}" if (out / "weights.html").exists() else ""))
    return {"first": first_eval, "last": last_eval}


# ----------------------------------------------------------------------------- the token-weight page

WEIGHT_PAGE_STYLE = """body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;line-height:1.9}
.t{padding:1px 0;border-radius:3px;white-space:pre-wrap}.ambiguous{background:#e0e0e0;color:#888}
.transitional{background:#fff6c8}.key{background:#7dd87d;font-weight:600}.pair{margin:1.5em 0}
.who{display:inline-block;width:6em;color:#555}small{color:#666}"""


@torch.no_grad()
def write_weights_page(run: Run, tokenizer, path: Path, n: int = 12) -> None:
    """A page that shows, for a few held-out pairs, every answer token coloured by its AAO category
    (Eq. 16's hard thresholds on the learned a, b), with S and the weight of Eq. 17 on hover."""
    indices = list(range(min(n, len(run.heldout))))
    out, (_, _, mask, a, b), _ = pair_step(run, run.heldout, indices, run.ref_eval)  # every rank: FSDP gathers
    if dist.get_rank() != 0:
        return
    ids = data.collate([run.heldout[i] for i in indices], 0)["input_ids"][:, 1:]
    S, w, mask = out.similarity.cpu(), out.weights.cpu(), mask.cpu().bool()
    a, b = a.cpu().repeat(2), b.cpu().repeat(2)
    blocks = []
    for k, i in enumerate(indices):
        lines = []
        for row, who in ((k, "chosen"), (k + len(indices), "rejected")):
            spans = []
            for t in mask[row].nonzero().flatten().tolist():
                s = float(S[row, t])
                kind = "ambiguous" if s > a[row] else "key" if s < b[row] else "transitional"
                text = html.escape(tokenizer.decode([int(ids[row, t])], skip_special_tokens=False))
                spans.append(f'<span class="t {kind}" title="{kind}: S={s:.3f}, w={float(w[row, t]):.3f}">{text}</span>')
            lines.append(f'<div><span class="who">{who}</span>{"".join(spans)}</div>')
        prompt = html.escape(tokenizer.decode(run.heldout[i]["prompt_ids"], skip_special_tokens=True))
        blocks.append(f'<div class="pair"><small>{prompt} &nbsp; (a={a[k]:.3f}, b={b[k]:.3f})</small>{"".join(lines)}</div>')
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>AAO token weights</title>
<style>{WEIGHT_PAGE_STYLE}</style></head><body><h1>AAO token weights</h1>
<p>Held-out pairs from {html.escape(str(run.args.data))}, weighed by the trained policy and threshold MLP.
<span class="t ambiguous">ambiguous</span> (S &gt; a, weight (1&minus;S)&sup2;, suppressed),
<span class="t transitional">transitional</span> (b &le; S &le; a, weight 1),
<span class="t key">key</span> (S &lt; b, weight 1+S, emphasized). Hover a token for S and its weight.</p>
{"".join(blocks)}</body></html>""", encoding="utf-8")


# ----------------------------------------------------------------------------- the benchmark

# A Llama-3-shaped model small enough for a CPU: GQA, llama3 rope, Mistral's 32,000 vocabulary (the
# paper's 62.50 MB threshold MLP). --weights DIR benchmarks a real checkpoint instead.
BENCH_CONFIG = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                    num_key_value_heads=2, vocab_size=32000, max_position_embeddings=4096, rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 1024}, bos_token_id=1, eos_token_id=2)


def paired_timings(fns: dict, reps: int, device) -> dict:
    """Time two variants in adjacent pairs, the order alternating (ABBA). Returns each variant's fastest
    and median seconds and the quartiles of the per-pair ratios first/second: a slow moment of the machine
    hits both sides of a pair, the median ratio is robust to a single lucky run, and the spread says how
    noisy the machine was."""
    def seconds(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0
    names = list(fns)
    for fn in fns.values():  # warm up: allocator, optimizer state
        fn()
        fn()
    times, ratios = {k: [] for k in names}, []
    for i in range(reps):
        for k in (names if i % 2 == 0 else names[::-1]):
            times[k].append(seconds(fns[k]))
        ratios.append(times[names[0]][-1] / times[names[1]][-1])
    quartiles = lambda xs: [sorted(xs)[round(q * (len(xs) - 1))] for q in (0.25, 0.5, 0.75)]
    out = {f"fastest_s/{k}": min(t) for k, t in times.items()} | {f"median_s/{k}": quartiles(t)[1] for k, t in times.items()}
    return out | {"ratio_quartiles": quartiles(ratios)}


def benchmark(args, device, mesh, length=512, pairs_per_step=2, reps=15) -> dict:
    """Step time, tokens/s and peak memory of a training step (policy forward and backward, reference
    forward, AdamW) with plain DPO and with AAO; AAO's extra work timed directly (objective_timings) and
    as whole steps; our forward+backward against transformers' on the same checkpoint. Written to
    <out>/benchmark.json."""
    weights = str(Path(args.out) / "bench-model") if args.weights == "tiny" else M.resolve_weights(args.weights)
    if args.weights == "tiny" and dist.get_rank() == 0:
        M.save_model(M.init_weights(M.Transformer(M.ModelConfig(**BENCH_CONFIG)), args.seed), weights)
    dist.barrier()
    cfg, read = model_source(weights, 0, args.seed)
    dtype = compute_dtype(args, device)
    g = torch.Generator().manual_seed(args.seed)
    fake = [{name: torch.randint(3, cfg.vocab_size, (length // 2,), generator=g).tolist()
             for name in ("prompt_ids", "chosen_ids", "rejected_ids")} | {"margin": None, "beta": None}
            for _ in range(pairs_per_step)]
    torch.manual_seed(args.seed)
    run = Run(args, device, aao.Objective(), build_model(cfg, read, device, mesh, torch.float32, dtype,
                                                         args.activation_checkpointing),
              build_model(cfg, read, device, mesh, dtype, dtype, trainable=False),
              aao.ThresholdMLP(cfg.vocab_size).to(device), train_pairs=fake, heldout=[])
    steps = {}
    for weighting in ("aao", "none"):
        variant = dataclasses.replace(run, obj=aao.Objective(loss=args.loss, weighting=weighting))
        optimizer = make_optimizer(run.policy, run.mlp if weighting == "aao" else None, args)

        def step(variant=variant, optimizer=optimizer):
            out, _, _ = pair_step(variant, fake, list(range(pairs_per_step)))
            out.losses.mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        steps[weighting] = step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timings = paired_timings(steps, reps, device)
    tokens = 2 * pairs_per_step * length * dist.get_world_size()
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x {torch.get_num_threads()} threads",
              "parameters": count_parameters(cfg), "tokens_per_step": tokens, "dtype": str(dtype).split(".")[1]}
    for k in steps:
        result[f"step_s/{k}"] = timings[f"fastest_s/{k}"]
        result[f"tokens_per_s/{k}"] = tokens / timings[f"fastest_s/{k}"]
        result[f"step_s_median/{k}"] = timings[f"median_s/{k}"]
    objective = objective_timings(run, fake, device, reps=4 * reps)
    result["aao_extra_s"] = objective["fastest_s/aao"] - objective["fastest_s/none"]
    result["aao_over_dpo"] = 1 + result["aao_extra_s"] / result["step_s/none"]
    result["aao_over_dpo_whole_steps"] = timings["ratio_quartiles"]
    result["peak_memory_gib"] = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                                 else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    result.update(forward_backward_vs_transformers(weights, cfg, device, dtype, length, pairs_per_step, reps))
    if dist.get_rank() == 0:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "benchmark.json").write_text(json.dumps(result, indent=1))
        for k, v in result.items():
            text = f"{v:.4g}" if isinstance(v, float) else " ".join(f"{x:.3f}" for x in v) if isinstance(v, list) else v
            print(f"{k:34s} {text}")
    return result


def objective_timings(run: Run, pairs, device, reps) -> dict:
    """The objective alone, on the tensors of one forward pass: aao.preference_objective and its backward
    to those tensors, for aao with the threshold MLP's forward, backward and AdamW update. What AAO adds
    to a step is this difference; short and repeatable, it measures that far more precisely than whole
    steps can on a noisy machine."""
    batch = to_device(data.collate(pairs, pad_id(run.policy.config)), device)
    mask = batch["loss_mask"][:, 1:]
    with torch.no_grad():
        states = answer_states(run.policy, batch, sum_logits=True)
        logps, logit_sums, embeds, hidden = states.logps, states.logit_sums, states.embeds, states.hidden
        ref_logps = answer_states(run.reference, batch).logps
    optimizer = torch.optim.AdamW(run.mlp.parameters(), fused=True)

    def objective(weighting):
        lp, h = logps.detach().requires_grad_(), hidden.detach().requires_grad_()
        obj = aao.Objective(loss=run.args.loss, weighting=weighting)
        a, b = run.mlp(aao.pooled_answer_logits(logit_sums, mask)) if weighting == "aao" else (None, None)
        out = aao.preference_objective(obj, lp, ref_logps, mask, embeds=embeds, hidden=h, a=a, b=b)
        aao.objective_metrics(out, mask, a, b)
        out.losses.mean().backward()
        if weighting == "aao":
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return paired_timings({"aao": lambda: objective("aao"), "none": lambda: objective("none")}, reps, device)


def forward_backward_vs_transformers(weights, cfg, device, dtype, length, pairs_per_step, reps) -> dict:
    """One forward+backward (cross-entropy over the sequence) of our model and of transformers' on the
    same checkpoint and batch, single process; {} when transformers is not installed."""
    try:
        import transformers
    except ImportError:
        return {}
    ours = M.load_model(weights, device=device, dtype=dtype)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(weights, dtype=dtype, attn_implementation="sdpa").to(device)
    ids = torch.randint(0, cfg.vocab_size, (2 * pairs_per_step, length), generator=torch.Generator().manual_seed(0)).to(device)

    def fwd_bwd(model, hf):
        logits = model(ids).logits if hf else model(ids)
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
    t = paired_timings({"ours": lambda: fwd_bwd(ours, False), "transformers": lambda: fwd_bwd(theirs, True)}, reps, device)
    return {"fwd_bwd_s/ours": t["median_s/ours"], "fwd_bwd_s/transformers": t["median_s/transformers"],
            "ours_over_transformers": t["ratio_quartiles"][1], "ours_over_transformers_quartiles": t["ratio_quartiles"]}


# ----------------------------------------------------------------------------- the small-scale experiment

EXPERIMENT = [("DPO", ["--loss", "dpo", "--weighting", "none"]), ("DPO-Random", ["--loss", "dpo", "--weighting", "random"]),
              ("AAO", ["--loss", "dpo", "--weighting", "aao"]),
              ("AAO, no auxiliary losses", ["--loss", "dpo", "--weighting", "aao", "--lambda-c", "0", "--lambda-r", "0"]),
              ("SimPO", ["--loss", "simpo", "--weighting", "none"]),
              ("SimPO + AAO", ["--loss", "simpo", "--weighting", "aao"])]
EXPERIMENT_COLUMNS = [("eval/accuracy", "held-out accuracy", 3), ("eval/margin", "log-ratio margin (nats)", 2),
                      ("eval/squeeze/policy_chosen_top1", "top-1 p, chosen", 3),
                      ("eval/squeeze/policy_rejected_top1", "top-1 p, rejected", 3), ("eval/a", "a", 2), ("eval/b", "b", 2)]


def experiment(args, device, mesh) -> str:
    """The paper's proof of concept at laptop size: every method of EXPERIMENT on the tiny model and the
    synthetic set, same steps, seeds 0..n-1; prints and writes a table of held-out metrics, mean ± sd."""
    out = Path(args.out) / "experiment"
    if out.exists():
        raise TrainingError(f"{out} exists: remove it, or choose another --out")
    results, t0 = {}, time.perf_counter()
    for name, flags in EXPERIMENT:
        for seed in range(args.experiment_seeds):
            slug = name.lower().replace(" + ", "-").replace(", ", "-").replace(" ", "-")
            run_args = parse_args(["--weights", args.weights, "--data", args.data, "--out", str(out / f"{slug}-seed{seed}"),
                                   "--seed", str(seed), "--quiet", *flags]
                                  + (["--max-steps", str(args.max_steps)] if args.max_steps else []))
            results.setdefault(name, []).append(train(run_args, device, mesh)["last"])
            rank0_print(f"{name}, seed {seed}: held-out accuracy {results[name][-1].get('eval/accuracy', float('nan')):.3f}"
                        f" ({time.perf_counter() - t0:.0f} s)")
    lines = ["| method | " + " | ".join(c[1] for c in EXPERIMENT_COLUMNS) + " |", "|---" * (len(EXPERIMENT_COLUMNS) + 1) + "|"]
    for name, runs in results.items():
        cells = []
        for key, _, digits in EXPERIMENT_COLUMNS:
            values = torch.tensor([r[key] for r in runs if key in r], dtype=torch.float64)
            sd = float(values.std()) if len(values) > 1 else 0.0
            cells.append(f"{values.mean():.{digits}f} ± {sd:.{digits}f}" if len(values) else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ref = results["DPO"][0]
    table = "\n".join(lines) + (f"\n\nReference model top-1 p: chosen {ref['eval/squeeze/reference_chosen_top1']:.3f}, "
                                f"rejected {ref['eval/squeeze/reference_rejected_top1']:.3f}. {args.experiment_seeds} "
                                f"seeds, {time.perf_counter() - t0:.0f} s in all.")
    if dist.get_rank() == 0:
        (out / "table.md").write_text(table + "\n")
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(table)
    return table


# ----------------------------------------------------------------------------- entry point

def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world, device, mesh = setup_distributed()
    code = 0
    try:
        if args.benchmark:
            benchmark(args, device, mesh)
        elif args.experiment:
            experiment(args, device, mesh)
        else:
            train(args, device, mesh)
    except (M.CheckpointError, data.DataError, TrainingError) as e:
        print(f"error{f' (rank {rank})' if world > 1 else ''}: {e}", file=sys.stderr, flush=True)
        code = 1
    sys.stdout.flush()
    if "RANK" in os.environ:
        os._exit(code)  # gloo's destroy_process_group aborts a rank now and then after all work is done
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
