#!/usr/bin/env bash
# On a CUDA machine: test every Triton kernel compiled (fp32, fp16, bf16), check them against the
# float64 reference at the benchmark's shapes, then time the benchmark grid and write
# results/kernels/<device>.csv (about 5 minutes on an H200). Extra arguments go to bench-kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python3 -c "import lorabench.kernels" 2>/dev/null \
    || python3 -m pip install -q --no-deps --no-build-isolation -e .
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
LORABENCH_TRITON_COMPILED=1 python3 -m pytest -q -x -p no:cacheprovider \
    tests/test_kernels_single.py tests/test_kernels_per_lora.py tests/test_kernels_paged.py tests/test_kernels_compressed.py
python3 -m lorabench bench-kernels --device-check "$@"
