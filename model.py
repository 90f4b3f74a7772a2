"""A Llama 3.1 / Mistral transformer in plain PyTorch that reads and writes Hugging Face weights.

The math is that of transformers' LlamaForCausalLM / MistralForCausalLM (fp32 logits agree to
1e-4): RMSNorm in fp32, rotate-half RoPE with Llama 3.1 frequency scaling, grouped-query attention
through F.scaled_dot_product_attention, a SwiGLU MLP, tied or untied output head, Mistral's sliding
window. Module names follow the checkpoint's ("model." dropped): loading needs no conversion.
For training, `build_sharded` builds it sharded over processes with FSDP2, reading only each rank's
rows of every tensor, and `save_sharded` writes it back from the shards, every rank one file at
once. The training forward scores only answer tokens, in blocks (`AnswerHead`, and TDPO's
`SequentialKL`): never the whole (tokens, vocab) logits. `generate` decodes a batch of prompts
with a KV cache (`python train.py answers` uses it for AlpacaEval). It imports nothing else of
this project: the model stands alone.
"""

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.attention.varlen import varlen_attn
from torch.utils.checkpoint import checkpoint


class CheckpointError(ValueError):
    """A weights directory that cannot be loaded; the message names the file and what is wrong."""


HF_REQUIRED_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
)
LLAMA3_ROPE_KEYS = (
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)


def check_hf_config(hf: dict, where: str) -> None:
    """Raise a CheckpointError naming what in a config.json this model cannot read."""
    missing = [k for k in HF_REQUIRED_KEYS if k not in hf]
    if missing:
        raise CheckpointError(f"{where}: missing key(s) {', '.join(missing)}")
    if hf.get("model_type", "llama") not in ("llama", "mistral"):
        raise CheckpointError(f"{where}: model_type {hf['model_type']!r} is not llama or mistral")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("attention_bias") or hf.get("mlp_bias"):
        raise CheckpointError(
            f"{where}: only silu MLPs without biases are supported (hidden_act, "
            "attention_bias, mlp_bias)"
        )


def hf_rope(hf: dict, where: str) -> tuple[float, dict | None]:
    """(rope_theta, rope scaling) from either layout of config.json. The scaling is None for plain
    RoPE, else llama3's, checked for its keys; any other rope_type is a CheckpointError."""
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or rope or None
    if scaling is None:
        return theta, None
    scaling = dict(scaling)
    scaling["rope_type"] = scaling.pop("type", None) or scaling.get("rope_type", "default")
    if scaling["rope_type"] == "default":
        return theta, None
    if scaling["rope_type"] != "llama3":
        raise CheckpointError(
            f"{where}: rope_type {scaling['rope_type']!r} is not supported (default or llama3)"
        )
    absent = [k for k in LLAMA3_ROPE_KEYS if k not in scaling]
    if absent:
        raise CheckpointError(f"{where}: rope scaling llama3 lacks {', '.join(absent)}")
    return theta, scaling


