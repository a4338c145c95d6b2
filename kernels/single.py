"""Single LoRA: every token uses one adapter, y += scale * (x A^T) B^T, two dense GEMMs.

The baseline of every comparison. Shrink h = x A^T over row blocks of x, split over d_in (a decode
batch has a single row block), with fp32 partial sums in a workspace; expand y += scale h B^T over
(row block, d_out block).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    blocks, cdiv, check_single, dot_precision, launch_options, pad_rank, partial_bytes, split_k, workspace,
)
from .metadata import choose_block_m
from .tiles import add_into, expand_rows, shrink_rows, sum_partials


@triton.jit
def _single_shrink_kernel(
    # pointers
    x_ptr, a_ptr, h_ptr,
    # sizes
    m, d_in, rank, k_per_split,
    # strides
    stride_xm, stride_xk, stride_ar, stride_ak, stride_hs, stride_hm,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """h[split, rows, :] = x[rows, k-slice] @ A[:, k-slice]^T."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < m
    split = tl.program_id(1)
    offs_r = tl.arange(0, R_PAD)
    k_lo = split * k_per_split
    acc = shrink_rows(
        x_ptr, offs_m, m_mask, stride_xm, stride_xk, a_ptr + offs_r * stride_ar, offs_r < rank, stride_ak,
        k_lo, tl.minimum(k_lo + k_per_split, d_in), BLOCK_M, BLOCK_K, R_PAD, DOT_PRECISION,
    )
    tl.store(h_ptr + split * stride_hs + offs_m[:, None] * stride_hm + offs_r[None, :], acc, mask=m_mask[:, None])


@triton.jit
def _single_expand_kernel(
    # pointers
    h_ptr, b_ptr, y_ptr,
    # sizes
    m, d_out, rank, num_splits, scale,
    # strides
    stride_hs, stride_hm, stride_bn, stride_br, stride_ym, stride_yn,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """y[rows, n-block] += scale * (sum over splits of h[:, rows]) @ B[n-block, :]^T."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < m
    offs_r = tl.arange(0, R_PAD)
    h = sum_partials(h_ptr, offs_m, m_mask, num_splits, stride_hs, stride_hm, BLOCK_M, R_PAD) * scale
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < d_out
    delta = expand_rows(h, b_ptr + offs_r * stride_br, offs_r < rank, offs_n, n_mask, stride_bn, DOT_PRECISION)
    add_into(y_ptr, offs_m, m_mask, offs_n, n_mask, delta, stride_ym, stride_yn)


def single_lora(
    x: torch.Tensor,
    y: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    workspace_buffer: torch.Tensor | None = None,
) -> torch.Tensor:
    """One adapter for every token; adds scale * B (A x) into y in place and returns y.

    x: (M, d_in)   y: (M, d_out)   A: (r, d_in)   B: (d_out, r)   scale: Python float
    workspace_buffer: optional fp32 scratch (at least splits * M * pad_rank(r) elements).
    """
    check_single(x, y, A, B)
    m, d_in = x.shape
    if m == 0 or y.shape[1] == 0:
        return y
    block_m, r_pad, cfg = choose_block_m(m, 1), pad_rank(A.shape[0]), blocks()
    reread = partial_bytes(m, r_pad, y.shape[1], cfg.expand_n(block_m, r_pad))
    splits, k_per_split = split_k(cdiv(m, block_m), d_in, cfg.shrink_k(block_m, r_pad), reread)
    h = workspace(workspace_buffer, (splits, m, r_pad), x.device)
    dense_shrink(x, A, h, k_per_split, block_m)
    dense_expand(h, B, y, scale, block_m)
    return y


def dense_shrink(x: torch.Tensor, A: torch.Tensor, h: torch.Tensor, k_per_split: int, block_m: int) -> None:
    """h[s] = x[:, slice s] A[:, slice s]^T for the d_in slices of k_per_split (any strides of x, A).

    x: (M, d_in)   A: (r, d_in)   h: (splits, M, pad_rank(r)) fp32, every element written
    """
    m, d_in = x.shape
    block_k = blocks().shrink_k(block_m, h.shape[2])
    _single_shrink_kernel[(cdiv(m, block_m), h.shape[0])](
        x, A, h,
        m, d_in, A.shape[0], k_per_split,
        x.stride(0), x.stride(1), A.stride(0), A.stride(1), h.stride(0), h.stride(1),
        BLOCK_M=block_m, BLOCK_K=block_k, R_PAD=h.shape[2], DOT_PRECISION=dot_precision(x.dtype),
        **launch_options((block_m, block_k), (block_k, h.shape[2])),
    )


def dense_expand(h: torch.Tensor, B: torch.Tensor, y: torch.Tensor, scale: float, block_m: int) -> None:
    """y += scale * (sum over s of h[s])[:, :r] B^T, in place.

    h: (splits, M, R_PAD) fp32 with zeros past r   B: (d_out, r)   y: (M, d_out)
    """
    m, d_out = y.shape
    block_n = blocks().expand_n(block_m, h.shape[2])
    _single_expand_kernel[(cdiv(m, block_m), cdiv(d_out, block_n))](
        h, B, y,
        m, d_out, B.shape[1], h.shape[0], float(scale),
        h.stride(0), h.stride(1), B.stride(0), B.stride(1), y.stride(0), y.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, R_PAD=h.shape[2], DOT_PRECISION=dot_precision(y.dtype),
        **launch_options((block_m, block_n), (h.shape[2], block_n)),
    )
