"""Every Triton kernel compiles for an H100/H200 (sm_90) without a GPU, and does not spill.

The interpreter runs kernels as NumPy code, so it cannot see code that does not compile to PTX, or
register tiles too large for the hardware; Triton's ahead-of-time compiler (with the ptxas it
ships) can, on any machine.
"""

import json
import os
import subprocess
import sys

KERNELS = {
    "_single_shrink_kernel", "_single_expand_kernel", "_sgmv_shrink_kernel", "_sgmv_expand_kernel",
    "_bgmv_shrink_kernel", "_bgmv_expand_kernel", "_paged_shrink_kernel", "_paged_expand_kernel",
    "_compressed_mix_kernel",
}


def test_kernels_compile_for_sm90_without_spills():
    code = (
        "import json; from lorabench.kernels.aot import compile_all; "
        "print(json.dumps(compile_all(90, dtypes=('bf16',), block_ms=(16, 64))))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert {row["kernel"] for row in rows} == KERNELS
    assert {row["R_PAD"] for row in rows} == {16, 128}
    spilled = [row for row in rows if row["stack_bytes"] > 0]
    assert not spilled, spilled
