"""Memory per GPU and time per epoch of train.py on Llama-3.1-8B, computed (not measured) from the
model's shapes, what FSDP2 and the trainer keep, and stated assumptions: docs/8-gpus.md's figures.

    python experiments/scale_estimate.py            # prints the tables of docs/8-gpus.md

Peak memory per GPU, in bytes, with P parameters sharded over S ranks and fp32 master weights:
  sharded state     4P/S weights + 4P/S gradients + 8P/S AdamW moments (+ 2P/S the bf16 reference)
  threshold MLP     replicated: vocab x 512 (+ 1,026) parameters, 16 B each (fp32 weight, gradient
                    and two moments)
  gathered root     the policy's embedding and head (bf16), gathered from forward to backward's end
  activations       per token and layer, what autograd keeps (bf16, measured with saved-tensor
                    hooks): each RMSNorm's fp32 input, its bf16 normalized tensor and its bf16
                    output (8D each), q, k, v and the attention output (4D + 4·kv), o_proj's input
                    (2D), the SwiGLU's gate, up, silu(gate) and product (8F); with activation
                    checkpointing the block's input (2D) plus one block recomputed at a time
  during backward   beside the activations: the head's full bf16 weight gradient (its custom
                    backward writes it whole; FSDP reduce-scatters the root's gradients only at the
                    end), and the larger of the chunked head's blocks (model.HEAD_CHUNK_GPU
                    elements on a GPU: an fp32 block of logits, its bf16 product and bf16 cast)
                    and two gathered blocks
                    (FSDP2 prefetches the next) with a block's bf16 gradient and its fp32 copy for
                    the reduce-scatter
  end of backward   the activations are freed; the root's bf16 gradients and their fp32 copy for the
                    reduce-scatter (6 bytes a root parameter)
  reference forward runs after the policy's, beside its activations: its root and two of its blocks
  TDPO              + the reference's head weight, gathered once (bf16, vocab x D), + its
                    hidden states at the answer tokens (bf16), saved for the sequential KL's
                    backward, + during backward a second whole bf16 head gradient (the KL's, before
                    autograd adds it to the head's); the KL's blocks are AnswerHead's, two half
                    blocks at a time: no whole logits of either model. --precompute-ref caches those
                    hidden states for every answer token of the data set, on every process's host
  KTO               no more memory (its mismatched forwards run without gradient, before the
                    policy's), but two more forwards a micro-batch: the policy's and the reference's
The peak is the state plus the largest of the three phases. Not counted: the CUDA context (~2 GB)
and the caching allocator's fragmentation (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True keeps it
small). Time per epoch: model FLOPs as train.py's MFU counts them, at an assumed MFU, against the
time the FSDP collectives take at assumed bandwidths, once per micro-batch (train.py reduce-scatters
every micro-batch); a step takes the longer of the two (FSDP overlaps them).

LoRA on one GPU (--lora-rank, no FSDP: a plain module): the frozen base in bf16 (2P, no gradient,
no optimizer state), the adapters 16 B a parameter (fp32 weight, gradient, two moments), the
threshold MLP as above, no reference copy (the base is the reference), no head gradient (a frozen
head's is not computed). Activations as above (autograd keeps a projection's input for its
adapter's A instead of for its weight: the same tensor; measured with saved-tensor hooks: 11.2 kB a
token for a LoRA block vs 12.7 kB for a trained one at D 256), plus each adapter's rank-wide
intermediate (bf16), and the chunked head's blocks in backward. --lora-dropout > 0 adds a dropped
copy of each projection's input; the default 0 does not. "Fits" adds the CUDA context's ~2 GB.
One GPU's epoch: the same FLOPs less the base's weight gradients, at the same MFU.
"""

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import model as M  # noqa: E402

GB = 1e9
# Llama-3.1-8B's config.json
LLAMA31_8B = M.ModelConfig(
    hidden_size=4096,
    intermediate_size=14_336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128_256,
)


class Llama:
    """A config's shapes under short names, with the parameter counts the trainer's MFU uses."""

    def __init__(self, cfg: M.ModelConfig = LLAMA31_8B):
        self.cfg, self.vocab, self.dim, self.layers = (
            cfg,
            cfg.vocab_size,
            cfg.hidden_size,
            cfg.num_hidden_layers,
        )
        self.heads, self.kv_heads, self.ffn = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.intermediate_size,
        )
        blocks, _, self.params = M.parameter_counts(cfg)
        self.block = (blocks - self.dim) // self.layers  # one block: attention, MLP, two norms


