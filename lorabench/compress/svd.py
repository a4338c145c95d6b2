"""The baseline: every adapter compressed alone by its truncated SVD (no sharing).

B_i A_i = Qb_i (Rb_i Ra_i^T) Qa_i^T with B_i = Qb_i Rb_i and A_i^T = Qa_i Ra_i (thin QRs); the SVD of
the r x r middle gives B_i A_i's. It fits the compressed format as one "cluster" per adapter with
bases U_i, V_i (its singular vectors) and a diagonal core (its singular values).
"""

from __future__ import annotations

import torch

from lorabench.adapters.types import LoraStack
from lorabench.compress.fit import ModuleFit, relative, threads_by_size


@threads_by_size
def fit_svd(stack: LoraStack, rank: int) -> ModuleFit:
    """Rank-min(rank, r) truncation of every adapter: U (n, d_out, R'), V (n, d_in, R'), S (n, R')."""
    Qb, Rb = torch.linalg.qr(stack.Bt.transpose(1, 2))  # (n, d_out, r), (n, r, r)
    Qa, Ra = torch.linalg.qr(stack.A.transpose(1, 2))  # (n, d_in, r), (n, r, r)
    Uc, sigma, Vch = torch.linalg.svd(Rb @ Ra.transpose(1, 2))
    kept = min(rank, sigma.shape[1])
    energy = sigma.double().pow(2)
    norms2 = energy.sum(1)
    err = energy[:, kept:].sum(1)
    return ModuleFit(
        U=Qb @ Uc[:, :, :kept],
        V=Qa @ Vch.transpose(1, 2)[:, :, :kept],
        S=sigma[:, :kept].contiguous(),
        cluster_of=torch.arange(stack.n),
        errors=relative(err, norms2).cpu(),
        norms2=norms2.cpu(),
    )
