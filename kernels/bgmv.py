"""Per-lora per-token gather LoRA (Punica BGMV style): each token gathers its adapter's weights.

    y[t] += scales[i] * B[i] @ (A[i] @ x[t])   for each token t of adapter slot i = ids[t] >= 0

For small decode batches, where most segments hold one token: no tensor-core padding of a 1-token
tile to 16 rows, and one program per (token, d-block). Programs walk the tokens in adapter order
(`LoraBatch.sorted_tokens`), so tokens sharing an adapter run side by side and hit its weights in
L2. The grid covers only tokens that have an adapter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import blocks, cdiv, check_per_lora, launch_options, pad_rank, partial_bytes, split_k, workspace
from .metadata import LoraBatch

@triton.jit
def _bgmv_shrink_kernel(
    # pointers
    x_ptr, a_ptr, ids_ptr, sorted_ptr, h_ptr,
    # sizes
    d_in, rank, k_per_split,
    # strides
    stride_xm, stride_xk, stride_as, stride_ar, stride_ak, stride_hs, stride_hm,
    # meta
    BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
):
    """h[split, t, :] = A[ids[t], :, k-slice] @ x[t, k-slice] for the token t = sorted_tokens[pid]."""
    token = tl.load(sorted_ptr + tl.program_id(0)).to(tl.int64)
    split = tl.program_id(1)
    slot = tl.load(ids_ptr + token).to(tl.int64)
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < tl.where(slot >= 0, rank, 0)  # a static batch lists tokens without adapter too

    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, d_in)
    acc = tl.zeros((R_PAD,), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        xs = tl.load(x_ptr + token * stride_xm + offs_k * stride_xk, mask=k_mask, other=0.0)
        a = tl.load(
            a_ptr + slot * stride_as + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
            mask=r_mask[:, None] & k_mask[None, :], other=0.0,
        )
        acc += tl.sum(a.to(tl.float32) * xs.to(tl.float32)[None, :], axis=1)

    tl.store(h_ptr + split * stride_hs + token * stride_hm + offs_r, acc)


@triton.jit
def _bgmv_expand_kernel(
    # pointers
    h_ptr, b_ptr, scales_ptr, y_ptr, ids_ptr, sorted_ptr,
    # sizes
    d_out, rank, num_splits,
    # strides
    stride_hs, stride_hm, stride_bs, stride_bn, stride_br, stride_ym, stride_yn,
    # meta
    BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
):
    """y[t, n-block] += scales[ids[t]] * B[ids[t], n-block, :] @ h[t] for t = sorted_tokens[pid]."""
    token = tl.load(sorted_ptr + tl.program_id(0)).to(tl.int64)
    pid_n = tl.program_id(1)
    slot = tl.load(ids_ptr + token).to(tl.int64)
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < tl.where(slot >= 0, rank, 0)  # a static batch lists tokens without adapter too

    h = tl.zeros((R_PAD,), dtype=tl.float32)
    for s in range(num_splits):
        h += tl.load(h_ptr + s * stride_hs + token * stride_hm + offs_r)
    h = h * tl.load(scales_ptr + slot).to(tl.float32)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < d_out
    b = tl.load(
        b_ptr + slot * stride_bs + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
        mask=n_mask[:, None] & r_mask[None, :], other=0.0,
    )
    delta = tl.sum(b.to(tl.float32) * h[None, :], axis=1)

    y_ptrs = y_ptr + token * stride_ym + offs_n * stride_yn
    y_mask = offs_n < tl.where(slot >= 0, d_out, 0)
    y = tl.load(y_ptrs, mask=y_mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y.dtype), mask=y_mask)


def bgmv_lora(
    x: torch.Tensor,
    y: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scales: torch.Tensor,
    batch: LoraBatch,
    workspace_buffer: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token gather per-lora LoRA; adds the delta into y in place and returns y.

    x: (M, d_in)   y: (M, d_out)   A: (slots, r, d_in)   B: (slots, d_out, r)   scales: (slots,)
    batch: LoraBatch of slot ids on x's device. workspace_buffer: optional fp32 scratch for the
    split-K partial sums (at least splits * M * pad_rank(r) elements).
    """
    check_per_lora(x, y, A, B, scales, batch)
    m, d_in = x.shape
    d_out = y.shape[1]
    rank = A.shape[1]
    tokens = batch.num_adapter_tokens
    if tokens == 0 or d_out == 0:
        return y
    r_pad, cfg = pad_rank(rank), blocks()
    block = cfg.gather(r_pad)
    reread = partial_bytes(tokens, r_pad, d_out, block)
    splits, k_per_split = split_k(tokens, d_in, block, reread)
    h = workspace(workspace_buffer, (splits, m, r_pad), x.device)

    _bgmv_shrink_kernel[(tokens, splits)](
        x, A, batch.token_adapters, batch.sorted_tokens, h,
        d_in, rank, k_per_split,
        x.stride(0), x.stride(1), A.stride(0), A.stride(1), A.stride(2), h.stride(0), h.stride(1),
        BLOCK_K=block, R_PAD=r_pad, **launch_options((r_pad, block)),
    )
    _bgmv_expand_kernel[(tokens, cdiv(d_out, block))](
        h, B, scales, y, batch.token_adapters, batch.sorted_tokens,
        d_out, rank, splits,
        h.stride(0), h.stride(1), B.stride(0), B.stride(1), B.stride(2), y.stride(0), y.stride(1),
        BLOCK_N=block, R_PAD=r_pad, **launch_options((r_pad, block)),
    )
    return y
