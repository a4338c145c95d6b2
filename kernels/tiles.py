"""Triton helpers the kernels share: a segment tile's tokens, split-K partial sums, y += delta.

Called from inside @triton.jit kernels (Triton inlines them).
"""

import triton
import triton.language as tl


@triton.jit
def load_tile(tiles_ptr, sorted_ptr, tile, BLOCK_M: tl.constexpr):
    """(adapter, rows, row_mask, live) of tile `tile` of LoraBatch.tiles: its adapter, the batch
    rows of its tokens (BLOCK_M lanes, row_mask off past the tile's end), and whether it holds any
    token (a static batch's padding tiles do not: kernels then take rank 0, loading no weights)."""
    adapter = tl.load(tiles_ptr + tile * 3).to(tl.int64)
    first = tl.load(tiles_ptr + tile * 3 + 1)
    end = tl.load(tiles_ptr + tile * 3 + 2)
    offs = first + tl.arange(0, BLOCK_M)
    row_mask = offs < end
    rows = tl.load(sorted_ptr + offs, mask=row_mask, other=0).to(tl.int64)
    return adapter, rows, row_mask, end > first


@triton.jit
def sum_partials(h_ptr, rows, row_mask, num_splits, stride_hs, stride_hm, BLOCK_M: tl.constexpr, R_PAD: tl.constexpr):
    """(BLOCK_M, R_PAD) fp32: the split-K partial sums h[s, rows, :R_PAD] added over s."""
    offs_r = tl.arange(0, R_PAD)
    h = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for s in range(num_splits):
        h_ptrs = h_ptr + s * stride_hs + rows[:, None] * stride_hm + offs_r[None, :]
        h += tl.load(h_ptrs, mask=row_mask[:, None], other=0.0)
    return h


@triton.jit
def add_into(y_ptr, rows, row_mask, offs_n, n_mask, delta, stride_ym, stride_yn):
    """y[rows, offs_n] += delta (fp32), rounded once to y's dtype."""
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    mask = row_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y.dtype), mask=mask)


@triton.jit
def shrink_rows(
    x_ptr, rows, row_mask, stride_xm, stride_xk,
    w_rows, r_mask, stride_wk, k_lo, k_hi,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """(BLOCK_M, R_PAD) fp32: x[rows, k_lo:k_hi] @ W[:, k_lo:k_hi]^T, where row j of the weight W
    starts at pointer w_rows[j] (a slot's row, or a page) and steps by stride_wk along d_in."""
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        xs = tl.load(
            x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=row_mask[:, None] & k_mask[None, :], other=0.0,
        )
        w_t = tl.load(w_rows[None, :] + offs_k[:, None] * stride_wk, mask=r_mask[None, :] & k_mask[:, None], other=0.0)
        acc = tl.dot(xs, w_t, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def expand_rows(h, w_cols, r_mask, offs_n, n_mask, stride_wn, DOT_PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32: h @ W[offs_n, :]^T, where column j of the weight W starts at
    pointer w_cols[j] (a slot's column, or a page) and steps by stride_wn along d_out."""
    w_t = tl.load(w_cols[:, None] + offs_n[None, :] * stride_wn, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
    return tl.dot(h.to(w_t.dtype), w_t, input_precision=DOT_PRECISION)
