#!/usr/bin/env bash
# One device check, run on a lent H100/H200 through the device tool, from the repo root:
#   carry [".whl"], command: bash benchmarks/device_check.sh
# Prepare the wheels first, here: ../shared/tools/device-wheels.sh importlib_metadata==8.7.0
# Installs the carried wheels, runs the GPU tests and the runtime benchmark; everything lands in $OUT.
set -uo pipefail
OUT=${OUT:-benchmarks/results/device}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
timeout 150 python3 -m pytest -q -m gpu tests/test_gpu_runtime.py -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log"
timeout 420 python3 -m benchmarks.gpu_runtime --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
