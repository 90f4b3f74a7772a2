"""Tests: model parity with transformers, every equation against a float64 re-computation, data, training.

Run with `pytest test_aao.py` (CPU, a few minutes). Tests that need transformers skip without it; CI
installs it, so they run there.
"""
import json
import math
import os
import shutil
import subprocess
import sys
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
    llama3_rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 16}
    base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=101, max_position_embeddings=128)
    if kind == "mistral":
        cfg = transformers.MistralConfig(**base, sliding_window=8)
        cls = transformers.MistralForCausalLM
    else:
        extra = {"llama": {}, "tied": {"tie_word_embeddings": True}, "head_dim": {"head_dim": 24}}[kind]
        cfg = transformers.LlamaConfig(**base, rope_parameters={**llama3_rope, "rope_theta": 500000.0}, **extra)
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
    cfg["rope_scaling"] = None if rope["rope_type"] == "default" else {**rope, "type": rope.pop("rope_type")}
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
    ids = torch.randint(0, 101, (2, 40))  # 40 > 16 (rope's original context) and > 8 (Mistral's window)
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


def answer_grid(mask: torch.Tensor) -> torch.Tensor:
    """The flat answer_index of a (N, T-1) mask of predicted answer tokens."""
    return mask.flatten().nonzero().squeeze(1)


@pytest.mark.parametrize("chunk", [None, 600])
def test_answer_head_matches_full_logits_in_float64(monkeypatch, chunk):
    """The chunked head (Eq. 1 at answer positions only) against log_softmax of the whole logits:
    log-probs, the top-1 probe, the logit sums of Eq. 8's input, and every parameter's gradient. A
    chunk of 600 elements cuts the 300-token vocabulary into blocks of 2 rows (forward) and of 75
    vocabulary entries (backward), so the block boundaries are crossed."""
    if chunk:
        monkeypatch.setattr(M, "HEAD_CHUNK", chunk)
    m = M.tiny_model(300, seed=1).double()
    ids = torch.randint(0, 300, (4, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(4, 11, dtype=torch.float64)
    mask[:, 5:9] = 1
    mask[1, 3:11] = 1
    g = torch.randn(4, 11, dtype=torch.float64)
    states = m(ids, answer_index=answer_grid(mask), sum_logits=True)
    (states.logps * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    logits = m(ids)[:, :-1]
    full = logits.log_softmax(-1)
    ref = full.gather(-1, ids[:, 1:, None]).squeeze(-1) * mask
    (ref * g).sum().backward()
    assert (states.logps - ref).abs().max() < 1e-12
    assert (states.top1 - full.amax(-1) * mask).abs().max() < 1e-12
    assert (states.logit_sums - (logits * mask[..., None]).sum(1)).abs().max() < 1e-12
    assert all((grads[n] - p.grad).abs().max() < 1e-12 for n, p in m.named_parameters())
    assert torch.equal(states.embeds, m.embed_tokens(ids)[:, 1:])


def test_answer_head_in_bfloat16_keeps_fp32_statistics():
    m = M.tiny_model(300, seed=1)
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 9)
    exact = m.double()(ids)[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    states = m.bfloat16()(ids, answer_index=answer_grid(mask), sum_logits=True)
    assert states.logps.dtype == torch.float32 and states.logit_sums.dtype == torch.float32
    assert (states.logps.double() - exact).abs().max() < 0.05  # bf16 weights; the statistics are fp32


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


def test_missing_preset_says_where_to_put_the_files(tmp_path, monkeypatch):
    monkeypatch.setenv("AAO_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(M.CheckpointError) as e:
        M.resolve_weights("llama31-8b")
    assert str(tmp_path / "llama31-8b") in str(e.value) and "meta-llama/Llama-3.1-8B" in str(e.value)
    assert "model*.safetensors" in str(e.value)


# ----------------------------------------------------------------------------- generation

def random_prompts(lengths, vocab=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


# One batch of three lengths: two rows are left-padded; 23 + 16 positions pass the llama3 rope's original 16,
# and every prompt + answer is longer than Mistral's window of 8.
PROMPTS, NEW_TOKENS = random_prompts([23, 5, 12]), 16


def hf_greedy(m, prompt, n):
    """transformers' greedy generate of one prompt alone, never stopping early."""
    m.generation_config.eos_token_id = None
    out = m.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                     do_sample=False, max_new_tokens=n)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def hf_and_ours(request, tmp_path_factory):
    """A transformers model of kind request.param (indirect parametrization) and ours loaded from its files."""
    m = hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    m.save_pretrained(path)
    return m, M.load_model(path)


@pytest.mark.parametrize("hf_and_ours", ["llama", "tied", "mistral"], indirect=True)
def test_batched_greedy_generation_matches_transformers_alone(hf_and_ours):
    """Llama with GQA and llama3 rope scaling, tied embeddings, Mistral's window: our left-padded batch with
    its cache, token for token against transformers' greedy generate of each prompt on its own."""
    m, ours = hf_and_ours
    assert M.generate(ours, PROMPTS, NEW_TOKENS) == [hf_greedy(m, p, NEW_TOKENS) for p in PROMPTS]


def positions_by_slot(prefill):
    """A wrong offset: decoded tokens at their slot's index, not at prompt length + step, in padded rows."""
    def broken(*args):
        logits, pad, real = prefill(*args)
        return logits, pad * 0, real
    return broken


def no_padding_mask(cache_mask):
    return lambda real, start, end, window: cache_mask(torch.ones_like(real), start, end, window)


def no_window(cache_mask):
    return lambda real, start, end, window: cache_mask(real, start, end, None)


BREAKAGES = {"position offset": ("prefill", positions_by_slot), "padding mask": ("cache_mask", no_padding_mask),
             "window": ("cache_mask", no_window)}


@pytest.mark.parametrize("hf_and_ours, broken", [(k, b) for k in ("llama", "tied", "mistral") for b in BREAKAGES
                                               if b != "window" or k == "mistral"], indirect=["hf_and_ours"])
def test_generation_parity_catches_a_broken_cache(hf_and_ours, monkeypatch, broken):
    """The parity test above would fail with a wrong position offset, no padding mask or (Mistral) no window."""
    _, ours = hf_and_ours
    right = M.generate(ours, PROMPTS, NEW_TOKENS)
    name, breaking = BREAKAGES[broken]
    monkeypatch.setattr(M, name, breaking(getattr(M, name)))
    assert M.generate(ours, PROMPTS, NEW_TOKENS) != right


def generation_model(dtype=torch.float32):
    """Ours alone (no transformers): the tiny Llama with weights large enough to decide the greedy tokens,
    and a window of 6 so that it matters too."""
    cfg = M.ModelConfig(**{**M.tiny_config(101).__dict__, "sliding_window": 6})
    return M.init_weights(M.Transformer(cfg), seed=0, std=0.1).to(dtype)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.03)])
def test_cached_decoding_gives_the_full_forward_logits(dtype, tol):
    """Prefill and decode steps through the cache, left-padded rows, teacher-forced: the logits of each step
    equal those of one forward over each row's whole sequence alone, in fp32 and (to bf16's rounding) bf16."""
    m, steps = generation_model(dtype), 5
    follow = torch.randint(0, 101, (3, steps), generator=torch.Generator().manual_seed(1))
    caches = M.empty_caches(m, 3, 23 + steps)
    logits, pad, real = M.prefill(m, PROMPTS, caches)
    cached = [logits]
    for t in range(steps - 1):
        slot = 23 + t
        mask = M.cache_mask(real, slot, slot + 1, m.config.sliding_window)
        cached.append(m.forward_cached(follow[:, t:t + 1], (slot - pad)[:, None], mask, caches))
    cached = torch.stack(cached, 1).float()  # (3, steps, vocab)
    assert caches[0].keys.dtype == dtype
    for b, p in enumerate(PROMPTS):
        full = m(torch.tensor([p + follow[b].tolist()]))[0, len(p) - 1:len(p) + steps - 1].float()
        assert (cached[b] - full).abs().max() < tol * full.abs().max()


def test_stop_ids_end_rows_and_are_excluded(monkeypatch):
    m = generation_model()
    full = M.generate(m, PROMPTS, NEW_TOKENS)
    k = next(k for k in range(2, NEW_TOKENS) if full[0][k] not in full[0][:k])  # a first occurrence, not at 0
    stop = full[0][k]
    cut = M.generate(m, PROMPTS, NEW_TOKENS, stop_ids=[stop])
    assert cut[0] == full[0][:k]
    assert cut == [row[:row.index(stop)] if stop in row else row for row in full]
    forwards = []
    monkeypatch.setattr(m, "forward_cached", lambda *a: forwards.append(1) or M.Transformer.forward_cached(m, *a))
    assert M.generate(m, PROMPTS, NEW_TOKENS, stop_ids=range(101)) == [[], [], []]
    assert len(forwards) == 1  # the prefill only: once every row has stopped, the batch ends


def test_sampling_is_seeded_and_tiny_top_p_is_greedy():
    m = generation_model()
    sampled = M.generate(m, PROMPTS, NEW_TOKENS, temperature=1.0, seed=3)
    assert M.generate(m, PROMPTS, NEW_TOKENS, temperature=1.0, seed=3) == sampled
    assert M.generate(m, PROMPTS, NEW_TOKENS, temperature=1.0, seed=4) != sampled
    assert sampled != M.generate(m, PROMPTS, NEW_TOKENS)
    assert M.generate(m, PROMPTS, NEW_TOKENS, temperature=1.0, top_p=1e-6, seed=3) == M.generate(m, PROMPTS, NEW_TOKENS)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.5, 1.0), (2.0, 0.7)])