@dataclass
class ModelConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor": 8.0, ...} or None
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # Mistral v0.1: 4096; None: full causal attention
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    model_type: str = "llama"

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf: dict, where: str = "config.json") -> "ModelConfig":
        """Read both layouts of config.json: the hub's (top-level rope_theta + rope_scaling, as in
        Llama-3.1-8B) and transformers 5's (rope_parameters holding rope_theta and the scaling)."""
        check_hf_config(hf, where)
        theta, scaling = hf_rope(hf, where)
        heads = hf["num_attention_heads"]
        return cls(
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            vocab_size=hf["vocab_size"],
            head_dim=hf.get("head_dim"),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position_embeddings=hf.get("max_position_embeddings", 8192),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            sliding_window=hf.get("sliding_window"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            model_type=hf.get("model_type", "llama"),
        )

    def to_hf(self, dtype: torch.dtype) -> dict:
        """config.json's dict in the hub layout (top-level rope_theta + rope_scaling), which
        transformers 4 and 5 and vLLM all read."""
        hf = {k: v for k, v in asdict(self).items() if v is not None or k == "rope_scaling"}
        if self.model_type == "llama":
            hf.pop("sliding_window", None)
        name = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[self.model_type]
        return {
            "architectures": [name],
            **hf,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }


# ----------------------------------------------------------------------------- the math


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in (at least) fp32, cast back before the gain, as the checkpoints were trained.
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """RoPE's inverse frequencies; Llama 3.1's `rope_type: llama3` rescales the long wavelengths."""
    dim = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    original = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Wavelengths longer than original/low are divided by factor, shorter than original/high kept,
    # and the band between is interpolated smoothly.
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    between = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(between, blended, scaled)


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position x frequency, (*positions.shape, head_dim): fp32, then cast."""
    freqs = positions.float()[..., None] * inv_freq  # (..., head_dim / 2)
    angles = torch.cat((freqs, freqs), dim=-1)  # rotate-half layout: both halves share a frequency
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Hugging Face checkpoints store q_proj / k_proj rotate-half: dim i pairs with dim i + d/2.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def sliding_window_mask(seq_len: int, window: int, device) -> torch.Tensor:
    """Mistral's window: query i sees keys j with i - window < j <= i. (T, T) bool, True: attend."""
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    return (j <= i) & (j > i - window)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.window = cfg.sliding_window

    def forward(self, x, cos, sin, mask, cache=None):
        B, T, _ = x.shape
        # q (B, H, T, hd); k and v (B, KV, T, hd)
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # generation: keep this forward's keys and values, attend to all kept so far
        if cache is not None:
            k, v = cache.append(k, v)
        if isinstance(mask, Packed):  # training: one packed sequence (B = 1), segments apart
            q, k, v = (t[0].transpose(0, 1) for t in (q, k, v))  # (S, heads, hd)
            y = packed_attention(q, k, v, mask, self.window)
            return self.o_proj(y.reshape(B, T, self.n_heads * self.head_dim))
        # GQA: enable_gqa repeats each kv head for its n_heads / n_kv_heads consecutive query heads.
        # Rows of a plain forward are whole (or right-padded): causal attention never sees padding.
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


@dataclass
class Packed:
    """A micro-batch as one sequence without padding (data.pack builds it). A segment is a run of
    packed tokens that are queries together: a pair's prompt, its chosen answer, its rejected
    answer; or one SFT example."""

    input_ids: torch.Tensor  # (S,) the packed tokens
    positions: torch.Tensor  # (S,) each token's position in its own unpacked row (RoPE reads it)
    key_index: torch.Tensor  # packed index of every segment's keys, segment after segment
    # (segments + 1,) int32: where each segment's queries start (varlen_attn)
    cu_queries: torch.Tensor
    cu_keys: torch.Tensor  # (segments + 1,) int32: where each segment's keys start in key_index
    query_lengths: list  # the same lengths on the host, for the CPU's loop and the longest
    key_lengths: list
    answer_at: torch.Tensor  # (M,) packed index of every answer token, answer after answer
    # (M,) packed index of the state that predicts it (the token before)
    predicted_from: torch.Tensor
    answer_index: torch.Tensor  # (M,) flat index of every answer token in the (rows, width) grid
    rows: int  # answers: chosen ones then rejected ones (2 per pair), or SFT examples
    width: int  # the longest answer: the per-answer grid is (rows, width)

    def to(self, device) -> "Packed":
        cuda = device.type == "cuda"
        move = lambda t: t.pin_memory().to(device, non_blocking=True) if cuda else t.to(device)
        fields = {k: move(v) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return Packed(**fields)


def packed_attention(q, k, v, packed, window: int | None) -> torch.Tensor:
    """Attention over a packed micro-batch: q (S, H, hd), k and v (S, KV, hd) -> (S, H, hd).

    Each segment's queries (data.pack's layout) see its keys: a prompt its own, an answer its
    prompt's then its own, gathered here (keys and values only; the prompt's layers ran once).
    Queries are the last of their keys, so the causal diagonal is aligned bottom-right, and a key's
    place in its segment's keys is its position: query i of a segment sees keys j with
    i' - window < j <= i', i' = i + keys - queries.
    The switch: on CUDA in bf16/fp16, FlashAttention over all segments at once (varlen_attn);
    elsewhere SDPA segment by segment, the plainest exact equivalent (3x faster on a CPU than one
    SDPA over the whole sequence with a block mask, which computes every masked score too)."""
    k, v = k.index_select(0, packed.key_index), v.index_select(0, packed.key_index)
    gqa = k.shape[1] != q.shape[1]
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        return varlen_attn(
            q,
            k,
            v,
            packed.cu_queries,
            packed.cu_keys,
            max(packed.query_lengths),
            max(packed.key_lengths),
            window_size=(window - 1 if window else -1, 0),
            enable_gqa=gqa,
        )
    out, q_start, k_start = [], 0, 0
    for n_q, n_k in zip(packed.query_lengths, packed.key_lengths):
        seg = lambda x, start, n: x[start : start + n].transpose(0, 1)[None]  # (1, heads, n, hd)
        mask = None
        if n_q != n_k or (window and n_k > window):
            # the queries' places among the keys
            i = torch.arange(n_k - n_q, n_k, device=q.device)[:, None]
            j = torch.arange(n_k, device=q.device)[None, :]
            mask = (j <= i) & (j > i - window) if window else j <= i
        y = F.scaled_dot_product_attention(
            seg(q, q_start, n_q),
            seg(k, k_start, n_k),
            seg(v, k_start, n_k),
            attn_mask=mask,
            is_causal=mask is None,
            enable_gqa=gqa,
        )
        out.append(y[0].transpose(0, 1))
        q_start, k_start = q_start + n_q, k_start + n_k
    return torch.cat(out)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.activation_checkpointing = False

    def forward(self, x, cos, sin, mask, cache=None):
        if self.activation_checkpointing and torch.is_grad_enabled():
            # Keep only the block's input; recompute its activations during backward.
            return checkpoint(self.residual_stream, x, cos, sin, mask, use_reentrant=False)
        return self.residual_stream(x, cos, sin, mask, cache)

    def residual_stream(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class AnswerStates:
    """What a forward pass gives the objective at the answer tokens, without the (N, T, vocab)
    logits. One row per answer (data.pack's chosen answers, then rejected; or SFT examples), column
    j for its token j: every tensor is (rows, width, ...), 0 (or unused) beyond an answer's end."""

    # (rows, width) fp32: log p(token j | everything before it), Eq. 1's factors
    logps: torch.Tensor
    # (rows, width) fp32: log max_v p(v | before token j), the squeeze probe (no gradient)
    top1: torch.Tensor
    # The rest only the policy's forward gives (a cached reference has log-probs and top-1 alone).
    # (rows, width, D): input embedding of token j, detached (Eq. 7)
    embeds: torch.Tensor | None = None
    # (rows, width, D): final normed state that predicts token j (Eq. 9)
    hidden: torch.Tensor | None = None
    # (rows, vocab) fp32: logits summed over an answer (Eq. 8)
    logit_sums: torch.Tensor | None = None
    # (rows, width, D): the hidden state at token j, which has read it, detached (--similarity
    # hidden: the state before it is the same in both answers after a shared prefix)
    hidden_after: torch.Tensor | None = None
    # (rows, width) fp32: TDPO's KL(π_ref(·|before token j) || π_θ(·|before token j)), when the
    # forward was given the reference's states (SequentialKL)
    kl: torch.Tensor | None = None


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # A buffer on the model's device: no host-to-device copy each forward. Not saved: derived.
        self.register_buffer("rope_inv_freq", rope_inv_freq(cfg), persistent=False)
        self.tie_weights()

    def tie_weights(self):
        """One parameter for input embedding and output head when the config ties them. Call it
        again after anything that replaces parameters (load_state_dict(assign=True), to_empty)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def reset_buffers(self):
        """Recompute the rope frequencies where the model lives: a model built on the meta device
        and then materialized (to_empty, load_state_dict(assign=True)) holds garbage or nothing."""
        device = self.embed_tokens.weight.device
        self.rope_inv_freq = rope_inv_freq(self.config).to(device)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        packed: Packed | None = None,
        sum_logits: bool = False,
        reference_head: tuple | None = None,
    ):
        """input_ids (N, T) -> logits (N, T, vocab).

        With packed (a micro-batch from data.pack) instead, no logits are made: an AnswerStates in
        the per-answer layout, with the log-probs of the answer tokens through the chunked head,
        and with sum_logits their logits summed per answer; given reference_head, the reference's
        (hidden states (M, D) that predict the answer tokens, head weight (vocab, D)), TDPO's
        sequential KL at each answer token (SequentialKL). Done here, inside the root module's
        forward, because FSDP gathers the head's weight only there."""
        ids = packed.input_ids[None] if packed is not None else input_ids  # (N, T); packed: (1, S)
        window, T = self.config.sliding_window, ids.shape[1]
        if packed is not None:
            positions, mask = packed.positions, packed
        else:
            positions = torch.arange(T, device=ids.device)
            mask = sliding_window_mask(T, window, ids.device) if window and T > window else None
        embeds = self.embed_tokens(ids)  # (N, T, D)
        cos, sin = rope_cos_sin(self.rope_inv_freq, positions, embeds.dtype)
        x = embeds
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        hidden = self.norm(x)  # (N, T, D)
        if packed is None:
            return self.lm_head(hidden)  # (N, T, vocab)
        return self.answer_states(packed, embeds[0], hidden[0], sum_logits, reference_head)

    def forward_cached(
        self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, caches: list
    ) -> torch.Tensor:
        """Generation's forward: input_ids (B, T) at positions (B, T), attending through mask
        (B, 1, T, S) to the keys in caches (one KVCache per layer), which this forward's keys join.
        -> logits of the last position only (B, vocab): the one that predicts the next token."""
        x = self.embed_tokens(input_ids)  # (B, T, D)
        # Each row has its own positions (left padding): cos and sin per row, (B, 1, T, head_dim).
        cos, sin = rope_cos_sin(self.rope_inv_freq, positions[:, None], x.dtype)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, cos, sin, mask, cache)
        return self.lm_head(self.norm(x[:, -1]))  # (B, vocab)

    def answer_states(self, packed, embeds, hidden, sum_logits, reference_head=None):
        """The packed sequence's embeddings and final hidden states (S, D) -> AnswerStates on the
        (rows, width) grid, one row per answer, column j for its token j (0 beyond its end)."""
        D = hidden.shape[-1]
        labels = packed.input_ids.index_select(0, packed.answer_at)
        h = hidden.index_select(0, packed.predicted_from)  # (M, D): the states that predict answers
        weight = self.lm_head.weight
        logps, top1 = AnswerHead.apply(h, weight, labels)
        rows = torch.div(packed.answer_index, packed.width, rounding_mode="floor")

        def grid(x):  # (M, ...) -> (rows, width, ...)
            shape = x.shape[1:]
            flat = x.new_zeros(packed.rows * packed.width, *shape)
            flat = flat.index_put((packed.answer_index,), x)
            return flat.view(packed.rows, packed.width, *shape)

        sums = None
        # Eq. 8's input: the head is linear, so summed logits = head(summed hidden states)
        if sum_logits:
            h_sum = torch.zeros(packed.rows, D, dtype=logps.dtype, device=h.device)
            h_sum.index_add_(0, rows, h.detach().to(logps.dtype))
            chunks = weight.detach().split(HEAD_CHUNK // D)
            sums = torch.cat([h_sum @ w.to(h_sum.dtype).T for w in chunks], dim=1)
        # Eq. 7 reads the embeddings detached; hidden_after is the state at the answer token itself.
        inputs = embeds.detach().index_select(0, packed.answer_at)
        after = hidden.detach().index_select(0, packed.answer_at)
        kl = (
            None if reference_head is None else grid(SequentialKL.apply(h, weight, *reference_head))
        )
        return AnswerStates(grid(logps), grid(top1), grid(inputs), grid(h), sums, grid(after), kl)


# Elements of one (rows, vocab) or (vocab slice, dim) block of the chunked head: 64 MiB of fp32.
# Smaller blocks cost no speed until matmuls get thin; blocks are most of a step's transient memory.
HEAD_CHUNK = 2**24


class AnswerHead(torch.autograd.Function):
    """Eq. 1 at the answer positions only: log p(label) = logits[label] - logsumexp(logits), with
    logits = h W^T, one block of rows at a time, and log max_v p(v) for the squeeze probe.

    Backward recomputes each block's logits from h and W (saved) instead of keeping them: the
    (M, vocab) logits and their gradient never exist whole. Blocks are cut along the rows in
    forward and along the vocabulary in backward, so that W's gradient is written once per slice,
    without an fp32 accumulator the size of W. Softmax statistics in fp32 for any compute dtype."""

    @staticmethod
    def forward(ctx, h, weight, labels):
        M, V = h.shape[0], weight.shape[0]
        logps = torch.empty(M, dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
        top1, lse = torch.empty_like(logps), torch.empty_like(logps)
        for s in range(0, M, max(1, HEAD_CHUNK // V)):
            e = min(M, s + max(1, HEAD_CHUNK // V))
            logits = (h[s:e] @ weight.T).to(logps.dtype)  # (rows, V)
            lse[s:e] = logits.logsumexp(-1)
            logps[s:e] = logits.gather(1, labels[s:e, None]).squeeze(1) - lse[s:e]
            top1[s:e] = logits.amax(-1) - lse[s:e]
            del logits  # before the next block's: two (rows, V) blocks never coexist
        ctx.save_for_backward(h, weight, labels, lse)
        ctx.mark_non_differentiable(top1)
        return logps, top1

    @staticmethod
    def backward(ctx, grad_logps, _):
        h, weight, labels, lse = ctx.saved_tensors
        grad_h = torch.zeros(h.shape, dtype=lse.dtype, device=h.device)
        grad_w = torch.empty_like(weight)
        g = grad_logps.to(lse.dtype)[:, None]  # (M, 1)
        step = max(1, HEAD_CHUNK // max(1, h.shape[0]))
        for s in range(0, weight.shape[0], step):
            w = weight[s : s + step]  # (v, D)
            # d log p(y) / d logits = onehot(y) - softmax(logits), restricted to this vocabulary
            # slice, in place: one (M, v) block alive, not one per elementwise op
            d = (h @ w.T).to(lse.dtype).sub_(lse[:, None]).exp_().mul_(-g)  # (M, v)
            inside = (labels >= s) & (labels < s + w.shape[0])
            d.scatter_add_(1, (labels - s).clamp(0, w.shape[0] - 1)[:, None], g * inside[:, None])
            d = d.to(weight.dtype)
            grad_h += d @ w
            grad_w[s : s + step] = d.T @ h
        return grad_h.to(h.dtype), grad_w, None


class SequentialKL(torch.autograd.Function):
    """TDPO's sequential forward KL at each answer token, KL(π_ref(·|x, y<t) || π_θ(·|x, y<t)) over
    the whole vocabulary, computed as AnswerHead computes log-probs: from the policy's states h
    (M, D) and head W, and the reference's states and head, one block of rows at a time, never the
    (M, vocab) logits of either model. KL_t = Σ_v p_ref (log p_ref - log p_θ); its gradient with
    respect to the policy's logits is softmax_θ - p_ref (Σ_v p_ref = 1), recomputed in backward in
    vocabulary slices from h, W and both log-sum-exps (saved). The reference gets no gradient.
    Two (rows, vocab) blocks are alive at once (policy and reference): each is half AnswerHead's."""

    @staticmethod
    def forward(ctx, h, weight, ref_h, ref_weight):
        M, V = h.shape[0], weight.shape[0]
        kl = torch.empty(M, dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
        lse, ref_lse = torch.empty_like(kl), torch.empty_like(kl)
        rows = max(1, HEAD_CHUNK // (2 * V))
        for s in range(0, M, rows):
            e = min(M, s + rows)
            ref = (ref_h[s:e] @ ref_weight.T).to(kl.dtype)  # (rows, V)
            ref_lse[s:e] = ref.logsumexp(-1)
            ref.sub_(ref_lse[s:e, None])  # log p_ref
            logits = (h[s:e] @ weight.T).to(kl.dtype)
            lse[s:e] = logits.logsumexp(-1)
            # log p_ref - log p_θ in place, term by term (not Σ p_ref·(log p_ref - logits) + lse:
            # that cancels two numbers of size log(vocab) in fp32)
            logits.sub_(lse[s:e, None]).neg_().add_(ref)
            kl[s:e] = (ref.exp_() * logits).sum(-1)
            del ref, logits
        ctx.save_for_backward(h, weight, ref_h, ref_weight, lse, ref_lse)
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        h, weight, ref_h, ref_weight, lse, ref_lse = ctx.saved_tensors
        grad_h = torch.zeros(h.shape, dtype=lse.dtype, device=h.device)
        grad_w = torch.empty_like(weight)
        g = grad_kl.to(lse.dtype)[:, None]  # (M, 1)
        step = max(1, HEAD_CHUNK // max(1, 2 * h.shape[0]))
        for s in range(0, weight.shape[0], step):
            w = weight[s : s + step]  # (v, D)
            # d KL / d logits = softmax_θ - p_ref on this vocabulary slice
            d = (h @ w.T).to(lse.dtype).sub_(lse[:, None]).exp_()  # (M, v)
            p_ref = (ref_h @ ref_weight[s : s + step].T).to(lse.dtype).sub_(ref_lse[:, None])
            d = d.sub_(p_ref.exp_()).mul_(g).to(weight.dtype)
            del p_ref
            grad_h += d @ w
            grad_w[s : s + step] = d.T @ h
        return grad_h.to(h.dtype), grad_w, None, None


def init_weights(model: Transformer, seed: int, std: float = 0.02) -> Transformer:
    """Random init of a model trained from scratch (tiny preset): N(0, std) matrices, unit norms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = name.endswith("norm.weight")
            p.copy_(torch.ones_like(p) if is_norm else torch.randn(p.shape, generator=g) * std)
    return model


# ----------------------------------------------------------------------------- checkpoints


def open_safetensors(file, device="cpu"):
    """safe_open; a damaged or truncated file is named in a CheckpointError, not a raw traceback."""
    try:
        return safe_open(file, framework="pt", device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def hf_name(name: str) -> str:
    """Our parameter name -> the checkpoint's (everything but lm_head lives under "model.")."""
    return name if name.startswith("lm_head.") else "model." + name


def read_config(path) -> ModelConfig:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{file}: not found")
    try:
        return ModelConfig.from_hf(json.loads(file.read_text()), where=str(file))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None


def checkpoint_files(path) -> dict[str, Path]:
    """tensor name -> safetensors file, from model.safetensors.index.json or a model.safetensors."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        absent = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if absent:
            raise CheckpointError(
                f"{index}: lists shard(s) that are not in {path}: {', '.join(absent)}"
            )
        return {name: path / f for name, f in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(
            f"{path}: neither model.safetensors nor model.safetensors.index.json found"
        )
    with open_safetensors(single) as f:
        return {name: single for name in f.keys()}


def expected_shapes(model: Transformer) -> dict[str, tuple]:
    """checkpoint name -> shape, for every tensor a checkpoint of this config must hold."""
    # named_parameters lists a tied lm_head.weight once, as embed_tokens: tied checkpoints lack it.
    return {hf_name(n): tuple(p.shape) for n, p in model.named_parameters()}


def check_checkpoint(path, files: dict[str, Path], shapes: dict[str, tuple]) -> None:
    """Name every missing, unexpected and mis-shaped tensor in one error."""
    problems = []
    missing = sorted(set(shapes) - set(files))
    # A tied checkpoint may still carry lm_head.weight; rotary buffers are recomputed, never loaded.
    unexpected = sorted(
        n for n in set(files) - set(shapes) if n != "lm_head.weight" and "rotary_emb" not in n
    )
    wrong = []
    for name in sorted(set(shapes) & set(files)):
        with open_safetensors(files[name]) as f:
            shape = tuple(f.get_slice(name).get_shape())
        if shape != shapes[name]:
            wrong.append(
                f"{name} is {list(shape)} in {files[name].name}, "
                f"config.json says {list(shapes[name])}"
            )
    if missing:
        problems.append(
            f"missing tensors: {', '.join(missing[:8])}"
            + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
        )
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:8])}")
    if wrong:
        problems.append("mis-shaped tensors: " + "; ".join(wrong[:8]))
    if problems:
        raise CheckpointError(f"{path}: " + " | ".join(problems))


def load_model(path, device="cpu", dtype=torch.float32) -> Transformer:
    """Build on the meta device (no memory), then fill each parameter straight from the
    safetensors files, so the weights are never allocated twice."""
    cfg = read_config(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    files = checkpoint_files(path)
    check_checkpoint(path, files, expected_shapes(model))
    state = {}
    for file in sorted(set(files[name] for name in expected_shapes(model))):
        with open_safetensors(file, device) as f:
            for name in expected_shapes(model):
                if files[name] == file:
                    state[name.removeprefix("model.")] = f.get_tensor(name).to(dtype)
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, assign=True)
    model.tie_weights()
    model.reset_buffers()
    return model


def shard_file_name(i: int, n: int) -> str:
    """The i-th of n safetensors files, named as save_pretrained names them."""
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def balanced_shards(sizes: list, n: int) -> list:
    """The file (0..n-1) each tensor goes to: largest first into the lightest file, so that n
    writers share the work evenly; deterministic, so every process computes the same assignment."""
    load, owners = [0] * n, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        owners[i] = min(range(n), key=load.__getitem__)
        load[owners[i]] += sizes[i]
    return owners


def write_index(
    out: Path, cfg: ModelConfig, dtype: torch.dtype, weight_map: dict, total_bytes: int
) -> None:
    """config.json, and model.safetensors.index.json when the tensors span several files."""
    (out / "config.json").write_text(json.dumps(cfg.to_hf(dtype), indent=2))
    if len(set(weight_map.values())) > 1:
        index = {
            "metadata": {"total_size": total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_state_dict(
    state: dict, cfg: ModelConfig, out_dir, max_shard_bytes: int = 5 * 2**30
) -> None:
    """Write config.json and the tensors in Hugging Face layout: one model.safetensors, or shards
    of at most max_shard_bytes with model.safetensors.index.json, as save_pretrained writes them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        hf_name(n): t.detach().contiguous().cpu()
        for n, t in state.items()
        if not (cfg.tie_word_embeddings and n == "lm_head.weight")
    }
    shards, size = [{}], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        save_file(shard, out / shard_file_name(i, len(shards)), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, shard_file_name(i, len(shards))))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_index(out, cfg, next(iter(tensors.values())).dtype, weight_map, total)


def save_model(model: Transformer, out_dir, max_shard_bytes: int = 5 * 2**30) -> None:
    save_state_dict(model.state_dict(), model.config, out_dir, max_shard_bytes)


def load_tokenizer(path):
    from tokenizers import Tokenizer

    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(
            f"{file}: not found (the fast-tokenizer file that ships with the weights)"
        )
    return Tokenizer.from_file(str(file))


# ----------------------------------------------------------------------------- presets

# Named weights: where to get them and which chat template their SFT stage used. Base models follow
# the paper's base setting (Zephyr's recipe: UltraChat SFT with the Zephyr template, then preference
# optimization); instruct models use their own official template.
PRESETS = {
    "llama31-8b": {"hub": "meta-llama/Llama-3.1-8B", "template": "zephyr"},
    "llama31-8b-instruct": {"hub": "meta-llama/Llama-3.1-8B-Instruct", "template": "llama31"},
    "mistral-7b": {"hub": "mistralai/Mistral-7B-v0.1", "template": "zephyr"},
    "mistral-7b-instruct": {"hub": "mistralai/Mistral-7B-Instruct-v0.2", "template": "mistral"},
    "tiny": {"hub": None, "template": "plain"},
}


def resolve_weights(name_or_dir: str) -> str:
    """A directory or "tiny" as is; a preset name -> weights/<name> or $AAO_WEIGHTS_DIR/<name>."""
    if name_or_dir == "tiny" or Path(name_or_dir).is_dir():
        return name_or_dir
    if name_or_dir not in PRESETS:
        raise CheckpointError(
            f"--weights {name_or_dir}: neither a directory nor one of {', '.join(PRESETS)}"
        )
    roots = [Path(os.environ["AAO_WEIGHTS_DIR"])] if "AAO_WEIGHTS_DIR" in os.environ else []
    for root in roots + [Path("weights")]:
        if (root / name_or_dir / "config.json").is_file():
            return str(root / name_or_dir)
    where = roots[0] if roots else Path("weights")
    raise CheckpointError(
        f"--weights {name_or_dir}: no weights at {where / name_or_dir}. "
        "No download happens at run time: put config.json, tokenizer.json and model*.safetensors "
        "(with model.safetensors.index.json when sharded) from the hub repository "
        f"{PRESETS[name_or_dir]['hub']} into {where / name_or_dir}/, "
        "or set AAO_WEIGHTS_DIR to the folder that holds it."
    )


def llama3_rope_scaling(original_max_position_embeddings: int = 8192) -> dict:
    """Llama 3.1's rope_scaling (config.json) for a model whose original context is that long."""
    return {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": original_max_position_embeddings,
    }


def tiny_config(vocab_size: int) -> ModelConfig:
    """The built-in tiny Llama: GQA and llama3 rope scaling like the real thing, small for a CPU."""
    return ModelConfig(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=2048,
        rope_theta=500000.0,
        rope_scaling=llama3_rope_scaling(256),
        bos_token_id=0,
        eos_token_id=1,
    )


def tiny_model(vocab_size: int, seed: int = 0) -> Transformer:
    return init_weights(Transformer(tiny_config(vocab_size)), seed)


# ----------------------------------------------------------------------------- FSDP2 sharding

# How the model is split over processes, all of it here (train.setup_distributed makes the mesh):
# - FSDP2 (fully_shard) on every block, then on the root (embedding, final norm, head): each rank
#   keeps 1/N of every parameter (rows start:stop, torch.chunk's Shard(0)) and gathers a block only
#   while it runs. With --replicate R the mesh is 2-D (HSDP): shard inside groups of N/R ranks
#   (a node), replicate across.
# - Mixed precision: fp32 master weights, bf16 compute (MixedPrecisionPolicy's param_dtype),
#   gradients reduced in fp32. One process with nothing to cast stays a plain module
#   (build_sharded says why).
# - Reshard choices: blocks free their gathered weights after forward and gather again in backward;
#   the root keeps its own from forward to backward, and a frozen model, which never runs backward,
#   reshards right after forward (build_sharded), as does evaluation (reshard).
# - Activation checkpointing is a flag on each Block, set before sharding: FSDP wraps the recompute.
# - Gradients are reduce-scattered after every micro-batch (no no_sync): FSDP2 would otherwise hold
#   whole unsharded fp32 gradients (32 GB at 8B) between micro-batches.
# - The threshold MLP is replicated, not sharded (small; its input is each rank's own pairs): its
#   gradients are averaged by hand (average_replicated_gradients) before its own clip.
# - The LM head's weight exists whole only inside the root's forward: everything computed from it
#   (the answer log-probs, Eq. 8's summed logits) is computed there (Transformer.answer_states).


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a parameter (the parameter itself when the model is not sharded)."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole parameter, gathered from every rank's shard (a collective) when it is sharded."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def reshard(model) -> None:
    """Free the root's gathered parameters after a forward without backward (unsharded: no-op)."""
    if hasattr(model, "reshard"):
        model.reshard()


def shard_position(mesh) -> tuple[int, int]:
    """This rank's place among the ranks a parameter is sharded over, and their number."""
    return mesh.get_local_rank("shard"), mesh.size(mesh.mesh_dim_names.index("shard"))


def weight_reader(weights: str, vocab_size: int, seed: int):
    """(config, read) where read(name, start, stop) returns rows start:stop of a full parameter:
    from the safetensors files (only those rows are read), or from the seeded random tiny model."""
    if weights == "tiny":
        state = tiny_model(vocab_size, seed).state_dict()
        return tiny_config(vocab_size), lambda name, s, e: state[name][s:e]
    cfg, files = read_config(weights), checkpoint_files(weights)
    with torch.device("meta"):
        check_checkpoint(weights, files, expected_shapes(Transformer(cfg)))

    def read(name, s, e):
        with open_safetensors(files[hf_name(name)]) as f:
            return f.get_slice(hf_name(name))[s:e]

    return cfg, read


def build_sharded(cfg, read, mesh, param_dtype, compute_dtype, checkpointing=False, trainable=True):
    """Build on the meta device, shard every block and then the root with FSDP2 (torchtitan's
    recipe), allocate this rank's shards and fill them with rows start:stop of each parameter
    (torch.chunk's Shard(0) layout), so no rank ever holds the whole model. Parameters are kept in
    param_dtype and cast to compute_dtype. One process with nothing to cast gets a plain module:
    FSDP2 on one rank still copies every parameter into an unsharded buffer for forward, one more
    copy of the model for nothing."""
    with torch.device("meta"):
        model = Transformer(cfg).to(param_dtype)
    for block in model.layers:
        block.activation_checkpointing = checkpointing
    if mesh.size() > 1 or compute_dtype != param_dtype:
        mp = (
            MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
            if compute_dtype != param_dtype
            else MixedPrecisionPolicy()
        )
        for block in model.layers:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        # The root keeps its parameters (embedding, head) gathered from forward to backward. A
        # frozen model never runs backward: it must reshard right after forward, or hold them for
        # the whole run.
        after_forward = None if trainable else True
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=after_forward)
    model.to_empty(device=mesh.device_type)
    # to_empty gives every module a new parameter of its own, which unties a plain module's head
    # from its embedding (FSDP2 keeps one sharded parameter for both); tied checkpoints have no
    # lm_head.weight.
    model.tie_weights()
    model.reset_buffers()
    shard, shards = shard_position(mesh)
    with torch.no_grad():
        for name, p in model.named_parameters():
            start = shard * -(-p.shape[0] // shards)
            local(p).copy_(read(name, start, start + local(p).shape[0]))
    model.requires_grad_(trainable)
    return model.train(trainable)


def average_replicated_gradients(module: nn.Module) -> None:
    """A module every rank holds whole (the threshold MLP: small, and its input is each rank's own
    pairs): average its gradients over the ranks, as FSDP does for the sharded policy's."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    for p in module.parameters() if world > 1 else ():
        dist.all_reduce(p.grad)  # a sum: gloo has no average
        p.grad /= world


def save_sharded(model: Transformer, out: Path, dtype: torch.dtype) -> None:
    """Write a sharded model in Hugging Face layout, every rank calling it. Parameters are gathered
    one at a time, a collective every rank joins; each rank keeps those assigned to it and writes
    them as one file, so the files are written at once rather than the whole model by rank 0 while
    the others wait."""
    rank, world = dist.get_rank(), dist.get_world_size()
    params = list(model.named_parameters())  # a tied head is listed once, under embed_tokens
    owners = balanced_shards([p.numel() for _, p in params], world)
    n_files, mine = max(owners) + 1, {}
    for (name, p), owner in zip(params, owners):
        whole = full(p)
        if owner == rank:
            mine[hf_name(name)] = whole.detach().to(dtype).cpu().contiguous()
        del whole
    if mine:
        save_file(mine, out / shard_file_name(rank, n_files), metadata={"format": "pt"})
    if rank == 0:
        weight_map = {hf_name(n): shard_file_name(o, n_files) for (n, _), o in zip(params, owners)}
        total_bytes = sum(p.numel() for _, p in params) * dtype.itemsize
        write_index(out, model.config, dtype, weight_map, total_bytes)


def write_generation_config(out: Path, source: Path | None, cfg, stop_ids: list) -> None:
    """generation_config.json: the source's, with the template's end-of-answer token among the stop
    ids, so that a server (vLLM, transformers) stops where the trained answers stop: a base model's
    config lists only <|end_of_text|>, while a Llama 3 chat answer ends with <|eot_id|>."""
    file = source / "generation_config.json" if source else None
    config = json.loads(file.read_text()) if file and file.is_file() else {}
    eos = config.get("eos_token_id", cfg.eos_token_id)
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    config["eos_token_id"] = eos + [i for i in stop_ids if i not in eos]
    (out / "generation_config.json").write_text(json.dumps(config, indent=2))


# ----------------------------------------------------------------------------- FLOPs, for MFU


def parameter_counts(cfg: ModelConfig) -> tuple[int, int, int]:
    """Parameters of the blocks (with the final norm), of the output head, and in all."""
    D, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
    attention = D * cfg.num_attention_heads * cfg.head_dim * 2 + D * kv * 2  # q and o, k and v
    blocks = cfg.num_hidden_layers * (attention + 3 * D * cfg.intermediate_size + 2 * D) + D
    head = cfg.vocab_size * D
    return blocks, head, blocks + head * (1 if cfg.tie_word_embeddings else 2)


def training_flops(
    cfg: ModelConfig, segments: list, live_reference: bool, policy_backward: bool = True
) -> float:
    """Model FLOPs of training on segments given as (queries, keys, answer tokens),
    data.segment_lengths' triples, PaLM's convention (recomputation not counted): 6 per parameter
    and query token for the policy's forward and backward, 2 for a live reference's forward; the
    head only at answer tokens (the chunked head computes nothing else); the input embedding not
    at all (a lookup); attention's two products of a segment's queries by its keys, 12·L·D·keys
    per query (4·L·D·keys for a forward only). A whole T-token sequence is the segment
    (T, T, answer tokens). Without policy_backward, the policy's forward alone (KTO's mismatched
    pairs)."""
    blocks, head, _ = parameter_counts(cfg)
    passes = 6 - 4 * (not policy_backward) + 2 * live_reference
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    attention = 4 * L * H * cfg.head_dim * (3 - 2 * (not policy_backward) + live_reference)
    return sum(passes * (blocks * q + head * n) + attention * q * k for q, k, n in segments)


def peak_flops(device) -> float | None:
    """Dense bf16 peak of one GPU, for MFU: the first name that matches, most specific first."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    table = {
        "H100 PCIe": 756e12,
        "H100 NVL": 835e12,
        "H100": 989e12,
        "H200": 989e12,
        "H800": 989e12,
        "B200": 2250e12,
        "A100": 312e12,
        "A800": 312e12,
        "L40S": 362e12,
        "L4": 121e12,
        "A10": 125e12,
    }
    return next((v for k, v in table.items() if k in name), None)


# ----------------------------------------------------------------------------- generation


@dataclass
class KVCache:
    """One layer's keys (after RoPE) and values at every slot written so far, so that each new token
    costs one position's forward. Prompts are left-padded to one length, so slot s of every row is
    written by the same forward: the slots are shared, each row's positions are its own."""

    keys: torch.Tensor  # (B, kv heads, capacity, head_dim)
    values: torch.Tensor
    filled: int = 0  # slots written

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, kv heads, T, head_dim) keys and values after the filled slots -> all so far."""
        start, self.filled = self.filled, self.filled + k.shape[2]
        self.keys[:, :, start : self.filled] = k
        self.values[:, :, start : self.filled] = v
        return self.keys[:, :, : self.filled], self.values[:, :, : self.filled]


def empty_caches(model: Transformer, batch: int, capacity: int) -> list[KVCache]:
    cfg, weight = model.config, model.embed_tokens.weight
    shape = (batch, cfg.num_key_value_heads, capacity, cfg.head_dim)
    return [KVCache(weight.new_empty(shape), weight.new_empty(shape)) for _ in model.layers]


def cache_mask(real: torch.Tensor, start: int, end: int, window: int | None) -> torch.Tensor:
    """Which slots the queries at slots start..end-1 attend to: (B, 1, end - start, end) bool.

    True = attend. Query slot i sees the real (not padding) keys at slots j with
    i - window < j <= i: a row's slots and positions differ by its padding, a constant, so causality
    and Mistral's window read the same in slots. A padding slot sees itself: some attention kernels
    give NaN for a softmax over no key, and a NaN in V would reach the real rows (0 weight times NaN
    is NaN)."""
    i = torch.arange(start, end, device=real.device)[:, None]
    j = torch.arange(end, device=real.device)[None, :]
    see = (j <= i) & (j > i - window) if window else j <= i
    return (see & real[:, None, :end] | (i == j))[:, None]


def prefill(model: Transformer, prompts: list[list[int]], caches: list[KVCache]):
    """Run the prompts, left-padded to the longest, through the model once, filling the caches.
    -> logits of each prompt's last token (B, vocab), each row's padding (B,), the real slots
    (B, capacity)."""
    device, longest = model.embed_tokens.weight.device, max(map(len, prompts))
    pad = torch.tensor([longest - len(p) for p in prompts], device=device)
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], device=device)  # (B, P)
    slots = torch.arange(caches[0].keys.shape[2], device=device)
    real = slots >= pad[:, None]  # row b's first pad[b] slots are padding, every later one a token
    # a prompt starts at position 0 whatever its padding
    positions = (slots[:longest] - pad[:, None]).clamp(min=0)
    mask = cache_mask(real, 0, longest, model.config.sliding_window)
    return model.forward_cached(ids, positions, mask, caches), pad, real


def sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> torch.Tensor:
    """The next token of each row (B,): the most likely at temperature 0; else a draw from
    softmax(logits / T) restricted to the nucleus, the fewest most likely tokens whose
    probabilities reach top_p."""
    if temperature == 0:
        return logits.argmax(-1)
    probs, order = (logits.float() / temperature).softmax(-1).sort(-1, descending=True)
    # A token stays when the more likely ones sum to less than top_p: the most likely always stays.
    probs = probs * (probs.cumsum(-1) - probs < top_p)
    choice = torch.multinomial(probs, 1, generator=generator)  # renormalizes the kept probabilities
    return order.gather(-1, choice).squeeze(-1)


def cut_at_stop(tokens: list[int], stop_ids) -> list[int]:
    """A row's tokens up to, not including, its first stop id."""
    return tokens[: next((i for i, t in enumerate(tokens) if t in stop_ids), len(tokens))]


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids=(),
    seed: int = 0,
) -> list[list[int]]:
    """Each prompt's new tokens up to its first stop id (excluded) or max_new_tokens, as one batch.
    The prompts run once (prefill); then each step is one forward of one position per row (decode),
    which ends when every row has met a stop id. Greedy at temperature 0; a seed gives the same
    draws again."""
    if not all(prompts):
        raise ValueError("generate: every prompt needs at least one token")
    device, window = model.embed_tokens.weight.device, model.config.sliding_window
    longest = max(map(len, prompts))
    caches = empty_caches(model, len(prompts), longest + max_new_tokens)
    logits, pad, real = prefill(model, prompts, caches)
    generator = torch.Generator(device).manual_seed(seed)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    tokens = []
    for slot in range(longest, longest + max_new_tokens):  # the new token goes to this slot
        token = sample(logits, temperature, top_p, generator)  # (B,)
        tokens.append(token)
        done |= torch.isin(token, stops)
        if slot + 1 == longest + max_new_tokens or done.all():
            break
        mask = cache_mask(real, slot, slot + 1, window)
        logits = model.forward_cached(token[:, None], (slot - pad)[:, None], mask, caches)
    rows = torch.stack(tokens, 1).tolist() if tokens else [[] for _ in prompts]
    return [cut_at_stop(row, set(stop_ids)) for row in rows]


def fit_prompts(prompts: list, context: int) -> tuple[list, int]:
    """Prompts cut from the left (BOS kept) to leave one position of the model's context for the
    answer; with how many were cut, for a warning."""
    cut = [p[:1] + p[len(p) - context + 2 :] if len(p) >= context else p for p in prompts]
    return cut, sum(len(p) >= context for p in prompts)


def stop_ids_of(weights, cfg: ModelConfig) -> list[int]:
    """The EOS ids a checkpoint's generation_config.json (else config.json) lists, as a list."""
    file = Path(weights) / "generation_config.json"
    eos = json.loads(file.read_text()).get("eos_token_id") if file.is_file() else None
    eos = cfg.eos_token_id if eos is None else eos
    return [eos] if isinstance(eos, int) else list(eos or [])
