#!/usr/bin/env bash
# On a CUDA machine: check every Triton kernel against the float64 reference at the benchmark's
# shapes (bf16, fp16), time the benchmark grid (the CSV is rewritten after every point), check the
# H200 bars, then run the kernel tests compiled (fp32, fp16, bf16). Estimated at about 5 minutes on
# an H200. The CSV goes to results/kernels/<device>.csv, or to $OUT/kernels.csv when OUT is set
# (the device tool's output folder). Extra arguments go to bench-kernels.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python3 -c "import lorabench.kernels" 2>/dev/null \
    || python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
status=0
# The grid first: within a tight device budget it is what must come back.
python3 -m lorabench bench-kernels --device-check ${OUT:+--out "$OUT/kernels.csv"} "$@" || status=$?
LORABENCH_TRITON_COMPILED=1 python3 -m pytest -q -p no:cacheprovider \
    tests/test_kernels_single.py tests/test_kernels_per_lora.py tests/test_kernels_paged.py \
    tests/test_kernels_compressed.py || status=$?
exit "$status"
