"""Jointly compressed LoRA ("Compress then Serve"): B_i A_i ~= U_k S_i V_k^T, bases shared per cluster.

    y[t] += U_k S_i V_k^T x[t]   for each token t of adapter i = ids[t] >= 0, k = cluster_of[i]

Three steps, so that only the tiny S_i are per adapter:
  1. h_k = x V_k for every cluster k: a dense GEMM per cluster over all tokens (the single-LoRA
     shrink kernel with A = V_k^T, split over d_in, fp32 partial sums);
  2. g_t = S_i h_{k,t}: a kernel over the batch's segment tiles, which loads S_i once per tile
     (R x R, or R for diagonal S) and multiplies the tile's tokens with tl.dot (so R = 128 costs a
     16..64-row MMA per tile, not a per-token matrix-vector product); rows of other clusters and of
     tokens without an adapter stay zero;
  3. y += g_k U_k^T for every cluster k: a dense GEMM per cluster (the single-LoRA expand kernel).
The dense steps run in token order over row blocks, so U_k and V_k are read once per row block,
not once per segment. `dense="torch"` runs steps 1 and 3 through cuBLAS (torch.mm / addmm_)
instead, for comparison. Steps 1 and 3 cost K times a single (M x d x R) GEMM: meant for the few
clusters joint compression uses (one to a few tens). The scale of each adapter is folded into S_i.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    blocks, cdiv, check_compressed, dot_precision, launch_options, pad_rank, partial_bytes, split_k, workspace,
)
from .metadata import LoraBatch, choose_block_m
from .single import dense_expand, dense_shrink
from .tiles import load_tile

DENSE_PATHS = ("triton", "torch")


@triton.jit
def _compressed_mix_kernel(
    # pointers
    h_ptr, s_ptr, cluster_ptr, g_ptr, tiles_ptr, sorted_ptr,
    # sizes
    width, g_width, num_splits,
    # strides
    stride_hk, stride_hs, stride_hm, stride_sn, stride_sr, stride_sc, stride_gk, stride_gm,
    # meta
    BLOCK_M: tl.constexpr, R_PAD: tl.constexpr, R_CHUNK: tl.constexpr, DIAGONAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """g[k, t, :] = S_i (sum over splits of h[k, s, t, :]) for the tokens t of one tile (adapter i,
    cluster k = cluster_of[i]); columns of g past `width` (up to g_width) are written as zeros.
    A full S_i is read once per tile, R_CHUNK output columns at a time (bounds the registers)."""
    tile = tl.program_id(0)
    adapter, rows, m_mask, live = load_tile(tiles_ptr, sorted_ptr, tile, BLOCK_M)
    cluster = tl.load(cluster_ptr + adapter).to(tl.int64)
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < width
    mask = m_mask[:, None] & r_mask[None, :]
    s_mask = offs_r < tl.where(live, width, 0)  # no S_i for a padding tile

    h = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)  # h may be exactly `width` wide: mask its columns
    for split in range(num_splits):
        h_ptrs = h_ptr + cluster * stride_hk + split * stride_hs + rows[:, None] * stride_hm + offs_r[None, :]
        h += tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
    g_rows = g_ptr + cluster * stride_gk + rows[:, None] * stride_gm
    if DIAGONAL:
        s = tl.load(s_ptr + adapter * stride_sn + offs_r * stride_sr, mask=s_mask, other=0.0)
        g = h * s.to(tl.float32)[None, :]
        g_mask = m_mask[:, None] & (offs_r < g_width)[None, :]
        tl.store(g_rows + offs_r[None, :], g.to(g_ptr.dtype.element_ty), mask=g_mask)
    else:
        h = h.to(s_ptr.dtype.element_ty)
        for c in tl.static_range(0, R_PAD, R_CHUNK):
            offs_c = c + tl.arange(0, R_CHUNK)
            s_t = tl.load(  # (R_PAD, R_CHUNK) = S_i[c-block, :]^T
                s_ptr + adapter * stride_sn + offs_c[None, :] * stride_sr + offs_r[:, None] * stride_sc,
                mask=(offs_c < width)[None, :] & s_mask[:, None], other=0.0,
            )
            g = tl.dot(h, s_t, input_precision=DOT_PRECISION)
            g_mask = m_mask[:, None] & (offs_c < g_width)[None, :]
            tl.store(g_rows + offs_c[None, :], g.to(g_ptr.dtype.element_ty), mask=g_mask)


def compressed_lora(
    x: torch.Tensor,
    y: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    S: torch.Tensor,
    cluster_of: torch.Tensor,
    batch: LoraBatch,
    workspace_buffer: torch.Tensor | None = None,
    dense: str = "triton",
) -> torch.Tensor:
    """Compressed LoRA; adds the delta into y in place and returns y.

    x: (M, d_in)   y: (M, d_out)   U: (K, d_out, R)   V: (K, d_in, R)
    S: (N, R, R) full or (N, R) diagonal, scale folded in   cluster_of: (N,) int in [0, K)
    batch: LoraBatch of adapter ids (rows of S) on x's device.
    dense: "triton" (default) or "torch" (cuBLAS) for the two dense steps.
    workspace_buffer: optional scratch, float32 with dense="triton" (at least
    K * (splits + 1) * M * pad_rank(R) elements), x's dtype with dense="torch" (2 * K * M * R).
    """
    check_compressed(x, y, U, V, S, cluster_of, batch)
    if dense not in DENSE_PATHS:
        raise ValueError(f"dense must be one of {', '.join(DENSE_PATHS)}, got {dense!r}")
    m, d_in = x.shape
    k_clusters, _, width = V.shape
    if batch.num_tiles == 0 or y.shape[1] == 0:
        return y
    if dense == "triton":
        block_m, r_pad, cfg = choose_block_m(m, 1), pad_rank(width), blocks()
        reread = partial_bytes(m, r_pad, 1, 1)  # the mix kernel reads each partial once (one "block")
        splits, k_per_split = split_k(cdiv(m, block_m) * k_clusters, d_in, cfg.shrink_k(block_m, r_pad), reread)
        scratch = workspace(workspace_buffer, (k_clusters, splits + 1, m, r_pad), x.device)
        h, g = scratch[:, :splits], scratch[:, splits]
        for k in range(k_clusters):
            dense_shrink(x, V[k].T, h[k], k_per_split, block_m)
    else:
        scratch = workspace(workspace_buffer, (2, k_clusters, m, width), x.device, dtype=x.dtype)
        h, g = scratch[0].unsqueeze(1), scratch[1]
        for k in range(k_clusters):
            torch.mm(x, V[k], out=h[k, 0])
    # Rows no tile writes (other clusters, tokens without adapter) must add nothing in step 3.
    if k_clusters > 1 or not batch.all_adapted:
        g.zero_()

    diagonal, r_pad = S.dim() == 2, pad_rank(width)
    r_chunk = min(r_pad, 64)
    _compressed_mix_kernel[(batch.num_tiles,)](
        h, S, cluster_of, g, batch.tiles, batch.sorted_tokens,
        width, g.shape[-1], h.shape[1],
        h.stride(0), h.stride(1), h.stride(2), S.stride(0), S.stride(1), 0 if diagonal else S.stride(2),
        g.stride(0), g.stride(1),
        BLOCK_M=batch.block_m, R_PAD=r_pad, R_CHUNK=r_chunk, DIAGONAL=diagonal,
        DOT_PRECISION=dot_precision(x.dtype),
        **launch_options((batch.block_m, r_pad), (r_pad, r_chunk)),
    )
    for k in range(k_clusters):
        if dense == "triton":
            dense_expand(g[k].unsqueeze(0), U[k], y, 1.0, block_m)
        else:
            y.addmm_(g[k], U[k].mT)
    return y
