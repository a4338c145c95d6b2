"""Every Triton kernel compiles for an H100/H200 (sm_90) without a GPU, as the GPU would build it.

The interpreter runs kernels as NumPy code, so it cannot see code that does not compile to PTX,
register tiles too large for the hardware, or loads the compiler does not pipeline; Triton's
ahead-of-time compiler (with the ptxas it ships) can, on any machine. The launches are the wrappers'
own (captured on CPU tensors) and specialized as Triton's JIT specializes them on CUDA.
"""

import json
import os
import subprocess
import sys

import pandas as pd

KERNELS = {
    "_single_shrink_kernel", "_single_expand_kernel", "_sgmv_shrink_kernel", "_sgmv_expand_kernel",
    "_bgmv_shrink_kernel", "_bgmv_expand_kernel", "_paged_shrink_kernel", "_paged_expand_kernel",
    "_compressed_mix_kernel",
}
# Kernels built on tl.dot (the bgmv kernels and a diagonal S are per-element products).
DOT_KERNELS = KERNELS - {"_bgmv_shrink_kernel", "_bgmv_expand_kernel"}


def compiled(code: str, timeout: int = 900) -> str:
    """Run `code` in a fresh interpreter without TRITON_INTERPRET (the tests' conftest sets it)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_kernels_compile_for_sm90_without_spills_with_pipelined_loads():
    out = compiled("import json; from lorabench.kernels.aot import compile_all; "
                   "print(json.dumps(compile_all(90, dtypes=('bf16',), block_ms=(16, 64))))")
    rows = pd.DataFrame(json.loads(out.strip().splitlines()[-1]))
    assert set(rows.kernel) == KERNELS
    assert set(rows.blocks.str.extract(r"R_PAD=(\d+)")[0].astype(int)) == {16, 128}
    assert (rows.stack_bytes == 0).all(), rows[rows.stack_bytes > 0].to_string()
    # the shrinks loop over d_in: their loads must be software-pipelined (cp.async)
    shrinks = rows[rows.kernel.str.endswith("shrink_kernel") & (rows.kernel != "_bgmv_shrink_kernel")]
    assert shrinks.pipelined_loads.all(), shrinks.to_string()
    # every tl.dot runs on tensor cores, wgmma for the 64-row tiles of sm_90
    dots = rows[rows.kernel.isin(DOT_KERNELS) & ~rows.blocks.str.contains("DIAGONAL=True")]
    assert (dots.tensor_cores != "none").all(), dots.to_string()
    assert (dots[dots.blocks.str.contains("BLOCK_M=64")].tensor_cores == "wgmma").all()


def test_bench_kernels_plan_shows_every_launch_of_the_grid(tmp_path):
    out = tmp_path / "plan.csv"
    printed = compiled(f"from lorabench.cli import main; raise SystemExit(main(['bench-kernels', '--plan', "
                       f"'--m', '1,40', '--n', '8', '--d', '256', '--out', '{out}']))")
    plan = pd.read_csv(out)
    assert "compiled kernels" in printed and "no spills" in printed
    calls = plan.groupby(["M", "strategy"]).kernel.apply(list).to_dict()
    for m in (1, 40):
        assert calls[(m, "single")] == ["_single_shrink_kernel", "_single_expand_kernel"]
        assert calls[(m, "per_lora_sgmv")] == ["_sgmv_shrink_kernel", "_sgmv_expand_kernel"]
        assert calls[(m, "per_lora_bgmv")] == ["_bgmv_shrink_kernel", "_bgmv_expand_kernel"]
        assert calls[(m, "paged")] == ["_paged_shrink_kernel", "_paged_expand_kernel"]
        for width in (64, 128):
            assert calls[(m, f"compressed_R{width}")] == [
                "_single_shrink_kernel", "_compressed_mix_kernel", "_single_expand_kernel"]
    blocks = plan.blocks.str.extract(r"BLOCK_M=(\d+)")[0].astype(float)
    block_n = plan.blocks.str.extract(r"BLOCK_N=(\d+)")[0].astype(float)
    grid = plan.grid.str.split("x", expand=True).astype(float)
    for i, row in plan.iterrows():
        m = row.M
        if row.kernel == "_bgmv_shrink_kernel":  # one program per token (all tokens have an adapter)
            assert grid.loc[i, 0] == m
        if row.kernel.endswith("expand_kernel"):  # one program per 256 / block of d_out columns
            block = 512 if row.kernel.startswith("_bgmv") else block_n[i]
            assert grid.loc[i, 1] == -(-256 // block), row.to_dict()
        if row.kernel == "_single_shrink_kernel" and row.strategy == "single":  # one program per row block
            assert grid.loc[i, 0] == -(-m // blocks[i])
        if row.kernel in ("_sgmv_shrink_kernel", "_paged_shrink_kernel", "_compressed_mix_kernel"):
            # one program per tile of block_m tokens of one adapter: at least one per distinct adapter
            assert row.distinct <= grid.loc[i, 0] <= row.distinct + m // blocks[i]
    assert (plan.programs == grid.fillna(1).prod(axis=1)).all()
