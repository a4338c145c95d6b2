"""`lorabench bench-kernels`: time one LoRA layer of every serving strategy over a grid of batches.

Grid: tokens M x resident adapters N, each token's adapter drawn from Zipf(alpha) over N;
d_in = d_out = 4096, rank 16, compressed width R in {64, 128} (one cluster, full S). Columns: the
strategies (single LoRA, per-lora sgmv and bgmv, paged, compressed; on CUDA also cuBLAS forms of
single and compressed) beside the baselines measured in the same process (the base layer's GEMM,
and torch gather-bmm: each token's A_i and B_i gathered, two batched products), in median
microseconds, and the bandwidth each reaches on its unique weight bytes as a fraction of
the device's copy bandwidth, measured in the same run. "floor" is the per-lora unique adapter bytes
over the copy bandwidth: no kernel that reads each adapter weight once can be faster.

On CUDA (bf16): the eager call and a CUDA-graph replay of it, each timed by triton.testing.do_bench
(median; do_bench flushes L2 before every run). On CPU (fp32): the PyTorch paths on a reduced grid,
wall-clock medians. `--device-check` first checks every Triton kernel on the GPU in bf16 and fp16
against the float64 reference. The CSV is rewritten after every grid point (an interrupted run keeps
what it measured). After a GPU run, and with `--check-targets CSV` for a table written earlier, the
bars of `kernel_targets` for the card the table was measured on are checked.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from lorabench.kernels import HAVE_TRITON, LoraBatch, lora_compressed, lora_paged, lora_per_lora, lora_single, testing
from lorabench.kernels.common import interpreting as kernel_interpreting
from tqdm import tqdm

from lorabench.errors import LorabenchError
from lorabench.kernelbench import kernel_targets
from lorabench.kernelbench.correctness import device_check
from lorabench.kernelbench.provenance import toolchain, versions
from lorabench.outputs.results import write_csv_atomic

GPU_GRID_M = (1, 16, 64, 256, 1024)
GPU_GRID_N = (1, 8, 64, 512, 1024)
CPU_GRID_M = (1, 16, 64, 256)
CPU_GRID_N = (1, 8, 64, 512)


@dataclass(frozen=True)
class BenchConfig:
    device: str
    dtype: torch.dtype
    grid_m: tuple[int, ...]
    grid_n: tuple[int, ...]
    d_in: int = 4096
    d_out: int = 4096
    rank: int = 16
    widths: tuple[int, ...] = (64, 128)
    alpha: float = 1.0
    seed: int = 0

    @property
    def elem(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, help="CSV to write (default results/kernels/<device>.csv; with --check-targets: "
                   "the verdicts, default none)")
    p.add_argument("--device-check", action="store_true",
                   help="first check every Triton kernel on the GPU (bf16, fp16) against the float64 reference")
    p.add_argument("--m", help="comma-separated token counts (default: the full grid on CUDA, 1,16,64,256 on CPU)")
    p.add_argument("--n", help="comma-separated adapter counts (default: the full grid on CUDA, 1,8,64,512 on CPU)")
    p.add_argument("--d", type=int, default=4096, help="d_in = d_out of the layer (default 4096)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: %(default)s)")
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: PyTorch's choice)")
    p.add_argument("--plan", action="store_true",
                   help="time nothing, no GPU needed: compile every Triton launch of the grid for sm_90 as the GPU "
                        "would, and show grids, blocks, registers, spills and pipelining (CSV: --out, default "
                        "results/kernels/plan-sm90.csv)")
    p.add_argument("--check-targets", type=Path, metavar="CSV",
                   help="time nothing: check a bench-kernels CSV of a GPU run against the bars for its card "
                        "(vLLM's kernels on an H200, gather-bmm and copy bandwidth measured in the same run); "
                        "exit 1 if one is missed")


def main(args: argparse.Namespace) -> int:
    if args.check_targets is not None:
        return check_targets_of(args.check_targets, args.out)
    cuda = torch.cuda.is_available() and not args.plan
    if args.device_check and not cuda:
        raise LorabenchError("--device-check needs a CUDA GPU (none is visible)")
    if args.d < 16:
        raise LorabenchError(f"--d must be at least 16, got {args.d}")
    if args.threads is not None and args.threads < 1:
        raise LorabenchError(f"--threads must be >= 1, got {args.threads}")
    gpu_grid = cuda or args.plan
    config = BenchConfig(
        device="cuda" if cuda else "cpu",
        dtype=torch.bfloat16 if gpu_grid else torch.float32,
        grid_m=_int_list(args.m, "--m") or (GPU_GRID_M if gpu_grid else CPU_GRID_M),
        grid_n=_int_list(args.n, "--n") or (GPU_GRID_N if gpu_grid else CPU_GRID_N),
        d_in=args.d,
        d_out=args.d,
        seed=args.seed,
    )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.plan:
        return plan_main(config, args)
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    if args.device_check:
        checks = device_check()
        print(checks.to_string(index=False))
        failed = checks[~checks.ok]
        if len(failed):
            print(f"device check FAILED for {len(failed)} case(s)")
            return 1
        print(f"device check passed: {len(checks)} cases")

    # Where the figures came from, on every row: a committed CSV must say how it was made.
    provenance = dict(
        device=device_name,
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        versions=versions(),
        command=_command(config, "--device-check" if args.device_check else ""),
    )
    out = args.out or Path("results/kernels") / f"{_slug(device_name)}.csv"

    def stamped(table: pd.DataFrame) -> pd.DataFrame:
        return table.assign(**provenance)[["device", *table.columns, "date", "versions", "command"]]

    # Written after every point (the last write holds the whole grid), so an interrupted or timed-out
    # GPU run keeps what it measured.
    table = stamped(run_grid(config, on_point=lambda part: write_csv_atomic(out, stamped(part))))
    print_tables(table, cuda)
    print(f"\nwrote {out}")
    if cuda:
        _print_targets_if_covered(table, device_name)
    return 0


def plan_main(config: BenchConfig, args: argparse.Namespace) -> int:
    if args.device_check:
        raise LorabenchError("--plan compiles without a GPU; --device-check needs one: pass only one of them")
    if not HAVE_TRITON:
        raise LorabenchError("--plan compiles the Triton kernels: install triton (Linux x86_64)")
    if kernel_interpreting():
        raise LorabenchError("--plan compiles the kernels: unset TRITON_INTERPRET")
    plan = plan_grid(config)
    plan.insert(0, "arch", "sm_90")
    plan["versions"] = toolchain()
    plan["command"] = _command(config, "--plan")
    out = args.out or Path("results/kernels/plan-sm90.csv")
    write_csv_atomic(out, plan)
    print_plan(plan)
    print(f"\nwrote {out}")
    return 0


def check_targets_of(path: Path, out: Path | None = None) -> int:
    """`--check-targets FILE [--out VERDICTS]`: the bars of the table's card against a table written
    earlier (the verdicts also as CSV, with the table's device, date and versions); 1 if one is missed."""
    table = kernel_targets.read_table(path)
    device = kernel_targets.table_device(table)
    verdicts = kernel_targets.check_targets(table)
    kernel_targets.print_targets(verdicts, device)
    if out is not None:
        source = {c: table[c].iloc[0] for c in ("device", "date", "versions") if c in table.columns}
        command = f"lorabench bench-kernels --check-targets {path} --out {out}"
        write_csv_atomic(out, verdicts.assign(**source, command=command))
        print(f"wrote {out}")
    return 0 if verdicts.ok.all() else 1


def _print_targets_if_covered(table: pd.DataFrame, device: str) -> None:
    try:
        kernel_targets.print_targets(kernel_targets.check_targets(table), device)
    except LorabenchError as err:  # a subset of the grid: no bar to show, the run itself succeeded
        print(f"\nkernel bars: not checked ({err})")


# ---------------------------------------------------------------------------------------------
# The grid


@dataclass
class GridPoint:
    """One (M, N) point of the grid: the layer's weights for N adapters, a batch drawn over them."""

    m: int
    n: int
    weights: LayerWeights
    batch: LoraBatch
    x: torch.Tensor  # (M, d_in)
    y: torch.Tensor  # (M, d_out)

    @property
    def distinct(self) -> int:
        return self.batch.num_segments


def grid_points(config: BenchConfig, desc: str):
    """The grid's points in order (N outer, so one set of weights serves every M), with a progress bar."""
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    weights = None
    points = [(m, n) for n in config.grid_n for m in config.grid_m]
    for m, n in tqdm(points, desc=desc, unit="point", disable=None):  # None: no bar when stderr is no terminal
        if weights is None or weights.n != n:
            weights = None  # free the last set first
            weights = LayerWeights.make(config, n, gen)
        batch = LoraBatch.build(testing.zipf_ids(m, n, config.alpha, gen).to(config.device))
        x = torch.randn(m, config.d_in, dtype=config.dtype, device=config.device)
        y = torch.randn(m, config.d_out, dtype=config.dtype, device=config.device)
        yield GridPoint(m, n, weights, batch, x, y)


def run_grid(config: BenchConfig, on_point: Callable[[pd.DataFrame], object] | None = None) -> pd.DataFrame:
    """One row per (M, N, strategy, mode): median microseconds and fraction of copy bandwidth.
    `on_point` gets the table so far after every (M, N) point."""
    copy_bw = copy_bandwidth(config.device)
    rows = []
    for p in grid_points(config, "bench-kernels"):
        m, n, distinct = p.m, p.n, p.distinct
        adapter_bytes = distinct * config.rank * (config.d_in + config.d_out) * config.elem
        for name, call, nbytes in strategies(config, p.weights, p.batch, p.x, p.y, distinct):
            try:
                times, error = time_call(call, config.device), ""
            except Exception as err:  # noqa: BLE001 - one failing strategy must not lose the rest of a GPU run
                tqdm.write(f"bench-kernels: {name} at M={m}, N={n} failed: {err}", file=sys.stderr)
                modes = ("eager", "graph") if config.device == "cuda" else ("cpu",)
                times, error = dict.fromkeys(modes, math.nan), str(err)
            for mode, seconds in times.items():
                rows.append(dict(
                    dtype=str(config.dtype).removeprefix("torch."), M=m, N=n, distinct=distinct,
                    unique_adapter_mb=adapter_bytes / 1e6, floor_us=adapter_bytes / copy_bw * 1e6,
                    strategy=name, mode=mode, median_us=seconds * 1e6,
                    bw_fraction=nbytes / seconds / copy_bw, copy_gbps=copy_bw / 1e9, error=error[:200],
                ))
        if on_point is not None:
            on_point(pd.DataFrame(rows))
    return pd.DataFrame(rows)


@dataclass
class LayerWeights:
    """Random weights of one 4096 x 4096 layer and its N adapters in every strategy's layout."""

    n: int
    W: torch.Tensor  # (d_out, d_in) base layer
    A: torch.Tensor  # (N, r, d_in) per-lora slots
    B: torch.Tensor  # (N, d_out, r)
    scales: torch.Tensor  # (N,)
    pool: torch.Tensor  # (pages, d) paged pool: A rows and B columns at scattered pages
    a_pages: torch.Tensor
    b_pages: torch.Tensor
    ranks: torch.Tensor
    compressed: dict  # R -> (U, V, S, cluster_of)

    @classmethod
    def make(cls, c: BenchConfig, n: int, gen: torch.Generator) -> "LayerWeights":
        dev, dt, r = c.device, c.dtype, c.rank

        def randn(*shape, std=1.0):
            return (torch.randn(*shape, device=dev, dtype=dt) * std)

        A, B = randn(n, r, c.d_in, std=c.d_in**-0.5), randn(n, c.d_out, r, std=r**-0.5)
        page_size = max(c.d_in, c.d_out)
        pool = torch.zeros(2 * n * r, page_size, dtype=dt, device=dev)
        order = torch.randperm(2 * n * r, generator=gen).to(dev)
        a_pages = order[: n * r].view(n, r).to(torch.int32)
        b_pages = order[n * r :].view(n, r).to(torch.int32)
        pool[a_pages.flatten().long(), : c.d_in] = A.reshape(n * r, c.d_in)
        pool[b_pages.flatten().long(), : c.d_out] = B.transpose(1, 2).reshape(n * r, c.d_out)
        compressed = {
            w: (randn(1, c.d_out, w, std=w**-0.5), randn(1, c.d_in, w, std=c.d_in**-0.5), randn(n, w, w, std=w**-0.5),
                torch.zeros(n, dtype=torch.int32, device=dev))
            for w in c.widths
        }
        return cls(
            n=n, W=randn(c.d_out, c.d_in, std=c.d_in**-0.5), A=A, B=B,
            scales=torch.ones(n, dtype=torch.float32, device=dev), pool=pool, a_pages=a_pages, b_pages=b_pages,
            ranks=torch.full((n,), r, dtype=torch.int32, device=dev), compressed=compressed,
        )


def strategies(c: BenchConfig, w: LayerWeights, batch: LoraBatch, x, y, distinct: int, plan: bool = False):
    """(name, call, unique weight bytes) of every column.

    Beside the strategies, the baselines a user compares with, timed in the same process: the base
    layer's GEMM and torch gather-bmm (what multi-LoRA serving looks like without special kernels).
    On CUDA also the cuBLAS forms that the Triton kernels should beat: single LoRA as two
    torch GEMMs, and the compressed layer with its dense steps in cuBLAS. On CPU per-lora has one
    (PyTorch) path. With `plan`, only the Triton columns of a GPU run, called through the Triton
    wrappers whatever the device (their launches are captured, not run).
    """
    gpu, backend = c.device == "cuda" or plan, "triton" if plan else "auto"
    cublas = c.device == "cuda" and not plan
    lora_bytes = c.rank * (c.d_in + c.d_out) * c.elem
    out = torch.empty_like(y)
    if not plan:
        yield "base_gemm", lambda: torch.mm(x, w.W.T, out=out), c.d_in * c.d_out * c.elem
    yield "single", lambda: lora_single(x, y, w.A[0], w.B[0], 1.0, backend=backend), lora_bytes
    if cublas:
        yield "single_cublas", lambda: y.addmm_(x @ w.A[0].T, w.B[0].T), lora_bytes
    for v in ("sgmv", "bgmv") if gpu else ("auto",):
        name = "per_lora" if v == "auto" else f"per_lora_{v}"
        yield name, (lambda v=v: lora_per_lora(x, y, w.A, w.B, w.scales, batch, variant=v, backend=backend)), \
            distinct * lora_bytes

    def paged():
        return lora_paged(x, y, w.pool, w.a_pages, w.b_pages, w.ranks, w.scales, batch, backend=backend)

    yield "paged", paged, distinct * lora_bytes
    if not plan:
        ids = batch.token_adapters.long()
        yield "torch_gather_bmm", lambda: gather_bmm(x, y, w.A, w.B, w.scales, ids), distinct * lora_bytes
    for width, (U, V, S, cluster_of) in w.compressed.items():
        nbytes = (width * (c.d_in + c.d_out) + distinct * width * width) * c.elem
        yield (f"compressed_R{width}",
               (lambda U=U, V=V, S=S, k=cluster_of: lora_compressed(x, y, U, V, S, k, batch, backend=backend)), nbytes)
        if cublas and width == c.widths[0]:
            from lorabench.kernels.compressed import compressed_lora

            def cublas_dense(U=U, V=V, S=S, k=cluster_of):
                return compressed_lora(x, y, U, V, S, k, batch, dense="torch")

            yield f"compressed_R{width}_cublas", cublas_dense, nbytes


def gather_bmm(x: torch.Tensor, y: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor,
               ids: torch.Tensor) -> torch.Tensor:
    """The multi-LoRA baseline in plain PyTorch: y[t] += scale[i] * B_i (A_i x[t]), i = ids[t] >= 0,
    with each token's A_i and B_i gathered into (M, r, d_in) and (M, d_out, r) and two torch.bmm."""
    h = torch.bmm(A[ids], x.unsqueeze(-1))  # (M, r, 1)
    delta = torch.bmm(B[ids], h).squeeze(-1)  # (M, d_out)
    return y.add_(delta * scales[ids].to(delta.dtype).unsqueeze(-1))


# ---------------------------------------------------------------------------------------------
# Launch plan (no GPU needed)


def plan_grid(config: BenchConfig, arch: int = 90) -> pd.DataFrame:
    """Every Triton launch of the grid's GPU columns, compiled for sm_<arch> as the GPU's JIT would
    specialize it: one row per (M, N, strategy, kernel) with its grid, blocks, registers, spills,
    whether its loads are pipelined and which tensor-core instructions it uses."""
    from lorabench.kernels import aot

    binaries: dict = {}  # each distinct specialization compiles once
    rows = []
    for p in grid_points(config, "bench-kernels --plan"):
        for name, call, _ in strategies(config, p.weights, p.batch, p.x, p.y, p.distinct, plan=True):
            with aot.captured_launches() as launches:
                call()
            rows += [dict(M=p.m, N=p.n, distinct=p.distinct, strategy=name, **aot.compile_launch(launch, arch, binaries))
                     for launch in launches]
    return pd.DataFrame(rows)


def print_plan(plan: pd.DataFrame) -> None:
    """The distinct compiled kernels, then the launches and programs of each call (the CSV has both)."""
    kernels = plan.drop_duplicates(["kernel", "blocks", "num_warps"])[
        ["kernel", "blocks", "num_warps", "registers", "stack_bytes", "pipelined_loads", "tensor_cores"]]
    per_call = plan.groupby(["M", "N", "strategy"], sort=False).agg(
        launches=("kernel", "size"), programs=("programs", "sum"))
    with pd.option_context("display.width", 250, "display.max_rows", 1000, "display.max_colwidth", 60):
        print(f"compiled for {plan.arch.iloc[0]} ({plan.versions.iloc[0]}), as the GPU's JIT specializes them:")
        print(kernels.to_string(index=False))
        print("\nprograms per call (launches: single, per-lora and paged 2, compressed 3):")
        print(per_call.programs.unstack("strategy").to_string())
    spills = plan[plan.stack_bytes > 0]
    print(f"\n{len(kernels)} compiled kernels, {len(plan)} launches; "
          + ("no spills" if spills.empty else f"{len(spills)} launches spill registers"))


# ---------------------------------------------------------------------------------------------
# Timing


def time_call(call, device: str) -> dict[str, float]:
    """Median seconds of `call`: {"eager", "graph"} on CUDA, {"cpu"} on the CPU."""
    if device != "cuda":
        return {"cpu": _cpu_median(call)}
    import triton.testing

    call()  # compile, and check the per-adapter tables before capture
    torch.cuda.synchronize()
    eager = triton.testing.do_bench(call, warmup=5, rep=25, return_mode="median")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    replay = triton.testing.do_bench(graph.replay, warmup=5, rep=25, return_mode="median")
    del graph
    return {"eager": eager * 1e-3, "graph": replay * 1e-3}


def _cpu_median(call, min_reps: int = 3, budget_s: float = 0.3) -> float:
    call()
    times, start = [], time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
        if len(times) >= 50:
            break
    return statistics.median(times)


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), measured now."""
    nbytes = (2 << 30) if device == "cuda" else (256 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), device)
    del src, dst
    return 2 * nbytes / seconds.get("graph", seconds.get("cpu"))


# ---------------------------------------------------------------------------------------------
# Output


def print_tables(table: pd.DataFrame, cuda: bool) -> None:
    index = ["M", "N", "distinct", "unique_adapter_mb", "floor_us"]
    modes = ("graph", "eager") if cuda else ("cpu",)
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.float_format", "{:.1f}".format):
        print(f"\ncopy bandwidth: {table.copy_gbps.iloc[0]:.0f} GB/s; dtype {table.dtype.iloc[0]}")
        for mode in modes:
            part = table[table["mode"] == mode]
            print(f"\nmedian microseconds ({mode}):")
            print(part.pivot_table(index=index, columns="strategy", values="median_us", sort=False).to_string())
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.float_format", "{:.3f}".format):
        part = table[table["mode"] == modes[0]]
        print(f"\nunique weight bytes / time, as a fraction of copy bandwidth ({modes[0]}):")
        print(part.pivot_table(index=["M", "N"], columns="strategy", values="bw_fraction", sort=False).to_string())


def _int_list(text: str | None, flag: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise LorabenchError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise LorabenchError(f"{flag} values must be >= 1, got {text!r}")
    return values


def _command(config: BenchConfig, flag: str) -> str:
    """The bench-kernels command line that reproduces a table of `config`."""
    return (f"lorabench bench-kernels {flag + ' ' if flag else ''}--m {','.join(map(str, config.grid_m))} "
            f"--n {','.join(map(str, config.grid_n))} --d {config.d_in} --seed {config.seed}")


def _slug(device_name: str) -> str:
    """'NVIDIA H200' -> 'h200', 'cpu' -> 'cpu'."""
    words = device_name.lower().replace("nvidia", "").split()
    return "-".join(words) or "cpu"