def test_sample_draws_the_tempered_nucleus_distribution(temperature, top_p):
    """Frequencies of 40,000 draws against the float64 distribution: softmax(logits / T), cut to the fewest
    most likely tokens whose probability reaches top_p, renormalized."""
    logits = torch.tensor([2.0, 1.5, 0.3, -1.0, 0.9])
    p = (logits.double() / temperature).softmax(-1)
    ranked = p.sort(descending=True)
    kept = ranked.indices[:int((ranked.values.cumsum(0) < top_p).sum()) + 1]
    expected = torch.zeros_like(p).index_fill(0, kept, 1) * p
    expected /= expected.sum()
    draws = M.sample(logits.expand(40_000, 5), temperature, top_p, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).double() / 40_000
    assert (freq - expected).abs().max() < 0.01
    assert (freq[expected == 0] == 0).all()


@pytest.mark.parametrize("name, family, end", [("llama3", "llama3", "<|eot_id|>"), ("llama31", "llama3", "<|eot_id|>"),
                                               ("mistral", "mistral", "</s>"), ("zephyr", "llama3", "<|end_of_text|>"),
                                               ("zephyr", "mistral", "</s>"), ("plain", "llama3", "<|end_of_text|>")])
def test_answer_stop_id_is_the_token_that_ends_a_rendered_answer(name, family, end):
    tok = data.tiny_tokenizer() if family == "llama3" else word_tokenizer(WORDS, specials=["<s>", "</s>"])
    rendered = data.render_answer("It is 4.", data.TEMPLATES[name], data.family_specials(tok))
    assert data.answer_stop_ids(tok, name) == [tok.encode(rendered, add_special_tokens=False).ids[-1]]
    assert data.answer_stop_ids(tok, name) == [tok.token_to_id(end)]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny-gen"
    M.save_model(M.init_weights(M.Transformer(M.tiny_config(640)), seed=0, std=0.1), path)
    data.tiny_tokenizer().save(str(path / "tokenizer.json"))
    return path


INSTRUCTIONS = ["What is the capital of France?", "Hi", "Which color does grass have? Tell me the color of snow."]


