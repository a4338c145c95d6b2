import os

# Triton kernels run on the CPU through Triton's interpreter; it must be chosen before triton is
# imported. Set LORABENCH_TRITON_COMPILED=1 to test the compiled kernels on a GPU instead.
if os.environ.get("LORABENCH_TRITON_COMPILED") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
