"""Attention over each sequence's own context, read from the KV cache through row indices.

No sequence is padded to the longest: decode queries (one token per sequence) attend their packed
context with a segmented softmax (PyTorch, any device) or the Triton paged-decode kernel
(`paged_decode.py`, CUDA); prefill chunks run PyTorch's SDPA per sequence with a causal mask offset
by the tokens already cached.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .batch import ForwardBatch


def store_kv(storage: torch.Tensor, fb: ForwardBatch, k: torch.Tensor, v: torch.Tensor, v_col: int) -> None:
    """Write this step's K and V (T, kv_dim) into one layer's storage (rows, width)."""
    kv_dim = k.shape[1]
    storage[fb.new_k_rows, :kv_dim] = k.to(storage.dtype)
    storage[fb.new_v_rows, v_col : v_col + kv_dim] = v.to(storage.dtype)


def attention(
    q: torch.Tensor, storage: torch.Tensor, fb: ForwardBatch, kv_heads: int, v_col: int, backend: str = "torch"
) -> torch.Tensor:
    """q: (T, heads, head_dim) in batch order (decode sequences first). Returns (T, heads * head_dim)."""
    T, heads, head_dim = q.shape
    kv_dim = kv_heads * head_dim
    out = torch.empty(T, heads * head_dim, dtype=q.dtype, device=q.device)
    nd = fb.num_decode
    if nd:
        if backend == "triton":
            from .paged_decode import paged_decode_attention

            out[:nd] = paged_decode_attention(q[:nd], storage, fb.decode_k_table, fb.decode_v_table, fb.decode_ctx_lens,
                                              kv_heads, v_col).flatten(1)
        else:
            out[:nd] = _decode_segmented(q[:nd], storage, fb, kv_heads, v_col).flatten(1)
    for b in range(nd, fb.num_seqs):
        t0, t1 = fb.cu_q[b], fb.cu_q[b + 1]
        c0, c1 = fb.cu_ctx[b], fb.cu_ctx[b + 1]
        k = storage[fb.ctx_k_rows[c0:c1], :kv_dim].view(c1 - c0, kv_heads, head_dim)
        v = storage[fb.ctx_v_rows[c0:c1], v_col : v_col + kv_dim].view(c1 - c0, kv_heads, head_dim)
        out[t0:t1] = _prefill_one(q[t0:t1], k.to(q.dtype), v.to(q.dtype)).flatten(1)
    return out


def _prefill_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The last q.shape[0] of k.shape[0] positions attend causally. q (n, H, D), k/v (L, Hkv, D)."""
    n, heads, _ = q.shape
    L, kv_heads, _ = k.shape
    group = heads // kv_heads
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    q_pos = torch.arange(L - n, L, device=q.device)
    mask = torch.arange(L, device=q.device)[None, :] <= q_pos[:, None]  # (n, L)
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
    return o.transpose(0, 1)


def _decode_segmented(q: torch.Tensor, storage: torch.Tensor, fb: ForwardBatch, kv_heads: int, v_col: int):
    """One query per sequence against its packed context: scores, a per-sequence max and sum, then
    a weighted sum of V, all over the packed context rows (no padding). q: (B, heads, D)."""
    B, heads, head_dim = q.shape
    group, kv_dim = heads // kv_heads, kv_heads * head_dim
    n = fb.cu_ctx[B]
    seg = fb.decode_ctx_seq  # (n,) sequence of each context row
    k = storage[fb.ctx_k_rows[:n], :kv_dim].view(n, kv_heads, 1, head_dim).float()
    v = storage[fb.ctx_v_rows[:n], v_col : v_col + kv_dim].view(n, kv_heads, 1, head_dim).float()
    qg = q.float().view(B, kv_heads, group, head_dim)
    scores = (qg[seg] * k).sum(-1) / math.sqrt(head_dim)  # (n, kv_heads, group)
    peak = torch.full((B, kv_heads, group), -math.inf, device=q.device)
    peak.scatter_reduce_(0, seg[:, None, None].expand_as(scores), scores, "amax")
    w = torch.exp(scores - peak[seg])
    norm = torch.zeros(B, kv_heads, group, device=q.device).index_add_(0, seg, w)
    o = torch.zeros(B, kv_heads, group, head_dim, device=q.device).index_add_(0, seg, w[..., None] * v)
    return (o / norm[..., None]).view(B, heads, head_dim).to(q.dtype)