# Assumptions, stated: UltraFeedback binarized train_prefs has 61,135 pairs; with Llama 3's
# tokenizer and the 1,024-token cut a prompt is ~165 tokens and an answer ~300; micro-batches are
# packed (data.pack): the prompt runs through the layers once, then both answers, 765 tokens a pair
# with no padding; 40% MFU of an H100 SXM's 989 TFLOP/s dense bf16; collective bandwidth per GPU
# 360 GB/s in a node (NVLink) and 45 GB/s between nodes (one 400 Gb/s NIC per GPU).
PAIRS, PROMPT_TOKENS, ANSWER_TOKENS = 61_135, 165, 300
MFU, PEAK, NVLINK, NETWORK = 0.40, 989e12, 360 * GB, 45 * GB
PAIR_SEGMENTS = [(PROMPT_TOKENS, PROMPT_TOKENS, 0)] + [
    (ANSWER_TOKENS, PROMPT_TOKENS + ANSWER_TOKENS, ANSWER_TOKENS)
] * 2


def memory_per_gpu(
    m: Llama,
    shards: int,
    micro_pairs: int,
    checkpointing: bool,
    live_reference: bool,
    seq: int = 1024,
    tdpo: bool = False,
) -> float:
    state = (16 + 2 * live_reference) * m.params / shards
    mlp = 16 * (m.vocab * 512 + 1026)
    root_params = m.vocab * m.dim * (1 if m.cfg.tie_word_embeddings else 2)
    root = 2 * root_params
    activations = activation_bytes(m, micro_pairs, checkpointing, seq)
    head_blocks = (4 + 2 + 2) * M.HEAD_CHUNK_GPU
    blocks = 2 * 2 * m.block + 6 * m.block
    backward = activations + 2 * m.vocab * m.dim + max(head_blocks, blocks)
    if tdpo:  # the reference's head and states at the answer tokens; the KL's head gradient
        root += 2 * m.vocab * m.dim + 2 * micro_pairs * (seq - PROMPT_TOKENS) * 2 * m.dim
        backward += 2 * m.vocab * m.dim
    end_of_backward = 6 * root_params
    reference_forward = activations + ((root + 2 * 2 * m.block) if live_reference else 0)
    return state + mlp + root + max(backward, end_of_backward, reference_forward)


def activation_bytes(m: Llama, micro_pairs: int, checkpointing: bool, seq: int, extra: int = 0):
    """What autograd keeps of the blocks for backward (bf16), per micro-batch of pairs: every
    layer's activations, or with checkpointing each block's input and one block's recompute. extra:
    more bytes per token and layer (LoRA's)."""
    kv = m.kv_heads * m.dim // m.heads
    per_token_layer = 22 * m.dim + 4 * kv + 8 * m.ffn + extra
    tokens = 2 * micro_pairs * seq
    if checkpointing:
        return tokens * (m.layers * 2 * m.dim + per_token_layer)
    return tokens * m.layers * per_token_layer


@functools.cache
def adapter_parameters(m: Llama, rank: int) -> int:
    """LoRA's A and B on every projection of every block (model.LORA_TARGETS), counted on the
    model train.py builds."""
    with M.torch.device("meta"):
        model = M.add_adapters(M.Transformer(m.cfg), M.LoRAConfig(rank, 2.0 * rank))
    return sum(p.numel() for n, p in model.named_parameters() if M.is_adapter(n))


def lora_memory(m: Llama, rank: int, micro_pairs: int, checkpointing: bool, seq: int = 1024):
    """Peak bytes of a LoRA run on one GPU: the terms of the module docstring."""
    base = 2 * m.params
    adapters = 16 * adapter_parameters(m, rank)
    mlp = 16 * (m.vocab * 512 + 1026)
    # each target's bf16 input to A (dropout's) and A's output, per token and layer
    lora_inputs = 2 * rank * len(M.LORA_TARGETS)
    activations = activation_bytes(m, micro_pairs, checkpointing, seq, lora_inputs)
    head_blocks = (4 + 2 + 2) * M.HEAD_CHUNK_GPU
    return base + adapters + mlp + activations + head_blocks


def lora_pair_flops(m: Llama, checkpointing: bool) -> float:
    """pair_flops of a LoRA run: the live reference's forward, but no weight gradient of the frozen
    base (2 of the 6 FLOPs a parameter and token); the adapters' own FLOPs are negligible."""
    blocks, head, _ = M.parameter_counts(m.cfg)
    weight_gradients = sum(2 * (blocks * q + head * n) for q, _, n in PAIR_SEGMENTS)
    return pair_flops(m, True, checkpointing) - weight_gradients


def pair_flops(m: Llama, live_reference: bool, checkpointing: bool) -> float:
    """What train.py's MFU counts (model.training_flops) for a packed pair of assumed lengths, plus
    what activation checkpointing recomputes (the blocks' forward): not in MFU, but takes time."""
    counted = M.training_flops(m.cfg, PAIR_SEGMENTS, live_reference)
    recompute = sum(
        2 * m.layers * m.block * q + 4 * m.layers * m.dim * q * k for q, k, _ in PAIR_SEGMENTS
    )
    return counted + recompute * checkpointing


