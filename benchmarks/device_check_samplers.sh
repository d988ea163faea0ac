#!/usr/bin/env bash
# Issue 13's device check, run on a lent H100/H200 through the device tool, from the repo root:
#   carry [".whl"], command: bash benchmarks/device_check_samplers.sh      (timeout_s ~480)
# Prepare the wheels first, here: ../shared/tools/device-wheels.sh importlib_metadata==8.7.0
# GPU tests (window runners included), then every sampler's wall clock on the pipeline (digits N=1024/196/100,
# SD2 random-weight shapes N=50/25; first call apart from steady state; what auto picks), then generate's CLI.
set -uo pipefail
source benchmarks/device_env.sh
timeout ${TESTS_S:-110} python3 -m pytest -q -rA -m gpu tests/test_gpu_runtime.py -p no:cacheprovider 2>&1 | tail -40 > "$OUT/gpu-tests.log"
tail -3 "$OUT/gpu-tests.log"
timeout ${BENCH_S:-320} python3 -m benchmarks.gpu_samplers --out "$OUT" --budget-s ${BUDGET_S:-270} ${BENCH_ARGS:-} 2>&1 | tee "$OUT/gpu-samplers.log" | tail -45
for s in auto eps-picard; do
  timeout 45 python3 -m srds_trt.generate --device cuda --steps 1024 --prompt 3 --sampler $s --quiet --out /tmp/gen-$s 2>&1 | tail -2
  cp /tmp/gen-$s/stats.json "$OUT/generate-digits-N1024-$s-stats.json" 2>/dev/null || true
done