@pytest.mark.parametrize("layout", ["jsonl", "json"])
def test_answers_command_writes_alpacaeval_rows_in_input_order(tiny_checkpoint, tmp_path, monkeypatch, layout):
    """Batched by length (batch size 2 splits the three), restored to the file's order: each output is what
    generate gives its prompt alone, stopped at the template's end of answer or the config's EOS."""
    rows = [{"instruction": text, "dataset": f"set{i}"} for i, text in enumerate(INSTRUCTIONS)]
    prompts = tmp_path / f"prompts.{layout}"
    prompts.write_text("\n".join(map(json.dumps, rows)) if layout == "jsonl" else json.dumps(rows))
    real_generate, stop_ids = M.generate, []
    monkeypatch.setattr(M, "generate", lambda *a, **k: stop_ids.append(k["stop_ids"]) or real_generate(*a, **k))
    args = ["--weights", tiny_checkpoint, "--prompts", prompts, "--out", tmp_path / "out" / "answers.json",
            "--template", "llama3", "--max-new-tokens", 12, "--batch-size", 2]
    assert M.main(list(map(str, args))) == 0
    answers = json.loads((tmp_path / "out" / "answers.json").read_text())
    tok, model = M.load_tokenizer(tiny_checkpoint), M.load_model(tiny_checkpoint)
    stops = [tok.token_to_id("<|eot_id|>"), model.config.eos_token_id]
    assert stop_ids == [stops, stops]
    specials = data.family_specials(tok)
    for row, answer in zip(rows, answers, strict=True):
        prompt = data.render_prompt([{"role": "user", "content": row["instruction"]}], data.TEMPLATES["llama3"], specials)
        alone = real_generate(model, [tok.encode(prompt, add_special_tokens=False).ids], 12, stop_ids=stops)[0]
        assert answer == {"instruction": row["instruction"], "output": tok.decode(alone, skip_special_tokens=True).strip(),
                          "generator": "tiny-gen", "dataset": row["dataset"]}


@pytest.mark.parametrize("text, where, message", [
    (None, "prompts.jsonl", "no such file"),
    ('{"instruction": "Hi"}\n{"dataset": "x"}\n', "prompts.jsonl:2", "a row needs a string 'instruction'"),
    ('{"instruction": "Hi"}\n\n{"instruction": ["Hi"]}\n', "prompts.jsonl:3", "a row needs a string 'instruction'"),
    ('{"instruction": "Hi"}\n{"instruction": "Hi\n', "prompts.jsonl:2", "not valid JSON"),
    ('[{"instruction": "Hi"},\n {"instruction": }]', "prompts.jsonl:2", "not valid JSON")])
def test_answers_command_bad_prompts_are_one_line(tiny_checkpoint, tmp_path, capsys, text, where, message):
    if text is not None:
        (tmp_path / "prompts.jsonl").write_text(text)
    args = ["--weights", tiny_checkpoint, "--prompts", tmp_path / "prompts.jsonl", "--out", tmp_path / "a.json",
            "--template", "llama3"]
    assert M.main(list(map(str, args))) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / where}: {message}") and err.count("\n") == 1
    assert not (tmp_path / "a.json").exists()


def test_answers_command_as_a_script_fails_without_traceback(tiny_checkpoint, tmp_path):
    (tmp_path / "prompts.jsonl").write_text('{"instruction": 3}\n')
    out = subprocess.run([sys.executable, str(HERE / "model.py"), "--weights", str(tiny_checkpoint), "--prompts",
                          str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / "a.json"), "--template", "llama3"],
                         capture_output=True, text=True, timeout=60, cwd=HERE)
    assert out.returncode == 1 and out.stderr == f"error: {tmp_path / 'prompts.jsonl'}:1: a row needs a string 'instruction'\n"


def test_generation_speed_script_runs_its_tiny_setting(capsys):
    pytest.importorskip("transformers")
    import importlib.util
    spec = importlib.util.spec_from_file_location("generation_speed", HERE / "experiments" / "generation_speed.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--tiny", "--new-tokens", "3", "--reps", "1"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(r[0], r[1]) for r in rows] == [("float32", "1"), ("float32", "8"), ("bfloat16", "1"), ("bfloat16", "8")]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)

# ============================================================================= aao.py

def rand_mask(B, K, lo=2):
    """Right-padded answer masks with at least `lo` tokens per row."""
    lengths = torch.randint(lo, K + 1, (B,))
    return (torch.arange(K)[None] < lengths[:, None]).double()


def pair_logps(B=5):
    return [torch.randn(B, dtype=torch.float64) * 5 for _ in range(4)]


@pytest.mark.parametrize("beta", [0.1, "per_pair"])
def test_sequence_losses_match_float64_formulas(beta):
    pc, pr, rc, rr = pair_logps()
    beta = torch.rand(5, dtype=torch.float64) + 0.05 if beta == "per_pair" else beta
    h = (pc - rc) - (pr - rr)
    sig = lambda x: 1 / (1 + torch.exp(-x))
    assert torch.allclose(aao.dpo_loss(pc, pr, rc, rr, beta), -torch.log(sig(beta * h)))
    assert torch.allclose(aao.ipo_loss(pc, pr, rc, rr, beta), (h - 1 / (2 * beta)) ** 2)
    eps = 0.2
    assert torch.allclose(aao.cdpo_loss(pc, pr, rc, rr, beta, eps),
                          -(1 - eps) * torch.log(sig(beta * h)) - eps * torch.log(sig(-beta * h)))
    assert torch.allclose(aao.hinge_loss(pc, pr, rc, rr, beta), torch.clamp(1 - beta * h, min=0))
    assert torch.allclose(aao.simpo_loss(pc / 7, pr / 9, beta, 0.3), -torch.log(sig(beta * (pc / 7 - pr / 9) - 0.3)))
    assert aao.dpo_loss(pc, pr, rc, rr, beta).shape == (5,)


