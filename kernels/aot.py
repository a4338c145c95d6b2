"""Compile the kernels' real launches for a CUDA architecture ahead of time, without a GPU.

    python -m lorabench.kernels.aot [--arch 90] [--dtypes bf16,fp16,fp32]

Catches what the interpreter cannot: code that does not compile to PTX/SASS, register spills, and
loads the compiler did not pipeline. The wrappers run on CPU tensors with every Triton launch
captured instead of run (`captured_launches`); each launch is then specialized as Triton's JIT would
specialize it on the GPU (16-byte-aligned pointers and sizes divisible by 16 get divisibility hints,
sizes equal to 1 become constants) and compiled for sm_<arch>. So the kernels compiled here are the
ones a GPU run at the same shapes would build, with the wrappers' own block sizes and launch options.

`compile_all` covers tile heights 16, 32, 64 and ranks 16 and 128 at d = 4096; `lorabench
bench-kernels --plan` compiles the benchmark grid's launches the same way. In bf16 and fp16 nothing
spills; fp32 (exact "ieee" tl.dot, not a serving dtype) spills at rank 128. Run with
TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from . import common, testing

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
D_MODEL = 4096  # d_in = d_out of the compile shapes: the benchmark's, divisible by every block


@dataclass(frozen=True)
class Launch:
    """One captured kernel launch: the kernel, its arguments as passed, and its grid."""

    kernel: JITFunction
    args: tuple
    kwargs: dict
    grid: tuple

    @property
    def programs(self) -> int:
        n = 1
        for g in self.grid:
            n *= g
        return n


@contextlib.contextmanager
def captured_launches():
    """Within the block, Triton kernels are recorded (appended to the yielded list), not run."""
    if common.interpreting():
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be captured or compiled")
    launches: list[Launch] = []
    real = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, tuple(grid)))

    JITFunction.run, common.capturing_launches = record, True
    try:
        yield launches
    finally:
        JITFunction.run, common.capturing_launches = real, False


def specialize(launch: Launch) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) of a launch, as Triton's JIT specializes it on CUDA."""
    from triton._C.libtriton import native_specialize_impl  # the JIT's own rule (triton 3.x)
    from triton.backends.nvidia.compiler import CUDABackend

    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(launch.kernel.params):
        name = param.name
        value = launch.args[i] if i < len(launch.args) else launch.kwargs[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
            continue
        kind, key = native_specialize_impl(CUDABackend, value, False, True, True)
        if kind == "constexpr":  # an integer equal to 1
            signature[name], constexprs[name] = "constexpr", key
        else:
            signature[name] = kind
            if key:
                attrs[(i,)] = CUDABackend.parse_attr(key)
    options = {k: v for k, v in launch.kwargs.items() if k in ("num_warps", "num_stages")}
    return signature, constexprs, attrs, options


def compile_launch(launch: Launch, arch: int = 90, binaries: dict | None = None) -> dict:
    """Compile a captured launch for sm_<arch>: its grid, its resources and what the compiler made of
    it. `binaries` (specialization -> compiled row) lets launches that share a binary compile once."""
    signature, constexprs, attrs, options = specialize(launch)
    key = repr((launch.kernel.__name__, sorted(signature.items()), sorted(map(str, constexprs.items())),
                sorted(attrs.items()), sorted(options.items())))
    binaries = {} if binaries is None else binaries
    if key not in binaries:
        source = ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
        ptx = kernel.asm["ptx"]
        blocks = {k: v for k, v in constexprs.items() if k.isupper() and k != "DOT_PRECISION"}
        pointers = [t[1:] for t in signature.values() if t.startswith("*") and t[1:] not in ("fp32", "i32", "i64")]
        binaries[key] = dict(
            kernel=launch.kernel.__name__, dtype=pointers[0] if pointers else "fp32",
            blocks=" ".join(f"{k}={v}" for k, v in blocks.items()), **options, **_resources(kernel.asm["cubin"]),
            # cp.async (or TMA) copies are what software pipelining of a loop's loads compiles to
            pipelined_loads=bool(re.search(r"cp\.async\.(ca|cg|bulk)", ptx)),
            tensor_cores="wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "none",
        )
    return dict(binaries[key], grid="x".join(map(str, launch.grid)), programs=launch.programs)


def shape_launches(dtype: torch.dtype, rank: int, block_m: int, seed: int = 0) -> list[tuple[str, Launch]]:
    """(op, launch) of every wrapper at d = D_MODEL, adapters of `rank` (compressed: R = rank, full and
    diagonal S), tiles of `block_m` tokens (single: a batch of block_m tokens)."""
    from .bgmv import bgmv_lora
    from .compressed import compressed_lora
    from .paged import paged_lora
    from .sgmv import sgmv_lora
    from .single import single_lora

    gen = torch.Generator().manual_seed(seed)
    n, d = 4, D_MODEL
    ids = [i % n for i in range(4 * block_m)]
    problems = {
        "single": (single_lora, testing.single_problem(block_m, d, d, rank, dtype, "cpu", gen)),
        "sgmv": (sgmv_lora, testing.per_lora_problem(ids, n, d, d, rank, dtype, "cpu", gen, block_m=block_m)),
        "bgmv": (bgmv_lora, testing.per_lora_problem(ids[:16], n, d, d, rank, dtype, "cpu", gen)),
        "paged": (paged_lora, testing.paged_problem(ids, [rank] * n, d, d, d, dtype, "cpu", gen, block_m=block_m)),
        "compressed_full": (compressed_lora, testing.compressed_problem(
            ids, n, 1, rank, False, d, d, dtype, "cpu", gen, block_m=block_m)),
        "compressed_diag": (compressed_lora, testing.compressed_problem(
            ids, n, 1, rank, True, d, d, dtype, "cpu", gen, block_m=block_m)),
    }
    out = []
    for op, (fn, problem) in problems.items():
        extra = {} if problem.batch is None else {"batch": problem.batch}
        with captured_launches() as launches:
            fn(**problem.inputs, **extra)
        out += [(op, launch) for launch in launches]
    return out


def compile_all(arch: int = 90, dtypes=tuple(DTYPES), block_ms=(16, 32, 64), ranks=(16, 128)) -> list[dict]:
    """Compile every distinct launch of the wrappers over dtypes x ranks x tile heights: one dict each."""
    binaries: dict = {}
    for name in dtypes:
        for rank in ranks:
            for block_m in block_ms:
                for _, launch in shape_launches(DTYPES[name], rank, block_m):
                    compile_launch(launch, arch, binaries)
    return list(binaries.values())


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
    args = parser.parse_args()
    import pandas as pd

    rows = compile_all(args.arch, dtypes=tuple(args.dtypes.split(",")))
    with pd.option_context("display.width", 250, "display.max_rows", 1000, "display.max_colwidth", 60):
        print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
