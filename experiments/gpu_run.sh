#!/usr/bin/env bash
# The GPU check as one command, for a machine with one CUDA GPU and torch (a GPU image), in the
# repository's root. About 9 minutes at most on an H200: every part has its own time limit.
#
#   bash experiments/gpu_run.sh wheels   # first, where pip reaches the registry: TRL's wheels -> .whl/
#   bash experiments/gpu_run.sh          # then on the GPU machine, with .whl/ beside the tree
#   bash experiments/gpu_run.sh full     # the whole table instead (Llama-3.1-8B's shape too)
#
# GPU images ship torch and transformers but not TRL: its wheels and the three it needs beyond
# them travel in .whl/ (ignored by git) and are installed into a scratch folder on PYTHONPATH.
# Everything lands in $OUT (default out/gpu_run): env.txt, cuda_tests.txt, train.txt, table.md,
# results.json, profile.txt (and profile-compiled.txt), log.txt.
set -uo pipefail
OUT=${OUT:-out/gpu_run}
WHEELS="trl==1.16.0 datasets==4.7.0 dill==0.4.0 multiprocess==0.70.18"

if [ "${1:-}" = wheels ]; then
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl $WHEELS
    exit
fi

mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/aao-site .whl/*.whl && export PYTHONPATH=/tmp/aao-site
fi
# --compile both where model.build_sharded can compile its blocks, else eager alone
COMPILE=$(python3 -c "import inspect, model
print('both' if 'compile_blocks' in inspect.signature(model.build_sharded).parameters else 'off')")

echo "== env"
{
    nvidia-smi -L
    python3 -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__)"
    python3 -c "import trl, datasets; print('trl', trl.__version__)" || echo "no TRL"
    echo "compile: $COMPILE"
} 2>&1 | tee "$OUT/env.txt"

echo "== the CUDA tests"
timeout 150 python3 -m pytest test_aao.py -q -k "cuda or gpu" -p no:cacheprovider 2>&1 |
    tee "$OUT/cuda_tests.txt"

echo "== train.py on the GPU: the allocator and the reference placement it chose"
timeout 60 python3 train.py --max-steps 3 --eval-every 100 --quiet --device cuda \
    --out /tmp/aao-tiny 2>&1 | tee "$OUT/train.txt"

if [ "${1:-}" = full ]; then
    echo "== gpu_check.py, the whole table"
    timeout 420 python3 experiments/gpu_check.py --compile "${COMPILE/both/on}" --out "$OUT"
    exit
fi
echo "== gpu_check.py --quick: Llama-3.2-1B's shape at 8 pairs, eager and compiled, TRL beside"
timeout 240 python3 experiments/gpu_check.py --quick --compile "$COMPILE" --steps 5 --out "$OUT"
echo "== gpu_check.py --profile: one step at 8 pairs, its top kernels"
timeout 110 python3 experiments/gpu_check.py --profile --compile "$COMPILE" --out "$OUT"