def float64_similarity(emb_w, emb_l, mask_w, mask_l):
    """Eq. 7 as DESIGN.md reads it, one pair at a time with explicit loops."""
    B = emb_w.shape[0]
    S_w, S_l = torch.zeros(mask_w.shape, dtype=torch.float64), torch.zeros(mask_l.shape, dtype=torch.float64)
    for p in range(B):
        iw, il = mask_w[p].nonzero().flatten().tolist(), mask_l[p].nonzero().flatten().tolist()
        C = [[F.cosine_similarity(emb_w[p, i].double(), emb_l[p, j].double(), dim=0).item() for j in il] for i in iw]
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
    assert torch.allclose(S_w.double(), R_w, atol=1e-5) and torch.allclose(S_l.double(), R_l, atol=1e-5)
    assert torch.allclose(S_w[:, 1], torch.ones(4))  # the shared token is the most similar pair: S = 1


def test_token_similarity_ignores_padding():
    emb_w, emb_l = torch.randn(2, 5, 8), torch.randn(2, 4, 8)
    mask_w, mask_l = torch.tensor([[1, 1, 1, 0, 0]] * 2), torch.tensor([[1, 1, 0, 0]] * 2)
    S = aao.token_similarity(emb_w, emb_l, mask_w, mask_l)
    emb_w[:, 3:], emb_l[:, 2:] = 100 * torch.randn(2, 2, 8), -emb_w[:, :2]  # garbage, even extreme cosines
    S2 = aao.token_similarity(emb_w, emb_l, mask_w, mask_l)
    assert torch.equal(S[0], S2[0]) and torch.equal(S[1], S2[1])
    assert (S2[0][:, 3:] == 0).all() and (S2[1][:, 2:] == 0).all()


def test_token_similarity_identical_and_degenerate():
    emb = torch.randn(1, 6, 8)
    ones = torch.ones(1, 6)
    S_w, S_l = aao.token_similarity(emb, emb, ones, ones)
    assert torch.allclose(S_w, torch.ones(1, 6)) and torch.allclose(S_l, torch.ones(1, 6))
    same = torch.randn(8).expand(1, 6, 8)  # every token alike: max == min
    for S in aao.token_similarity(same, same, ones, ones) + aao.token_similarity(emb[:, :1], emb[:, 1:2], ones[:, :1], ones[:, :1]):
        assert torch.isfinite(S).all() and (S >= 0).all() and (S <= 1).all()


def test_token_similarity_of_one_unbatched_pair():
    emb_w, emb_l, mask_w, mask_l = torch.randn(5, 8), torch.randn(4, 8), torch.ones(5), torch.tensor([1, 1, 1, 0])
    S_w, S_l = aao.token_similarity(emb_w, emb_l, mask_w, mask_l)
    B_w, B_l = aao.token_similarity(emb_w[None], emb_l[None], mask_w[None], mask_l[None])
    assert torch.equal(S_w, B_w[0]) and torch.equal(S_l, B_l[0])


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
    assert torch.allclose(a, torch.full((8,), 0.8), atol=1e-5) and torch.allclose(b, torch.full((8,), 0.4), atol=1e-5)
    with torch.no_grad():  # a trained, large last layer must not saturate either
        small.fc2.weight.normal_(0, 50)
    for x in [100 * torch.randn(8, 100), torch.full((8, 100), 1e30), torch.zeros(8, 100),
              torch.randn(8, 100) * 1e-30, -3e38 * torch.rand(8, 100)]:
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
    return (1 - S) ** 2 * sig(alpha * (S - a)) + (1 + S) * sig(alpha * (b - S)) + 1 - sig(alpha * (S - a)) - sig(alpha * (b - S))


def test_aao_weights_match_float64_and_eq16():
    S = torch.rand(3, 50, dtype=torch.float64)
    a, b = torch.tensor([0.8, 0.7, 0.9], dtype=torch.float64), torch.tensor([0.3, 0.2, 0.5], dtype=torch.float64)
    w = aao.aao_weights(S, a, b, 200.0)
    assert torch.allclose(w, float64_weights(S, a[:, None], b[:, None], 200.0))
    assert torch.allclose(aao.aao_weights(S, 0.8, 0.3), float64_weights(S, 0.8, 0.3, 200.0))
    # Far from the thresholds Eq. 17 is Eq. 16: (1-S)² above a, 1 between, 1+S below b.
    S = torch.tensor([[0.95, 0.6, 0.1]], dtype=torch.float64)
    assert torch.allclose(aao.aao_weights(S, 0.8, 0.3), torch.tensor([[0.05 ** 2, 1.0, 1.1]], dtype=torch.float64))


def test_aao_weights_gradcheck():
    S = torch.rand(2, 6, dtype=torch.float64, requires_grad=True)
    a = torch.tensor([0.7, 0.6], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.3, 0.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda S, a, b: aao.aao_weights(S, a, b, 5.0), (S, a, b))
    with torch.no_grad():  # α = 200 puts some tokens on the steep part of the sigmoids
        S.copy_(torch.tensor([[0.69, 0.71, 0.29, 0.31, 0.5, 0.9], [0.59, 0.61, 0.49, 0.51, 0.1, 0.55]]))
    assert torch.autograd.gradcheck(lambda S, a, b: aao.aao_weights(S, a, b, 200.0), (S, a, b), eps=1e-7)


def float64_contrastive(h_w, h_l, w_w, w_l, m_w, m_l):
    out = []
    for p in range(h_w.shape[0]):
        iw, il = m_w[p].nonzero().flatten().tolist(), m_l[p].nonzero().flatten().tolist()
        total = sum(w_w[p, i] * w_l[p, j] * F.cosine_similarity(h_w[p, i], h_l[p, j], dim=0) for i in iw for j in il)
        out.append(2 * total / (len(iw) * len(il)))
    return torch.stack(out)


