"""Greedy generation speed on the CPU: tokens/s of model.generate against transformers' on the same
checkpoint and prompts, at batch 1 and 8, in fp32 and bf16, each the median of a few timed runs.

    # a ~50M-parameter Llama-3-shaped random model
    OMP_NUM_THREADS=2 python experiments/generation_speed.py
    # a real checkpoint
    python experiments/generation_speed.py --weights DIR
    # a few seconds: the test's setting
    python experiments/generation_speed.py --tiny --new-tokens 4 --reps 1

Neither side is given a stop token, so every row makes all its new tokens. `same` counts the rows
whose tokens agree: greedy decoding of random weights meets near-ties, which bf16 rounding may break
either way.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import model as M  # noqa: E402


def llama3_shaped() -> M.ModelConfig:
    """Llama 3.1's proportions at ~50M parameters: 4 query heads per kv head, an MLP 3.5x wide,
    llama3 rope."""
    return M.ModelConfig(
        hidden_size=512,
        intermediate_size=1792,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=32000,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling=M.llama3_rope_scaling(8192),
        bos_token_id=0,
        eos_token_id=1,
    )


def transformers_generate(hf, prompts, new_tokens):
    """transformers' greedy generate of a left-padded batch, as its documentation asks for
    decoder-only models."""
    longest = max(map(len, prompts))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(
        ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens, pad_token_id=0
    )
    return out[:, longest:].tolist()


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def measure(ours, hf, prompts, new_tokens, reps) -> dict:
    """Seconds per call (median) of both sides, runs interleaved so that a busy moment hits both."""
    run_ours = lambda: M.generate(ours, prompts, new_tokens)
    run_hf = lambda: transformers_generate(hf, prompts, new_tokens)
    mine, theirs = run_ours(), run_hf()  # warm-up, and the tokens to compare
    times = [(timed(run_ours)[0], timed(run_hf)[0]) for _ in range(reps)]
    return {
        "ours": statistics.median(t[0] for t in times),
        "transformers": statistics.median(t[1] for t in times),
        "same": sum(a == b for a, b in zip(mine, theirs)),
    }


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--weights", help="a Hugging Face directory (default: a random Llama-3-shaped model)"
    )
    p.add_argument(
        "--tiny", action="store_true", help="the built-in tiny Llama instead of the ~50M one"
    )
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument(
        "--reps", type=int, default=3, help="timed runs per measurement (after one warm-up)"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import transformers

    transformers.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if weights is None:
            cfg = M.tiny_config(1000) if args.tiny else llama3_shaped()
            M.save_model(M.init_weights(M.Transformer(cfg), args.seed), tmp)
            weights = tmp
        cfg = M.read_config(weights)
        g = torch.Generator().manual_seed(args.seed)
        lengths = torch.randint(16, 65, (8,), generator=g).tolist()  # prompts of 16 to 64 tokens
        prompts = [torch.randint(2, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
        n_params = sum(p.numel() for p in M.Transformer(cfg).to("meta").parameters())
        print(
            f"{args.weights or 'random ' + ('tiny' if args.tiny else 'Llama-3-shaped')} model, "
            f"{n_params / 1e6:.1f}M parameters; greedy, {args.new_tokens} new tokens, "
            f"prompts of {lengths} tokens; median of {args.reps}; torch {torch.__version__}, "
            f"transformers {transformers.__version__}, {torch.get_num_threads()} threads"
        )
        print(
            f"{'dtype':9} {'batch':>5} {'ours tok/s':>11} {'transformers tok/s':>19} "
            f"{'ratio':>6} {'same':>5}"
        )
        for dtype in (torch.float32, torch.bfloat16):
            ours = M.load_model(weights, dtype=dtype)
            hf = transformers.AutoModelForCausalLM.from_pretrained(
                weights, dtype=dtype, attn_implementation="sdpa"
            ).eval()
            hf.generation_config.eos_token_id = None  # no early stop: both make every token
            for batch in (1, 8):
                r = measure(ours, hf, prompts[:batch], args.new_tokens, args.reps)
                mine, theirs = (
                    batch * args.new_tokens / r["ours"],
                    batch * args.new_tokens / r["transformers"],
                )
                print(
                    f"{str(dtype).removeprefix('torch.'):9} {batch:5} {mine:11.1f} {theirs:19.1f} "
                    f"{mine / theirs:6.2f} {r['same']:>3}/{batch}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
