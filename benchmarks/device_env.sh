# Sourced by the device checks (benchmarks/device_check*.sh) on a lent GPU machine, from the repo root: installs the
# carried wheels (.whl, from ../shared/tools/device-wheels.sh), sets the environment, makes $OUT, records the GPU.
OUT=${OUT:-benchmarks/results/device}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
