"""Triton helpers the kernels share: a segment tile's tokens, split-K partial sums, y += delta.

Called from inside @triton.jit kernels (Triton inlines them).
"""

import triton
import triton.language as tl


@triton.jit
def load_tile(tiles_ptr, sorted_ptr, tile, BLOCK_M: tl.constexpr):
    """(adapter, rows, row_mask) of tile `tile` of LoraBatch.tiles: its adapter and the batch rows
    of its tokens (BLOCK_M lanes, row_mask off past the tile's end)."""
    adapter = tl.load(tiles_ptr + tile * 3).to(tl.int64)
    first = tl.load(tiles_ptr + tile * 3 + 1)
    end = tl.load(tiles_ptr + tile * 3 + 2)
    offs = first + tl.arange(0, BLOCK_M)
    row_mask = offs < end
    rows = tl.load(sorted_ptr + offs, mask=row_mask, other=0).to(tl.int64)
    return adapter, rows, row_mask


@triton.jit
def sum_partials(h_ptr, rows, row_mask, num_splits, stride_hs, stride_hm, BLOCK_M: tl.constexpr, R_PAD: tl.constexpr):
    """(BLOCK_M, R_PAD) fp32: the split-K partial sums h[s, rows, :R_PAD] added over s."""
    offs_r = tl.arange(0, R_PAD)
    h = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for s in range(num_splits):
        h += tl.load(h_ptr + s * stride_hs + rows[:, None] * stride_hm + offs_r[None, :], mask=row_mask[:, None], other=0.0)
    return h


@triton.jit
def add_into(y_ptr, rows, row_mask, offs_n, n_mask, delta, stride_ym, stride_yn):
    """y[rows, offs_n] += delta (fp32), rounded once to y's dtype."""
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    mask = row_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y.dtype), mask=mask)
