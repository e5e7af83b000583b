#!/usr/bin/env bash
# Run THERE, on a lent GPU machine, in one call (see gpu_prepare.sh): installs the carried wheels,
# runs benchmarks/gpu.py within its time budget and leaves the results JSON and the log in $OUT.
# Extra arguments go to gpu.py, e.g. `--no-comparisons --levers packing,all` for a second call.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FORCE_QWENVL_VIDEO_READER=decord
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out" /tmp/gpu-work && cp -r .gpu/work/. /tmp/gpu-work/
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/card.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 benchmarks/gpu.py --workdir /tmp/gpu-work --out "$out" --budget-s 400 "$@" 2>&1 | tee "$out/gpu.log"
