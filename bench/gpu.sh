#!/usr/bin/env bash
# The GPU checks (the serving path, the kernels) in one device call (the GPU box has no Ray):
#   bash bench/gpu.sh "$OUT"
# The Wan VAE decode rows need diffusers, which that image lacks: carry its wheel (and importlib_metadata's)
# in .whl/ (see the device tool's README: pip download --no-deps --only-binary=:all: --python-version 3.12 ...).
set -uo pipefail
out=${1:-bench/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
status=0
# each script keeps going when the other fails: one broken row must not cost the whole device call
python3 bench/gpu_service.py --out "$out/gpu_service.json" 2>&1 | tee "$out/gpu_service.log" || status=1
python3 bench/kernels.py --out "$out/kernels.json" 2>&1 | tee "$out/kernels.log" || status=1
exit $status
