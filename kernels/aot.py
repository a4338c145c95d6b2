"""Compile every Triton kernel for a CUDA architecture ahead of time, without a GPU.

    python -m lorabench.kernels.aot [--arch 90]

Catches what the interpreter cannot: code that does not compile to PTX/SASS, and register spills.
Each kernel is compiled in the configurations its wrapper launches (tile heights 16..64, ranks 16
and 128, every dtype), with the block sizes and launch options of `common`; prints one line per
kernel with registers and spill (stack) bytes from cuobjdump. Must run with TRITON_INTERPRET unset.
In bf16 and fp16 nothing spills; fp32 (exact "ieee" tl.dot, not a serving dtype) spills at rank 128.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import bgmv, compressed, paged, sgmv, single
from .common import blocks, launch_options

DTYPES = {"bf16": "tf32", "fp16": "tf32", "fp32": "ieee"}  # dtype -> tl.dot input precision


def kernel_specs(dtypes=tuple(DTYPES), block_ms=(16, 32, 64), ranks=(16, 128)):
    """(kernel, pointer dtypes by argument, constexprs, register tiles) of every launch shape."""
    cfg = blocks()
    for dt in dtypes:
        precision = DTYPES[dt]
        for rp in ranks:
            for bm in block_ms:
                bk, bn, rc = cfg.shrink_k(bm, rp), cfg.expand_n(bm, rp), min(rp, 64)
                shrink = dict(BLOCK_M=bm, BLOCK_K=bk, R_PAD=rp, DOT_PRECISION=precision), [(bm, bk), (bk, rp)]
                expand = dict(BLOCK_M=bm, BLOCK_N=bn, R_PAD=rp, DOT_PRECISION=precision), [(bm, bn), (rp, bn)]
                yield (sgmv._sgmv_shrink_kernel, dict(x_ptr=dt, a_ptr=dt, h_ptr="fp32"), *shrink)
                yield (sgmv._sgmv_expand_kernel, dict(h_ptr="fp32", b_ptr=dt, scales_ptr="fp32", y_ptr=dt), *expand)
                yield (paged._paged_shrink_kernel, dict(x_ptr=dt, pool_ptr=dt, h_ptr="fp32"), *shrink)
                yield (paged._paged_expand_kernel, dict(h_ptr="fp32", pool_ptr=dt, scales_ptr="fp32", y_ptr=dt),
                       *expand)
                yield (single._single_shrink_kernel, dict(x_ptr=dt, a_ptr=dt, h_ptr="fp32"), *shrink)
                yield (single._single_expand_kernel, dict(h_ptr="fp32", b_ptr=dt, y_ptr=dt), *expand)
                for diagonal in (False, True):
                    yield (compressed._compressed_mix_kernel, dict(h_ptr="fp32", s_ptr=dt, g_ptr="fp32"),
                           dict(BLOCK_M=bm, R_PAD=rp, R_CHUNK=rc, DIAGONAL=diagonal, DOT_PRECISION=precision),
                           [(bm, rp), (rp, rc)])
            gb = cfg.gather(rp)
            yield (bgmv._bgmv_shrink_kernel, dict(x_ptr=dt, a_ptr=dt, h_ptr="fp32"),
                   dict(BLOCK_K=gb, R_PAD=rp), [(rp, gb)])
            yield (bgmv._bgmv_expand_kernel, dict(h_ptr="fp32", b_ptr=dt, scales_ptr="fp32", y_ptr=dt),
                   dict(BLOCK_N=gb, R_PAD=rp), [(rp, gb)])


def compile_all(arch: int = 90, **subset) -> list[dict]:
    """Compile every spec (or the `subset` of kernel_specs' arguments) for sm_<arch>: one dict per
    kernel configuration with its resource use."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    target = GPUTarget("cuda", arch, 32)
    rows = []
    for fn, pointers, constexprs, tiles in kernel_specs(**subset):
        signature = {}
        for name in fn.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = "*" + pointers.get(name, "i32")  # unnamed pointers: int tables
            else:
                signature[name] = "fp32" if name == "scale" else "i32"
        options = launch_options(*tiles)
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target,
                                options=options)
        sizes = {k: v for k, v in constexprs.items() if k != "DOT_PRECISION"}
        rows.append(dict(kernel=fn.__name__, dtype=_dtype(pointers), num_warps=options["num_warps"], **sizes,
                         **_resources(kernel.asm["cubin"])))
    return rows


def _dtype(pointers: dict) -> str:
    return next((v for v in pointers.values() if v != "fp32"), "fp32")


def _resources(cubin: bytes) -> dict:
    """Registers and stack (spill) bytes of a cubin, read by the cuobjdump that ships with Triton."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(part.split(":", 1) for part in out.split() if part.startswith(("REG:", "STACK:")))
    return dict(registers=int(fields["REG"]), stack_bytes=int(fields["STACK"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated, of bf16,fp16,fp32")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    args = parser.parse_args()
    rows = compile_all(args.arch, dtypes=tuple(args.dtypes.split(",")))
    if args.json:
        print(json.dumps(rows))
        return
    for row in rows:
        print(" ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
