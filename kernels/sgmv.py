"""Per-lora segmented LoRA (Punica SGMV style): tokens of one adapter are processed together.

    y[t] += scales[i] * B[i] @ (A[i] @ x[t])   for each token t of adapter slot i = ids[t] >= 0

Two kernels over the batch's segment tiles (`LoraBatch.tiles`, block_m tokens of one adapter):
shrink h = x A_i^T (split over d_in, partial sums in an fp32 workspace) and expand y += s_i h B_i^T
(over blocks of d_out). Each tile reads its adapter's A_i and B_i once, so a segment of T tokens
costs ceil(T / block_m) weight reads, not T; the grid is sized by the batch's tiles, never by the
number of resident slots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    blocks, cdiv, check_per_lora, dot_precision, launch_options, pad_rank, partial_bytes, split_k, workspace,
)
from .metadata import LoraBatch
from .tiles import add_into, expand_rows, load_tile, shrink_rows, sum_partials


@triton.jit
def _sgmv_shrink_kernel(
    # pointers
    x_ptr, a_ptr, tiles_ptr, sorted_ptr, h_ptr,
    # sizes
    d_in, rank, k_per_split,
    # strides
    stride_xm, stride_xk, stride_as, stride_ar, stride_ak, stride_hs, stride_hm,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """h[split, t, :] = partial sum over this split's slice of d_in of A[slot] x[t], for a tile's tokens."""
    split = tl.program_id(1)
    slot, rows, m_mask, live = load_tile(tiles_ptr, sorted_ptr, tl.program_id(0), BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    a_rows = a_ptr + slot * stride_as + offs_r * stride_ar
    k_lo = split * k_per_split
    acc = shrink_rows(
        x_ptr, rows, m_mask, stride_xm, stride_xk, a_rows, offs_r < tl.where(live, rank, 0), stride_ak,
        k_lo, tl.minimum(k_lo + k_per_split, d_in), BLOCK_M, BLOCK_K, R_PAD, DOT_PRECISION,
    )
    tl.store(h_ptr + split * stride_hs + rows[:, None] * stride_hm + offs_r[None, :], acc, mask=m_mask[:, None])


@triton.jit
def _sgmv_expand_kernel(
    # pointers
    h_ptr, b_ptr, scales_ptr, y_ptr, tiles_ptr, sorted_ptr,
    # sizes
    d_out, rank, num_splits,
    # strides
    stride_hs, stride_hm, stride_bs, stride_bn, stride_br, stride_ym, stride_yn,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """y[t, n-block] += scales[slot] * (sum over splits of h[:, t]) B[slot, n-block, :]^T."""
    slot, rows, m_mask, live = load_tile(tiles_ptr, sorted_ptr, tl.program_id(0), BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    h = sum_partials(h_ptr, rows, m_mask, num_splits, stride_hs, stride_hm, BLOCK_M, R_PAD)
    h = h * tl.load(scales_ptr + slot).to(tl.float32)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < d_out
    b_cols = b_ptr + slot * stride_bs + offs_r * stride_br
    delta = expand_rows(h, b_cols, offs_r < tl.where(live, rank, 0), offs_n, n_mask, stride_bn, DOT_PRECISION)
    add_into(y_ptr, rows, m_mask, offs_n, n_mask, delta, stride_ym, stride_yn)


def sgmv_lora(
    x: torch.Tensor,
    y: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scales: torch.Tensor,
    batch: LoraBatch,
    workspace_buffer: torch.Tensor | None = None,
) -> torch.Tensor:
    """Segmented per-lora LoRA; adds the delta into y in place and returns y.

    x: (M, d_in)   y: (M, d_out)   A: (slots, r, d_in)   B: (slots, d_out, r)   scales: (slots,)
    batch: LoraBatch of slot ids on x's device. workspace_buffer: optional fp32 scratch for the
    split-K partial sums (at least splits * M * pad_rank(r) elements).
    """
    check_per_lora(x, y, A, B, scales, batch)
    m, d_in = x.shape
    d_out = y.shape[1]
    rank = A.shape[1]
    if batch.num_tiles == 0 or d_out == 0:
        return y
    r_pad, cfg = pad_rank(rank), blocks()
    bm = batch.block_m
    block_k, block_n = cfg.shrink_k(bm, r_pad), cfg.expand_n(bm, r_pad)
    reread = partial_bytes(batch.num_adapter_tokens, r_pad, d_out, block_n)
    splits, k_per_split = split_k(batch.num_tiles, d_in, block_k, reread)
    h = workspace(workspace_buffer, (splits, m, r_pad), x.device)

    _sgmv_shrink_kernel[(batch.num_tiles, splits)](
        x, A, batch.tiles, batch.sorted_tokens, h,
        d_in, rank, k_per_split,
        x.stride(0), x.stride(1), A.stride(0), A.stride(1), A.stride(2), h.stride(0), h.stride(1),
        BLOCK_M=bm, BLOCK_K=block_k, R_PAD=r_pad, DOT_PRECISION=dot_precision(x.dtype),
        **launch_options((bm, block_k), (block_k, r_pad)),
    )
    _sgmv_expand_kernel[(batch.num_tiles, cdiv(d_out, block_n))](
        h, B, scales, y, batch.tiles, batch.sorted_tokens,
        d_out, rank, splits,
        h.stride(0), h.stride(1), B.stride(0), B.stride(1), B.stride(2), y.stride(0), y.stride(1),
        BLOCK_M=bm, BLOCK_N=block_n, R_PAD=r_pad, DOT_PRECISION=dot_precision(x.dtype),
        **launch_options((bm, block_n), (r_pad, block_n)),
    )
    return y
