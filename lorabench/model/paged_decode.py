"""Triton decode attention over a paged/block KV cache: one query token per sequence.

Each program takes one sequence and one KV head (with its group of query heads), walks that
sequence's own context in blocks of BLOCK_N tokens through its row table, and keeps an online
softmax. The loop bound is the sequence's length read from device memory, so the work follows each
sequence's context (no padding to the longest), and a CUDA graph can replay it with new lengths.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    q_ptr, storage_ptr, k_table_ptr, v_table_ptr, ctx_lens_ptr, out_ptr,
    stride_qb, stride_qh, stride_row, stride_tb, stride_ob, stride_oh,
    v_col, sm_scale,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    kh = tl.program_id(1)
    length = tl.load(ctx_lens_ptr + b)
    g = tl.arange(0, GROUP_P2)
    d = tl.arange(0, HEAD_DIM_P2)
    qmask = (g < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + b * stride_qb + (kh * GROUP + g)[:, None] * stride_qh + d[None, :], mask=qmask, other=0.0)
    q = q.to(tl.float32) * sm_scale
    m = tl.full([GROUP_P2], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_P2], tl.float32)
    acc = tl.zeros([GROUP_P2, HEAD_DIM_P2], tl.float32)
    for start in range(0, length, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        nmask = n < length
        kv_mask = nmask[:, None] & (d < HEAD_DIM)[None, :]
        k_rows = tl.load(k_table_ptr + b * stride_tb + n, mask=nmask, other=0).to(tl.int64)
        v_rows = tl.load(v_table_ptr + b * stride_tb + n, mask=nmask, other=0).to(tl.int64)
        k = tl.load(storage_ptr + k_rows[:, None] * stride_row + kh * HEAD_DIM + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(storage_ptr + v_rows[:, None] * stride_row + v_col + kh * HEAD_DIM + d[None, :], mask=kv_mask,
                    other=0.0)
        s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)  # (GROUP_P2, BLOCK_N)
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        m = m_new
    out = acc / l[:, None]
    tl.store(out_ptr + b * stride_ob + (kh * GROUP + g)[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=qmask)


def paged_decode_attention(
    q: torch.Tensor, storage: torch.Tensor, k_table: torch.Tensor, v_table: torch.Tensor, ctx_lens: torch.Tensor,
    kv_heads: int, v_col: int, block_n: int = 16,
) -> torch.Tensor:
    """q: (B, heads, head_dim); storage: (rows, width) of one layer; k_table/v_table: (B, >= max
    length) rows of each sequence's tokens; ctx_lens: (B,) int32, each >= 1. Returns (B, heads, head_dim)."""
    B, heads, head_dim = q.shape
    if heads % kv_heads or k_table.shape != v_table.shape or k_table.shape[0] != B or ctx_lens.shape != (B,):
        raise ValueError(f"paged decode: q {tuple(q.shape)}, tables {tuple(k_table.shape)}/{tuple(v_table.shape)}, "
                         f"ctx_lens {tuple(ctx_lens.shape)}, kv_heads {kv_heads} do not agree")
    q, k_table, v_table = q.contiguous(), k_table.contiguous(), v_table.contiguous()
    out = torch.empty_like(q)
    if B == 0:
        return out
    group = heads // kv_heads
    _paged_decode_kernel[(B, kv_heads)](
        q, storage, k_table, v_table, ctx_lens, out,
        q.stride(0), q.stride(1), storage.stride(0), k_table.stride(0), out.stride(0), out.stride(1),
        v_col, 1.0 / math.sqrt(head_dim),
        GROUP=group, GROUP_P2=triton.next_power_of_2(group), HEAD_DIM=head_dim,
        HEAD_DIM_P2=triton.next_power_of_2(head_dim), BLOCK_N=block_n,
    )
    return out