def epoch_minutes(
    m: Llama,
    gpus_per_node: int,
    nodes: int,
    replicate: bool,
    batch_pairs: int = 16,
    micro_pairs: int = 2,
    checkpointing: bool = False,
    live_reference: bool = True,
) -> float:
    gpus = gpus_per_node * nodes
    steps = PAIRS // batch_pairs
    micro_batches = max(1, batch_pairs // (gpus * micro_pairs))  # FSDP gathers and reduces for each
    compute = batch_pairs * pair_flops(m, live_reference, checkpointing) / (gpus * PEAK * MFU)
    shards = gpus_per_node if replicate else gpus
    # Per GPU and micro-batch: the policy gathered in forward and in backward (bf16), its gradients
    # reduce-scattered (fp32), the reference gathered once (bf16): 2 + 2 + 4 + 2 bytes a parameter.
    gathers = (10 - 2 * (not live_reference)) * m.params * (shards - 1) / shards
    link = NVLINK if nodes == 1 or replicate else NETWORK
    communication = gathers / link
    # HSDP: the fp32 gradient shards all-reduced between the node replicas
    if replicate and nodes > 1:
        communication += 2 * 4 * m.params / shards * (nodes - 1) / nodes / NETWORK
    return steps * max(compute, micro_batches * communication) / 60


def main() -> None:
    m = Llama()
    print(
        f"Llama-3.1-8B: {m.params / 1e9:.2f}B parameters; "
        f"threshold MLP {(m.vocab * 512 + 1026) / 1e6:.1f}M\n"
    )
    print(
        "| micro-batch (pairs per GPU) | activation checkpointing | reference live "
        "| reference precomputed |"
    )
    print("|---|---|---|---|")
    for micro in (1, 2, 4, 8):
        for ac in (False, True):
            live = memory_per_gpu(m, 8, micro, ac, True) / GB
            cached = memory_per_gpu(m, 8, micro, ac, False) / GB
            print(f"| {micro} | {'yes' if ac else 'no'} | {live:.0f} GB | {cached:.0f} GB |")
    print("\n| micro-batch (pairs per GPU) | activation checkpointing | TDPO, reference live |")
    print("|---|---|---|")
    for micro in (1, 2, 4, 8):
        for ac in (False, True):
            tdpo = memory_per_gpu(m, 8, micro, ac, True, tdpo=True) / GB
            print(f"| {micro} | {'yes' if ac else 'no'} | {tdpo:.0f} GB |")
    cache = PAIRS * 2 * ANSWER_TOKENS * m.dim * 2
    head = 2 * m.vocab * m.dim
    print(
        f"\nTDPO with --precompute-ref: the reference's hidden states at every answer token, "
        f"{cache / GB:.0f} GB (bf16) on the host of every process, + its head {head / GB:.2f} GB"
    )
    print("\n| GPUs | sharding | minutes per epoch, batch 16 | batch 64 |")
    print("|---|---|---|---|")
    for nodes, replicate, name in (
        (1, False, "FSDP over 8"),
        (2, False, "FSDP over 16 (flat)"),
        (2, True, "HSDP: --replicate 2"),
    ):
        t16 = epoch_minutes(m, 8, nodes, replicate)
        t64 = epoch_minutes(m, 8, nodes, replicate, batch_pairs=64)
        print(f"| {8 * nodes} | {name} | {t16:.0f} | {t64:.0f} |")
    print_lora_table(m)
    ckpt = (4 + 8) * m.params + 16 * (m.vocab * 512 + 1026)
    print(
        f"\nstep-N/ (fp32 weights + AdamW moments, sharded): {ckpt / GB:.0f} GB; final/ bf16 "
        f"{2 * m.params / GB:.0f} GB, fp32 {4 * m.params / GB:.0f} GB"
    )


def print_lora_table(m: Llama) -> None:
    """LoRA rows: one GPU, peak memory by rank, micro-batch and checkpointing, which GPU sizes it
    fits (with the CUDA context), and minutes per epoch on one GPU (batch 16, the assumed MFU)."""
    print("\nLoRA on one GPU (--lora-rank; bf16 base, its own reference):\n")
    print("| rank | adapters | micro-batch (pairs) | activation checkpointing | peak | fits on |")
    print("|---|---|---|---|---|---|")
    for rank in (16, 64):
        n = adapter_parameters(m, rank) / 1e6
        for micro, ac in ((1, False), (2, False), (1, True), (2, True), (4, True), (8, True)):
            peak = lora_memory(m, rank, micro, ac) / GB
            fits = [f"{g} GB" for g in (24, 48, 80) if peak + 2 <= g]
            row = f"| {rank} | {n:.0f}M | {micro} | {'yes' if ac else 'no'} | {peak:.1f} GB"
            print(f"{row} | {', '.join(fits) or 'none of 24/48/80 GB'} |")
    for ac in (False, True):
        seconds = PAIRS * lora_pair_flops(m, ac) / (PEAK * MFU)
        print(
            f"\none epoch, LoRA on one H100 (checkpointing {'on' if ac else 'off'}): "
            f"{seconds / 3600:.1f} h"
        )


if __name__ == "__main__":
    main()
