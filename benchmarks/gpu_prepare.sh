#!/usr/bin/env bash
# Run HERE (the build machine) before a GPU session's one device call: puts into .gpu/ (ignored by git)
# what the lent machine lacks: wheels of transformers 5.24, qwen-vl-utils and decord for its Python 3.12,
# and the benchmark's video clips (it has no PyAV). Then, with the device tool:
#   run(command="bash benchmarks/gpu_device.sh", carry=[".gpu"], timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu/work
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux2010_x86_64 -d .gpu transformers==5.24.0 qwen-vl-utils==0.0.14 decord==0.6.0
.venv/bin/python benchmarks/gpu.py --clips-only --workdir .gpu/work
du -sh .gpu