def test_auxiliary_losses_match_float64():
    h_w, h_l = torch.randn(3, 7, 10, dtype=torch.float64), torch.randn(3, 5, 10, dtype=torch.float64)
    w_w, w_l = torch.rand(3, 7, dtype=torch.float64) * 2, torch.rand(3, 5, dtype=torch.float64) * 2
    m_w, m_l = rand_mask(3, 7), rand_mask(3, 5)
    got = aao.contrastive_suppression_loss(h_w, h_l, w_w, w_l, m_w, m_l)
    assert torch.allclose(got.double(), float64_contrastive(h_w, h_l, w_w, w_l, m_w, m_l), atol=1e-5)
    lp = -torch.rand(3, 7, dtype=torch.float64) * 4
    raw = -(lp * w_w * m_w).sum(1)
    assert torch.allclose(aao.reward_enhancement_loss(lp, w_w, m_w, length_normalized=False), raw)
    assert torch.allclose(aao.reward_enhancement_loss(lp, w_w, m_w), raw / (w_w * m_w).sum(1))
    assert torch.allclose(aao.total_loss(torch.ones(3), got, raw, 0.5, 2.0), 1 + 0.5 * got + 2 * raw)


def test_mixdpo_routes_small_margins_to_sft():
    pref, sft = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])
    assert torch.equal(aao.mixdpo_route(pref, sft, torch.tensor([0.5, 3.0, 1.0]), 1.0), torch.tensor([10.0, 2.0, 3.0]))


