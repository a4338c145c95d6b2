"""What every kernel wrapper shares: input checks, launch sizing and the split-K workspace.

Checks raise `ValueError` naming the argument at fault. Checks of tensor *values* (adapter ids,
ranks, page numbers, cluster ids) would read the device on every call; ids are checked against
`LoraBatch.max_adapter` (a Python int from the batch build), and per-adapter tables are checked once
per tensor version (`check_values`), so the per-layer calls do not synchronize with the device.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import torch

from .metadata import LoraBatch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Largest rank (per-lora, paged) or compressed width R the kernels hold in registers.
MAX_RANK = 128
# Split-K aims at about this many programs for the shrink, enough to fill an H100/H200 twice.
TARGET_PROGRAMS = 512
# Register-tile budget in elements: shrink tiles stay within it, expand tiles within twice it, and
# kernels with a tile this large run 8 warps instead of 4.
MAX_TILE = 4096
# Bytes of split-K partial sums the expand may re-read (from L2) before fewer splits pay off.
MAX_PARTIAL_READS = 4 << 20


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# Set by `aot.captured_launches`: launches are recorded, not run, so CPU tensors may reach the wrappers.
capturing_launches = False


@dataclass(frozen=True)
class Blocks:
    """Block sizes and launch settings shared by the kernels (to be tuned on the target GPU).

    The blocks below are the largest; a launch takes smaller ones where its tile is tall (block_m)
    or wide (padded rank), so that register tiles stay within MAX_TILE (shrink) or 2 * MAX_TILE
    (expand) elements. The budgets were first set from sm_90 compiles without the JIT's
    divisibility hints, which overstate registers (a 64 x 128 shrink tile: 217 a thread). Compiled
    as the GPU specializes them (`python -m lorabench.kernels.aot`, `bench-kernels --plan`), no
    bf16/fp16 launch takes over 110 registers or spills, and 64 x 128 tiles at rank 128 would take
    about 100 with 8 warps: room to raise MAX_TILE once a GPU can time the difference.
    """

    block_k: int  # reduction block of the shrink (over d_in)
    block_n: int  # output-column block of the expand (over d_out)
    gather_block: int  # d block of the per-token gather kernels (one token per program: wider)
    num_stages: int

    def shrink_k(self, block_m: int, r_pad: int) -> int:
        return _fit(self.block_k, max(block_m, r_pad), MAX_TILE)

    def expand_n(self, block_m: int, r_pad: int) -> int:
        return _fit(self.block_n, max(block_m, r_pad), 2 * MAX_TILE)

    def gather(self, r_pad: int) -> int:
        return _fit(self.gather_block, r_pad, 2 * MAX_TILE)


def _fit(largest: int, rows: int, budget: int) -> int:
    """The largest power-of-two block <= `largest` (and >= 16) with rows * block <= budget."""
    return max(16, min(largest, budget // rows))


def blocks() -> Blocks:
    # Small blocks under the interpreter: tests with d of 40..96 then cover several blocks and a
    # ragged last block, and each interpreted program stays cheap.
    if interpreting():
        return Blocks(block_k=32, block_n=32, gather_block=32, num_stages=1)
    return Blocks(block_k=128, block_n=128, gather_block=512, num_stages=3)


def launch_options(*tiles: tuple[int, int]) -> dict:
    """num_warps and num_stages for a kernel whose largest register tiles are `tiles` (rows, cols).

    8 warps once a tile reaches MAX_TILE elements: with 4, a 64 x 128 tile at rank 128 takes
    135-175 registers a thread on sm_90 (88-104 with 8), which would halve the resident warps.
    """
    largest = max(rows * cols for rows, cols in tiles)
    return dict(num_warps=8 if largest >= MAX_TILE else 4, num_stages=blocks().num_stages)


def pad_rank(r: int) -> int:
    """Register width for a rank: a power of two >= 16 (tl.dot needs every dimension >= 16)."""
    return max(16, 1 << max(r - 1, 0).bit_length())


def partial_bytes(rows: int, r_pad: int, d_out: int, block_n: int) -> int:
    """Bytes of one split's fp32 partial sums that an expand over d_out blocks of block_n reads."""
    return rows * r_pad * 4 * cdiv(d_out, block_n)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def split_k(num_row_programs: int, d_in: int, block_k: int, reread_bytes: int = 0) -> tuple[int, int]:
    """(splits, k_per_split): cut the shrink's reduction so that about TARGET_PROGRAMS run.

    A decode batch has few tiles, and a tile's shrink is a long, thin reduction over d_in: without
    splitting it, a handful of programs would read all the adapter weights. But the expand re-reads
    every split's partial sums once per d_out block: `reread_bytes` (what the expand reads per split,
    `partial_bytes(...)`) caps the splits so that this stays near
    MAX_PARTIAL_READS (a large prefill batch then runs few splits, which it can afford).
    """
    k_blocks = cdiv(d_in, block_k)
    splits = max(1, min(k_blocks, cdiv(TARGET_PROGRAMS, max(num_row_programs, 1))))
    if reread_bytes:
        splits = max(1, min(splits, MAX_PARTIAL_READS // reread_bytes))
    k_per_split = cdiv(k_blocks, splits) * block_k
    return cdiv(d_in, k_per_split), k_per_split


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 products for fp32 inputs (tf32 would miss fp32 tolerances)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def workspace(
    buffer: torch.Tensor | None, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A scratch tensor of `shape`: a view of `buffer` when given (tests poison it), else new."""
    numel = 1
    for n in shape:
        numel *= n
    if buffer is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if buffer.dtype != dtype or buffer.device != device or not buffer.is_contiguous():
        raise ValueError(f"workspace_buffer must be a contiguous {dtype} tensor on {device}")
    if buffer.numel() < numel:
        raise ValueError(f"workspace_buffer holds {buffer.numel()} elements, the launch needs {numel}")
    return buffer.view(-1)[:numel].view(shape)


# ---------------------------------------------------------------------------------------------
# Checks


def check_activations(x: torch.Tensor, y: torch.Tensor, dtypes=KERNEL_DTYPES) -> tuple[int, int, int]:
    """x: (M, d_in), y: (M, d_out) of one dtype on one device. Returns (M, d_in, d_out)."""
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor (tokens, features), got {_describe(t)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} tokens but y has {y.shape[0]}")
    if x.dtype not in dtypes:
        raise ValueError(f"x has dtype {x.dtype}; supported: {', '.join(map(str, dtypes))}")
    if y.dtype != x.dtype:
        raise ValueError(f"y has dtype {y.dtype} but x has {x.dtype}")
    if y.device != x.device:
        raise ValueError(f"y is on {y.device} but x is on {x.device}")
    return x.shape[0], x.shape[1], y.shape[1]


def check_tensor(
    name: str, t: torch.Tensor, shape: tuple, x: torch.Tensor, dtype: torch.dtype | str | None = None
) -> None:
    """`t` has `shape` (None = any size), is on x's device and has `dtype`: x's dtype by default,
    or "float" / "int" for any floating-point / integer dtype."""
    dtype = x.dtype if dtype is None else dtype
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        want = "(" + ", ".join("*" if n is None else str(n) for n in shape) + ")"
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {want}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if dtype == "float" and not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if dtype == "int" and (t.is_floating_point() or t.is_complex()):
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    if isinstance(dtype, torch.dtype) and t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, expected {dtype}")


def check_rank(name: str, r: int) -> None:
    if r > MAX_RANK:
        raise ValueError(f"{name} is {r}, larger than the kernels allow ({MAX_RANK})")


def check_batch(batch: LoraBatch, x: torch.Tensor, num_adapters: int, what: str) -> None:
    """The batch covers x's tokens, lives on x's device, and its ids index `num_adapters` entries."""
    if not isinstance(batch, LoraBatch):
        raise ValueError(f"batch must be a LoraBatch (LoraBatch.build(token_adapters)), got {type(batch).__name__}")
    if batch.num_tokens != x.shape[0]:
        raise ValueError(f"batch has {batch.num_tokens} tokens but x has {x.shape[0]}")
    if batch.token_adapters.device != x.device:
        raise ValueError(f"batch is on {batch.token_adapters.device} but x is on {x.device}: use batch.to(device)")
    if batch.max_adapter >= num_adapters:
        raise ValueError(f"adapter id {batch.max_adapter} out of range: {what} holds {num_adapters}")


# (name, id(tensor)) -> (weak reference to the tensor, its state when checked). The weak reference
# tells a tensor from a later one at the same address; its callback drops the entry.
_checked: dict[tuple[str, int], tuple[weakref.ref, tuple, weakref.ref | None]] = {}


def check_values(name: str, t: torch.Tensor, lo: int, hi: int, ranks: torch.Tensor | None = None) -> None:
    """Every entry of `t` lies in [lo, hi]; checked once per tensor and version (in-place updates
    are seen), so pass per-adapter tables as tensors that persist across calls.

    With `ranks`, `t` is a page table (N, max_rank) and only entries t[i, j < ranks[i]] are checked.
    A CUDA-graph capture cannot read the device, so a tensor first seen during capture is trusted
    (the eager warm-up call before capture has checked it).
    """
    key = (name, id(t))
    state = (t._version, lo, hi, None if ranks is None else (id(ranks), ranks._version))
    entry = _checked.get(key)
    if entry is not None and entry[0]() is t and entry[1] == state and (ranks is None or entry[2]() is ranks):
        return
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    values = t
    if ranks is not None:
        values = t[torch.arange(t.shape[1], device=t.device)[None, :] < ranks[:, None]]
    if values.numel():
        v_lo, v_hi = (int(v) for v in torch.aminmax(values))
        if v_lo < lo or v_hi > hi:
            bad = v_lo if v_lo < lo else v_hi
            raise ValueError(f"{name} holds {bad}, outside [{lo}, {hi}]")
    _checked[key] = (
        weakref.ref(t, lambda _, key=key: _checked.pop(key, None)),
        state,
        None if ranks is None else weakref.ref(ranks),
    )


def _describe(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


# ---------------------------------------------------------------------------------------------
# Per-operation checks (shared by the Triton wrappers and the PyTorch path of the dispatch layer)


def check_single(x, y, A, B, dtypes=KERNEL_DTYPES) -> None:
    """x: (M, d_in)  y: (M, d_out)  A: (r, d_in)  B: (d_out, r)"""
    _, d_in, d_out = check_activations(x, y, dtypes)
    check_tensor("A", A, (None, d_in), x)
    check_tensor("B", B, (d_out, A.shape[0]), x)
    check_rank("rank (A.shape[0])", A.shape[0])


def check_per_lora(x, y, A, B, scales, batch, dtypes=KERNEL_DTYPES) -> None:
    """x: (M, d_in)  y: (M, d_out)  A: (slots, r, d_in)  B: (slots, d_out, r)  scales: (slots,)"""
    _, d_in, d_out = check_activations(x, y, dtypes)
    check_tensor("A", A, (None, None, d_in), x)
    slots, r = A.shape[:2]
    check_tensor("B", B, (slots, d_out, r), x)
    check_tensor("scales", scales, (slots,), x, "float")
    check_rank("rank (A.shape[1])", r)
    check_batch(batch, x, slots, "A (slots)")


def check_paged(x, y, pool, a_pages, b_pages, ranks, scales, batch, dtypes=KERNEL_DTYPES) -> None:
    """pool: (pages, page_size)  a_pages, b_pages: (N, max_rank) int  ranks: (N,) int  scales: (N,)"""
    _, d_in, d_out = check_activations(x, y, dtypes)
    check_tensor("pool", pool, (None, None), x)
    num_pages, page_size = pool.shape
    if max(d_in, d_out) > page_size:
        raise ValueError(f"pool pages hold {page_size} values, fewer than d_in={d_in} or d_out={d_out}")
    check_tensor("a_pages", a_pages, (None, None), x, "int")
    n, max_rank = a_pages.shape
    check_tensor("b_pages", b_pages, (n, max_rank), x, "int")
    check_tensor("ranks", ranks, (n,), x, "int")
    check_tensor("scales", scales, (n,), x, "float")
    check_rank("page table width (a_pages.shape[1])", max_rank)
    check_batch(batch, x, n, "the page table")
    check_values("ranks (a rank may not exceed the page table width)", ranks, 0, max_rank)
    check_values("a_pages (page numbers)", a_pages, 0, num_pages - 1, ranks=ranks)
    check_values("b_pages (page numbers)", b_pages, 0, num_pages - 1, ranks=ranks)


def check_compressed(x, y, U, V, S, cluster_of, batch, dtypes=KERNEL_DTYPES) -> None:
    """U: (K, d_out, R)  V: (K, d_in, R)  S: (N, R, R) or (N, R)  cluster_of: (N,) int"""
    _, d_in, d_out = check_activations(x, y, dtypes)
    check_tensor("V", V, (None, d_in, None), x)
    k, _, r = V.shape
    check_tensor("U", U, (k, d_out, r), x)
    check_tensor("S", S, (None, r) if isinstance(S, torch.Tensor) and S.dim() == 2 else (None, r, r), x)
    n = S.shape[0]
    check_tensor("cluster_of", cluster_of, (n,), x, "int")
    check_rank("R (V.shape[2])", r)
    check_batch(batch, x, n, "S")
    check_values("cluster_of", cluster_of, 0, k - 1)
