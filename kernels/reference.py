"""PyTorch implementations of every strategy's LoRA operation.

They are the references the Triton kernels are tested against (called on float64 inputs) and the
fallback on machines without a GPU. Each adds the LoRA delta into `y` in place and returns `y`:

    y[t] += scale[i] * B_i (A_i x[t])      for every token t with adapter i = token_adapters[t] >= 0

Half-precision inputs are computed in float32 and rounded once, as the kernels accumulate.
"""

from __future__ import annotations

import torch

from .metadata import LoraBatch


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def single_lora(x: torch.Tensor, y: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """One adapter for every token: two dense GEMMs.

    x: (M, d_in)   y: (M, d_out)   A: (r, d_in)   B: (d_out, r)
    """
    ct = _compute_dtype(x)
    delta = (x.to(ct) @ A.to(ct).T) @ B.to(ct).T
    y += (scale * delta).to(y.dtype)
    return y


def per_lora(
    x: torch.Tensor, y: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor, batch: LoraBatch
) -> torch.Tensor:
    """Adapters stacked in GPU slots; each token gathers its slot's A and B.

    x: (M, d_in)   y: (M, d_out)   A: (slots, r, d_in)   B: (slots, d_out, r)   scales: (slots,)
    batch.token_adapters holds slot ids.
    """
    ct = _compute_dtype(x)
    for s in range(batch.num_segments):
        slot = int(batch.seg_adapters[s])
        rows = batch.sorted_tokens[batch.seg_starts[s] : batch.seg_starts[s + 1]].long()
        delta = (x[rows].to(ct) @ A[slot].to(ct).T) @ B[slot].to(ct).T
        y[rows] += (scales[slot].to(ct) * delta).to(y.dtype)
    return y


def paged_lora(
    x: torch.Tensor,
    y: torch.Tensor,
    pool: torch.Tensor,
    a_pages: torch.Tensor,
    b_pages: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    batch: LoraBatch,
) -> torch.Tensor:
    """S-LoRA unified paging: adapter rows live in pages of one pool, found through a page table.

    pool:    (num_pages, page_size)  one hidden-size vector per page (shared with the KV cache)
    a_pages: (N, max_rank) int32     page holding row j of A_i (A_i[j] = pool[a_pages[i, j], :d_in])
    b_pages: (N, max_rank) int32     page holding column j of B_i (B_i[:, j] = pool[b_pages[i, j], :d_out])
    ranks:   (N,) int32              rank of adapter i; table entries past it are unused
    scales:  (N,)
    x: (M, d_in)   y: (M, d_out)
    """
    ct = _compute_dtype(x)
    d_in, d_out = x.shape[1], y.shape[1]
    for s in range(batch.num_segments):
        i = int(batch.seg_adapters[s])
        r = int(ranks[i])
        rows = batch.sorted_tokens[batch.seg_starts[s] : batch.seg_starts[s + 1]].long()
        A = pool[a_pages[i, :r].long(), :d_in].to(ct)  # (r, d_in)
        Bt = pool[b_pages[i, :r].long(), :d_out].to(ct)  # (r, d_out) = B_i^T
        delta = (x[rows].to(ct) @ A.T) @ Bt
        y[rows] += (scales[i].to(ct) * delta).to(y.dtype)
    return y


def compressed_lora(
    x: torch.Tensor,
    y: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    S: torch.Tensor,
    cluster_of: torch.Tensor,
    batch: LoraBatch,
) -> torch.Tensor:
    """Joint compression: B_i A_i ~= U_k S_i V_k^T with bases shared by the adapters of cluster k.

    U: (K, d_out, R)   V: (K, d_in, R)   S: (N, R, R) full or (N, R) diagonal (scale folded in)
    cluster_of: (N,) int   x: (M, d_in)   y: (M, d_out)
    """
    ct = _compute_dtype(x)
    diagonal = S.dim() == 2
    for s in range(batch.num_segments):
        i = int(batch.seg_adapters[s])
        k = int(cluster_of[i])
        rows = batch.sorted_tokens[batch.seg_starts[s] : batch.seg_starts[s + 1]].long()
        h = x[rows].to(ct) @ V[k].to(ct)  # (T, R)
        g = h * S[i].to(ct) if diagonal else h @ S[i].to(ct).T  # g_t = S_i h_t
        y[rows] += (g @ U[k].to(ct).T).to(y.dtype)
    return y
