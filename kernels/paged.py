"""S-LoRA unified paging: adapter rows live in pages of one pool, found through a page table.

    y[t] += scales[i] * B_i (A_i x[t]),   A_i[j, :] = pool[a_pages[i, j], :d_in],
                                           B_i[:, j] = pool[b_pages[i, j], :d_out],   j < ranks[i]

A page is one vector of the hidden size, the same unit a KV-cache token takes per layer, so
adapters and KV cache share one pool. A module whose width is below the page size (k/v projections
under GQA) uses a prefix of each page. Ranks differ between adapters without padding: each adapter
holds ranks[i] pages per A and per B, and the kernels mask rank lanes past ranks[i].

Like sgmv, two kernels over the batch's segment tiles: shrink (split over d_in) and expand. Each
gathers a tile's weight rows by page number; a page row is contiguous, so the gather is coalesced.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    blocks, cdiv, check_paged, dot_precision, launch_options, pad_rank, partial_bytes, split_k, workspace,
)
from .metadata import LoraBatch
from .tiles import add_into, expand_rows, load_tile, shrink_rows, sum_partials


@triton.jit
def _paged_shrink_kernel(
    # pointers
    x_ptr, pool_ptr, a_pages_ptr, ranks_ptr, tiles_ptr, sorted_ptr, h_ptr,
    # sizes
    d_in, k_per_split,
    # strides
    stride_xm, stride_xk, stride_page, stride_table, stride_hs, stride_hm,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """h[split, t, :] = partial sum over this split's slice of d_in of A_i x[t], for a tile's tokens."""
    split = tl.program_id(1)
    adapter, rows, m_mask, live = load_tile(tiles_ptr, sorted_ptr, tl.program_id(0), BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < tl.where(live, tl.load(ranks_ptr + adapter), 0)
    pages = tl.load(a_pages_ptr + adapter * stride_table + offs_r, mask=r_mask, other=0).to(tl.int64)
    k_lo = split * k_per_split
    acc = shrink_rows(  # row j of A_i is page pages[j]
        x_ptr, rows, m_mask, stride_xm, stride_xk, pool_ptr + pages * stride_page, r_mask, 1,
        k_lo, tl.minimum(k_lo + k_per_split, d_in), BLOCK_M, BLOCK_K, R_PAD, DOT_PRECISION,
    )
    tl.store(h_ptr + split * stride_hs + rows[:, None] * stride_hm + offs_r[None, :], acc, mask=m_mask[:, None])


@triton.jit
def _paged_expand_kernel(
    # pointers
    h_ptr, pool_ptr, b_pages_ptr, ranks_ptr, scales_ptr, y_ptr, tiles_ptr, sorted_ptr,
    # sizes
    d_out, num_splits,
    # strides
    stride_hs, stride_hm, stride_page, stride_table, stride_ym, stride_yn,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """y[t, n-block] += scales[i] * (sum over splits of h[:, t]) B_i[n-block, :]^T."""
    adapter, rows, m_mask, live = load_tile(tiles_ptr, sorted_ptr, tl.program_id(0), BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < tl.where(live, tl.load(ranks_ptr + adapter), 0)
    pages = tl.load(b_pages_ptr + adapter * stride_table + offs_r, mask=r_mask, other=0).to(tl.int64)
    h = sum_partials(h_ptr, rows, m_mask, num_splits, stride_hs, stride_hm, BLOCK_M, R_PAD)
    h = h * tl.load(scales_ptr + adapter).to(tl.float32)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < d_out
    # column j of B_i is a prefix (d_out values) of page pages[j]
    delta = expand_rows(h, pool_ptr + pages * stride_page, r_mask, offs_n, n_mask, 1, DOT_PRECISION)
    add_into(y_ptr, rows, m_mask, offs_n, n_mask, delta, stride_ym, stride_yn)


def paged_lora(
    x: torch.Tensor,
    y: torch.Tensor,
    pool: torch.Tensor,
    a_pages: torch.Tensor,
    b_pages: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    batch: LoraBatch,
    workspace_buffer: torch.Tensor | None = None,
) -> torch.Tensor:
    """Paged LoRA with heterogeneous ranks; adds the delta into y in place and returns y.

    x: (M, d_in)   y: (M, d_out)
    pool:    (num_pages, page_size), page_size >= d_in, d_out; unit stride within a page
    a_pages: (N, max_rank) int   page of row j of A_i     b_pages: (N, max_rank) int   page of column j of B_i
    ranks:   (N,) int, 0 <= ranks[i] <= max_rank          scales: (N,)
    batch: LoraBatch of adapter ids (rows of the page table) on x's device.
    workspace_buffer: optional fp32 scratch (at least splits * M * pad_rank(max_rank) elements).
    """
    check_paged(x, y, pool, a_pages, b_pages, ranks, scales, batch)
    if pool.stride(1) != 1:
        raise ValueError("pool must have unit stride within a page (pool.stride(1) == 1)")
    if a_pages.stride(1) != 1 or b_pages.stride(1) != 1 or a_pages.stride(0) != b_pages.stride(0):
        raise ValueError("a_pages and b_pages must be row-contiguous tables of one layout")
    m, d_in = x.shape
    d_out = y.shape[1]
    if batch.num_tiles == 0 or d_out == 0:
        return y
    r_pad, cfg = pad_rank(a_pages.shape[1]), blocks()
    bm = batch.block_m
    block_k, block_n = cfg.shrink_k(bm, r_pad), cfg.expand_n(bm, r_pad)
    reread = partial_bytes(batch.num_adapter_tokens, r_pad, d_out, block_n)
    splits, k_per_split = split_k(batch.num_tiles, d_in, block_k, reread)
    h = workspace(workspace_buffer, (splits, m, r_pad), x.device)

    _paged_shrink_kernel[(batch.num_tiles, splits)](
        x, pool, a_pages, ranks, batch.tiles, batch.sorted_tokens, h,
        d_in, k_per_split,
        x.stride(0), x.stride(1), pool.stride(0), a_pages.stride(0), h.stride(0), h.stride(1),
        BLOCK_M=bm, BLOCK_K=block_k, R_PAD=r_pad, DOT_PRECISION=dot_precision(x.dtype),
        **launch_options((bm, block_k), (block_k, r_pad)),
    )
    _paged_expand_kernel[(batch.num_tiles, cdiv(d_out, block_n))](
        h, pool, b_pages, ranks, scales, y, batch.tiles, batch.sorted_tokens,
        d_out, splits,
        h.stride(0), h.stride(1), pool.stride(0), b_pages.stride(0), y.stride(0), y.stride(1),
        BLOCK_M=bm, BLOCK_N=block_n, R_PAD=r_pad, DOT_PRECISION=dot_precision(x.dtype),
        **launch_options((bm, block_n), (r_pad, block_n)),
    )
    return y
