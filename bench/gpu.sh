#!/usr/bin/env bash
# The GPU checks of the engine and kernel issues, in one device call (the GPU box has no Ray):
#   bash bench/gpu.sh "$OUT"
# The Wan VAE decode rows need diffusers, which that image lacks: carry its wheel in .whl/ (see the
# device tool's README: pip download --no-deps --only-binary=:all: --python-version 3.12 ... diffusers).
set -euo pipefail
out=${1:-bench/out}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 bench/gpu_engine.py --out "$out/gpu_engine.json"
python3 bench/kernels.py --out "$out/kernels.json"