def objective_inputs(B=3, K=8, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.cat([rand_mask(B, K), rand_mask(B, K)]).float()
    return dict(policy_logps=-torch.rand(2 * B, K, generator=g) * 3, ref_logps=-torch.rand(2 * B, K, generator=g) * 3,
                mask=mask, embeds=torch.randn(2 * B, K, D, generator=g), hidden=torch.randn(2 * B, K, D, generator=g))


def test_weighting_none_is_plain_dpo():
    x = objective_inputs()
    out = aao.preference_objective(aao.Objective(weighting="none"), x["policy_logps"], x["ref_logps"], x["mask"])
    seq = lambda lp: (lp * x["mask"]).sum(1).double().chunk(2)
    (pc, pr), (rc, rr) = seq(x["policy_logps"]), seq(x["ref_logps"])
    assert torch.allclose(out.losses.double(), -F.logsigmoid(0.1 * ((pc - rc) - (pr - rr))), atol=1e-6)


def test_aao_with_all_tokens_transitional_is_dpo():
    """a -> 1 and b -> 0 from beyond: every token transitional, weight 1, and the preference term is DPO."""
    x = objective_inputs()
    B = 3
    obj = aao.Objective(weighting="aao", lambda_c=0.0, lambda_r=0.0)
    a, b = torch.full((B,), 1.1), torch.full((B,), -0.1)
    out = aao.preference_objective(obj, x["policy_logps"], x["ref_logps"], x["mask"], embeds=x["embeds"],
                                   hidden=x["hidden"], a=a, b=b)
    plain = aao.preference_objective(aao.Objective(weighting="none"), x["policy_logps"], x["ref_logps"], x["mask"])
    assert torch.allclose(out.losses, plain.losses, atol=1e-6)
    assert torch.allclose(out.weights[x["mask"].bool()], torch.tensor(1.0), atol=1e-6)


def test_identical_answers_weigh_shared_tokens_to_zero():
    x = objective_inputs()
    x["embeds"][3:] = x["embeds"][:3]
    x["mask"][3:] = x["mask"][:3]
    out = aao.preference_objective(aao.Objective(), x["policy_logps"], x["ref_logps"], x["mask"],
                                   embeds=x["embeds"], hidden=x["hidden"], a=torch.full((3,), 0.8), b=torch.full((3,), 0.4))
    assert out.weights[x["mask"].bool()].max() < 1e-6


def test_aao_objective_trains_the_thresholds():
    x = objective_inputs()
    mlp = aao.ThresholdMLP(20)
    torch.nn.init.normal_(mlp.fc2.weight, std=0.1)
    a, b = mlp(torch.randn(3, 20))
    x["policy_logps"].requires_grad_()
    out = aao.preference_objective(aao.Objective(), x["policy_logps"], x["ref_logps"], x["mask"],
                                   embeds=x["embeds"], hidden=x["hidden"], a=a, b=b)
    out.losses.sum().backward()
    assert mlp.fc1.weight.grad.abs().sum() > 0 and mlp.fc2.bias.grad.abs().sum() > 0
    m = aao.objective_metrics(out, x["mask"], a, b)
    assert abs(m["tokens/ambiguous"] + m["tokens/transitional"] + m["tokens/key"] - 1) < 1e-6
    assert 0 < m["b"] < m["a"] < 1 and set(m) >= {"rewards/chosen", "rewards/margin", "rewards/accuracy", "weights/mean"}


def test_random_weights_are_per_row_reproducible():
    mask = torch.ones(4, 10)
    w = aao.random_weights(mask, [5, 6, 7, 8])
    assert torch.equal(w[1], aao.random_weights(mask[:1], [6])[0])
    assert (w >= 0).all() and (w <= 2).all() and not torch.equal(w[0], w[1])


def cancellation_gradients(contexts_equal: bool, weights_for_c):
    """The DPO gradient on a tiny model for one pair whose answers share token c, with c's contribution
    (log-prob in the loss) weighted by weights_for_c in both answers; returns the flat gradient."""
    m = M.init_weights(M.Transformer(M.tiny_config(40)), seed=0, std=0.2).double()
    prompt, c, k_w, k_l = [3, 4, 5], 7, 11, 12
    if contexts_equal:  # c right after the prompt in both answers, then the answers differ
        chosen, rejected = prompt + [c, k_w], prompt + [c, k_l]
    else:  # the answers differ first, so c follows different contexts
        chosen, rejected = prompt + [k_w, c], prompt + [k_l, c]
    ids = torch.tensor([chosen, rejected])
    lp = m(ids)[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (2, 4); answers at 2 and 3
    c_pos = 2 if contexts_equal else 3
    w = torch.ones(2, 4, dtype=torch.float64)
    w[:, c_pos] = weights_for_c
    mask = torch.tensor([[0, 0, 1, 1]] * 2, dtype=torch.float64)
    ref = lp.detach() - 0.3  # a reference a little behind the policy; the same for c in the same context
    seq = aao.weighted_sequence_logps(lp, w, mask)
    ref_seq = aao.weighted_sequence_logps(ref, w, mask)
    aao.dpo_loss(seq[:1], seq[1:], ref_seq[:1], ref_seq[1:], 0.1).sum().backward()
    return torch.cat([p.grad.flatten() for p in m.parameters()])


def test_gradient_cancellation_of_shared_tokens():
    """§2.2, Eq. 5-6: a token shared by both answers in the same context gets equal and opposite DPO
    gradients from the chosen and rejected paths: DPO with c equals DPO without c. In different contexts
    the two contributions no longer cancel: c pulls θ both ways. AAO's weight (1-S)² ≈ 0 for c (S = 1)
    removes that conflicting contribution."""
    same_with, same_without = cancellation_gradients(True, 1.0), cancellation_gradients(True, 0.0)
    assert (same_with - same_without).norm() < 1e-12 * same_without.norm()
    diff_with, diff_without = cancellation_gradients(False, 1.0), cancellation_gradients(False, 0.0)
    assert (diff_with - diff_without).norm() > 0.05 * diff_without.norm()
    w_c = aao.aao_weights(torch.tensor([[1.0]], dtype=torch.float64), 0.8, 0.4).item()  # S = 1 for c
    assert w_c < 1e-12
    assert (cancellation_gradients(False, w_c) - diff_without).norm() < 1e-9 * diff_without.norm()


# ============================================================================= data.py

import data  # noqa: E402

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def word_tokenizer(words, specials=LLAMA3_SPECIALS, bos_post_processor=True):
    """A word-level tokenizer with Llama 3's special tokens whose ids a test can predict by hand; like Llama
    3's tokenizer.json, its post-processor adds <|begin_of_text|> on its own."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    vocab = {w: i for i, w in enumerate(["<unk>"] + sorted(set(words)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s+|\w+|[^\w\s]"), behavior="isolated")
    tok.add_special_tokens(specials)
    if bos_post_processor:
        bos = specials[0]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


WORDS = ["user", "assistant", "system", "\n\n", "What", " ", "is", "2", "+", "?", "4", "5", ".", "It", "Cutting", "Knowledge",
         "Date", ":", "December", "2023", "\n", "Today", "26", "Jul", "2024", "Be", "brief", "Human", "Assistant", "[", "INST", "]",
         "/", "<", "|", ">", "s"]


def test_llama3_pair_exact_token_ids():
    tok = word_tokenizer(WORDS)
    row = {"prompt": "What is 2+2?", "chosen": "It is 4.", "rejected": "It is 5."}
    out = data.tokenize_pair(tok, row, "llama3")
    ids = lambda *toks: [tok.token_to_id(t) for t in toks]
    assert out["prompt_ids"] == ids("<|begin_of_text|>", "<|start_header_id|>", "user", "<|end_header_id|>", "\n\n",
                                    "What", " ", "is", " ", "2", "+", "2", "?", "<|eot_id|>",
                                    "<|start_header_id|>", "assistant", "<|end_header_id|>", "\n\n")
    assert out["chosen_ids"] == ids("It", " ", "is", " ", "4", ".", "<|eot_id|>")
    assert out["rejected_ids"] == ids("It", " ", "is", " ", "5", ".", "<|eot_id|>")
    assert tok.encode("x").ids[0] == tok.token_to_id("<|begin_of_text|>")  # the post-processor would add one


def test_llama31_opens_with_the_dated_system_block():
    tok = word_tokenizer(WORDS)
    row = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
           "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]}
    text = tok.decode(data.tokenize_pair(tok, row, "llama31")["prompt_ids"], skip_special_tokens=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                           "December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user")
    bare = data.render_prompt([{"role": "user", "content": "hi"}], data.TEMPLATES["llama31"], {})
    assert "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>" in bare


@pytest.mark.parametrize("name,prompt,answer", [
    ("mistral", "<s>[INST] Be brief.\n\nhi [/INST]", "yes</s>"),
    ("zephyr", "<s><|system|>\nBe brief.</s>\n<|user|>\nhi</s>\n<|assistant|>\n", "yes</s>"),
    ("plain", "<s>Be brief.\n\nHuman: hi\n\nAssistant:", " yes</s>"),
])
def test_other_templates_render(name, prompt, answer):
    specials = {"bos": "<s>", "eos": "</s>"}
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " hi "}]
    assert data.render_prompt(msgs, data.TEMPLATES[name], specials) == prompt
    assert data.render_answer("yes", data.TEMPLATES[name], specials) == answer


def test_exactly_one_bos_and_identical_prompts_for_every_template():
    tok = word_tokenizer(WORDS)
    bos = tok.token_to_id("<|begin_of_text|>")
    row = {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.", "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: It is 5."}
    for name in ("llama3", "llama31", "zephyr", "plain"):
        out = data.tokenize_pair(tok, row, name)
        rows = [out["prompt_ids"] + out["chosen_ids"], out["prompt_ids"] + out["rejected_ids"]]
        assert all(r.count(bos) == 1 and r[0] == bos for r in rows), name


def test_layouts_parse_to_the_same_pair():
    msgs = lambda answer: [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": answer}]
    layouts = [
        {"prompt": "Q?", "chosen": "good", "rejected": "bad"},
        {"prompt": "Q?", "chosen": msgs("good"), "rejected": msgs("bad")},  # UltraFeedback binarized
        {"prompt": [{"role": "user", "content": "Q?"}], "chosen": [{"role": "assistant", "content": "good"}],
         "rejected": [{"role": "assistant", "content": "bad"}]},  # TRL conversational
        {"chosen": msgs("good"), "rejected": msgs("bad")},  # shared leading turns
        {"chosen": "\n\nHuman: Q?\n\nAssistant: good", "rejected": "\n\nHuman: Q?\n\nAssistant: bad"},  # HH
    ]
    for row in layouts:
        p = data.parse_row(row)
        assert (p.prompt, p.chosen.strip(), p.rejected.strip()) == ([{"role": "user", "content": "Q?"}], "good", "bad"), row


def test_hh_multi_turn_prompt_and_shared_answer_start():
    dialogue = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Is it safe?\n\nAssistant:"
    p = data.parse_row({"chosen": dialogue + " I think so, yes.", "rejected": dialogue + " I think not."})
    assert p.prompt == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                        {"role": "user", "content": "Is it safe?"}]
    assert (p.chosen.strip(), p.rejected.strip()) == ("I think so, yes.", "I think not.")


def test_margin_and_beta_columns():
    p = data.parse_row({"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": 8.5, "score_rejected": 6, "beta": 0.3})
    assert p.margin == 2.5 and p.beta == 0.3
    assert data.parse_row({"prompt": "q", "chosen": "a", "rejected": "b", "w": 2.0}, beta_column="w").beta == 2.0


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "q", "chosen": "a", "rejected": ', ":3: not valid JSON"),
    ('{"prompt": "q", "chosen": "a"}', ":3: missing field 'rejected'"),
    ('{"prompt": "q", "chosen": "  ", "rejected": "b"}', ":3: 'chosen' is empty"),
    ('{"prompt": "q", "chosen": 5, "rejected": "b"}', ":3: 'chosen' must be a string or a list of messages, got int"),
    ('{"chosen": [{"role": "bot", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}', ":3: unknown role 'bot'"),
    ('{"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": "high", "score_rejected": 1}', ":3: 'score_chosen' and"),
    ('["not", "an", "object"]', ":3: a row must be a JSON object"),
])
def test_bad_rows_name_file_and_line(tmp_path, line, message):
    f = tmp_path / "data.jsonl"
    f.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n\n' + line + "\n")
    with pytest.raises(data.DataError) as e:
        data.tokenize_rows(word_tokenizer(WORDS), data.read_rows(f), "plain")
    assert str(e.value).startswith(f"{f}{message}"), str(e.value)


def test_parquet_is_read_or_explained(tmp_path):
    f = tmp_path / "d.parquet"
    try:
        import pyarrow
        import pyarrow.parquet as pq
        pq.write_table(pyarrow.Table.from_pylist([{"prompt": "q", "chosen": "a", "rejected": "b"}]), f)
        assert data.read_rows(f)[0][1]["chosen"] == "a"
    except ImportError:
        f.write_bytes(b"PAR1")
        with pytest.raises(data.DataError, match="pyarrow"):
            data.read_rows(f)


def test_identical_answers_skipped_and_counted():
    rows = [("f:1", {"prompt": "q", "chosen": "It is 4.", "rejected": "It is 4."}), ("f:2", {"prompt": "q", "chosen": "4", "rejected": "5"})]
    tok = word_tokenizer(WORDS)
    pairs, report = data.tokenize_rows(tok, rows, "plain")
    assert len(pairs) == 1 and report["dropped_identical"] == 1
    assert len(data.tokenize_rows(tok, rows, "plain", keep_identical=True)[0]) == 2


def test_truncation_keeps_bos_and_prompt_end_and_drops_pairs_without_room():
    tok = word_tokenizer(WORDS)
    row = {"prompt": "What is 2+2? " * 10 + "Be brief.", "chosen": "It is 4. " * 5, "rejected": "It is 5."}
    full = data.tokenize_pair(tok, row, "llama3", max_length=10_000, max_prompt_length=10_000)
    out = data.tokenize_pair(tok, row, "llama3", max_length=20, max_prompt_length=12)
    assert out["prompt_ids"] == full["prompt_ids"][:1] + full["prompt_ids"][-11:] and out["prompt_truncated"]
    assert out["chosen_ids"] == full["chosen_ids"][:8] and out["rejected_ids"] == full["rejected_ids"][:8]
    assert out["answer_truncated"]
    pairs, report = data.tokenize_rows(tok, [("f:1", row)], "llama3", max_length=12, max_prompt_length=12)
    assert pairs == [] and report["dropped_no_answer_room"] == 1


def test_collate_masks_answers_and_pads_right():
    pairs = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6], "margin": 1.0, "beta": None},
             {"prompt_ids": [1, 7], "chosen_ids": [8, 9, 10, 11], "rejected_ids": [12, 13], "margin": None, "beta": 0.2}]
    b = data.collate(pairs, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0], [1, 7, 8, 9, 10, 11], [1, 2, 3, 6, 0, 0], [1, 7, 12, 13, 0, 0]]
    assert b["loss_mask"].tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0], [0, 0, 1, 1, 0, 0]]
    assert b["margin"][0] == 1.0 and b["margin"][1].isnan() and b["beta"][1] == pytest.approx(0.2) and b["beta"][0].isnan()


def test_n_processes_see_the_global_batches_of_one():
    one = data.PairSampler(100, 12, seed=3)
    ranks = [data.PairSampler(100, 12, seed=3, rank=r, world_size=4) for r in range(4)]
    for step in range(20):  # crosses the epoch boundary at step 8
        assert sum((s.batch(step) for s in ranks), []) == one.batch(step)
    assert sorted(sum((one.batch(s) for s in range(8)), [])) == sorted(set(sum((one.batch(s) for s in range(8)), [])))
    assert one.batch(0) != one.batch(8) and one.batch(0) != data.PairSampler(100, 12, seed=4).batch(0)


def test_sampler_position_round_trip():
    s = data.PairSampler(50, 4, seed=1)
    for _ in range(7):
        next(s)
    state = json.loads(json.dumps(s.state_dict()))
    t = data.PairSampler(50, 4, seed=0)
    t.load_state_dict(state)
    assert [next(t) for _ in range(10)] == [next(s) for _ in range(10)]


def test_curriculum_orders_easy_to_hard():
    margins = [0.5, 3.0, 1.0, 2.0, 5.0, 0.1]
    s = data.PairSampler(6, 2, margins=margins)
    assert [s.batch(i) for i in range(3)] == [[4, 1], [3, 2], [0, 5]]


def test_synthetic_set_is_seeded_ambiguous_and_held_out_is_new():
    train, heldout = data.synthetic_rows(0)
    assert data.synthetic_rows(0)[0][:50] == train[:50] and data.synthetic_rows(1)[0][:50] != train[:50]
    key = lambda r: (r["prompt"], r["chosen"], r["rejected"])
    assert not {key(r) for _, r in heldout} & {key(r) for _, r in train}
    tok = data.tiny_tokenizer()
    shared = []
    for _, row in train[:200]:
        p = data.tokenize_pair(tok, row, "plain")
        c, r = p["chosen_ids"], p["rejected_ids"]
        shared.append(len(set(c) & set(r)) / len(set(c) | set(r)))
    assert sum(s > 0.6 for s in shared) / len(shared) > 0.7  # most pairs share most tokens
    assert sum(s < 0.3 for s in shared) / len(shared) > 0.1  # some differ freely


# ============================================================================= train.py

import train  # noqa: E402


def run(*args, torchrun=0, timeout=300):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] if torchrun else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if torchrun else os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.run(launcher + [str(HERE / "train.py"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=HERE)


def losses(out: Path) -> list:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_embedded_run_learns_and_transformers_loads_the_output(tmp_path):
    r = run("--max-steps", 40, "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 41)) and all("loss" in row for row in rows)
    loss = [row["loss"] for row in rows]
    assert sum(loss[-5:]) / 5 < sum(loss[:5]) / 5 - 0.5
    evals = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert evals[0]["eval/accuracy"] == 0.5 and evals[-1]["eval/accuracy"] > 0.55
    assert "held-out preference accuracy: 0.500 before" in r.stdout
    page = (tmp_path / "run" / "weights.html").read_text()
    assert page.count('class="t ') > 100 and "ambiguous" in page
    transformers = pytest.importorskip("transformers")
    final = tmp_path / "run" / "final"
    hf = transformers.AutoModelForCausalLM.from_pretrained(final).eval()
    ours = M.load_model(final)
    ids = torch.randint(0, ours.config.vocab_size, (2, 24))
    assert (hf_logits(hf, ids) - ours(ids)).abs().max() < 1e-4


def test_torchrun_two_processes_give_the_one_process_losses(tmp_path):
    one = run("--max-steps", 6, "--out", tmp_path / "one")
    two = run("--max-steps", 6, "--out", tmp_path / "two", torchrun=2)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 6
    assert all(abs(x - y) <= 1e-3 * abs(x) for x, y in zip(a, b)), (a, b)


def test_kill_and_resume_continue_with_the_same_losses(tmp_path):
    args = ["--max-steps", 12, "--save-every", 4]
    assert run(*args, "--out", tmp_path / "whole").returncode == 0
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, str(HERE / "train.py"), *map(str, args), "--out", str(out)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=HERE)
    while not (out / "step-4").exists() and p.poll() is None:
        pass
    p.kill()  # SIGKILL: no cleanup runs
    p.wait()
    assert not (out / "final").exists(), "the run finished before the kill"
    r = run("--resume", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout and "step 4" in r.stdout
    assert losses(out) == losses(tmp_path / "whole")


def test_two_process_resume_restores_the_threshold_mlp_from_rank_0(tmp_path):
    out = tmp_path / "run"
    assert run("--max-steps", 4, "--save-every", 2, "--out", out, torchrun=2).returncode == 0
    whole = losses(out)
    rank1 = safe_open(out / "step-2" / "train-state-00001-of-00002.safetensors", framework="pt")
    assert not [k for k in rank1.keys() if k.startswith(("mlp.", "optim/mlp."))]  # one copy, in rank 0's file
    shutil.rmtree(out / "final")  # as if killed after step 2's checkpoint
    r = run("--resume", out, torchrun=2)
    assert r.returncode == 0 and "at step 2" in r.stdout, r.stderr[-3000:]
    assert losses(out) == whole


def test_broken_data_file_is_one_line_without_traceback(tmp_path):
    f = tmp_path / "broken.jsonl"
    f.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a" "rejected": "b"}\n')
    r = run("--data", f, "--out", tmp_path / "run")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr + r.stdout
    errors = [line for line in r.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and f"{f}:2:" in errors[0]


def test_nan_loss_stops_and_names_step_and_batch(tmp_path):
    r = run("--max-steps", 6, "--lr", 1e20, "--save-every", 1, "--out", tmp_path / "run")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "error: step 2: the loss is nan on the batch of pairs synthetic-train:" in r.stderr
    assert "last good checkpoint is" in r.stderr and (tmp_path / "run" / "step-1" / "model.safetensors").exists()


def in_process(tmp_path, *args):
    out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
    assert train.main(["--max-steps", "3", "--eval-every", "3", "--out", str(out), *map(str, args)]) == 0
    return out


@pytest.mark.parametrize("args", [
    ["--loss", "ipo", "--weighting", "none"], ["--loss", "cdpo", "--weighting", "random"], ["--loss", "hinge"],
    ["--loss", "simpo"], ["--loss", "simpo", "--weighting", "none"], ["--loss", "sft", "--weighting", "none"],
    ["--curriculum", "margin", "--sft-below-margin", 5.0], ["--reward-sum", "--activation-checkpointing"],
])
def test_objective_variants_train(tmp_path, args):
    rows = [json.loads(line) for line in (in_process(tmp_path, *args) / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows) and "eval/accuracy" in rows[-1]


def test_precomputed_reference_gives_the_live_losses(tmp_path):
    live = losses(in_process(tmp_path, "--seed", 1))
    cached = losses(in_process(tmp_path, "--seed", 1, "--precompute-ref"))
    assert live == pytest.approx(cached, rel=1e-5)


def test_per_pair_beta_column_from_a_file(tmp_path):
    train_rows, _ = data.synthetic_rows(0, n_train=200, n_heldout=0)
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps({**row, "gap": 0.05 + 0.1 * (i % 3)}) + "\n" for i, (_, row) in enumerate(train_rows)))
    out = in_process(tmp_path, "--data", f, "--beta-column", "gap", "--eval-pairs", 16)
    assert (out / "final" / "model.safetensors").exists()
    with pytest.raises(data.DataError, match="--beta-column nope: some rows have no such column"):
        train.load_data(train.parse_args(["--data", str(f), "--beta-column", "nope"]), data.tiny_tokenizer())
