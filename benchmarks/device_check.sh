#!/usr/bin/env bash
# One device check, run on a lent H100/H200 through the device tool, from the repo root:
#   carry [".whl"], command: bash benchmarks/device_check.sh
# Prepare the wheels first, here: ../shared/tools/device-wheels.sh importlib_metadata==8.7.0
# Installs the carried wheels, runs the GPU tests, the runtime benchmark and a CUDA generate; all lands in $OUT.
set -uo pipefail
source benchmarks/device_env.sh
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
timeout 150 python3 -m pytest -q -rA -m gpu tests/test_gpu_runtime.py -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/gpu-tests.log"
timeout 420 python3 -m benchmarks.gpu_runtime --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tail -40 | tee "$OUT/bench.log"
timeout 60 python3 -m srds_trt.generate --device cuda --quiet --out /tmp/gen 2>&1 | tail -3; cp /tmp/gen/stats.json "$OUT/generate_cuda_stats.json" 2>/dev/null || true
