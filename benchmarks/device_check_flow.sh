#!/usr/bin/env bash
# Issue 26's device check (flow matching), run on a lent H100/H200 through the device tool, from the repo root:
#   carry [".whl"], command: bash benchmarks/device_check_flow.sh      (timeout_s ~420)
# Prepare the wheels first, here: ../shared/tools/device-wheels.sh importlib_metadata==8.7.0
# SD3-medium's real shape (random weights, fp16, 1024 px, N = 28) on the pipeline path users run: the measured
# latency-per-rows curve (auto's "latency_per_rows_ms"), every sampler's first call apart from steady state, what
# auto picks; then the same for FLUX.1-dev's shape when the budget allows (12 B parameters, 24 GB in fp16).
set -uo pipefail
source benchmarks/device_env.sh
timeout ${BENCH_S:-330} python3 -m benchmarks.gpu_samplers --out "$OUT" --sections ${SECTIONS:-sd3,flux} \
  --budget-s ${BUDGET_S:-280} ${BENCH_ARGS:-} 2>&1 | tee "$OUT/gpu-samplers-flow.log" | tail -30
