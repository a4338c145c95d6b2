"""Full joint compression: orthonormal shared bases U, V and a full R x R core per adapter.

For orthonormal U, V the best core is S_i = U^T B_i A_i V, and the objective is

    E(U, V) = sum_i w_i ||B_i A_i||^2  -  sum_i w_i ||U^T B_i A_i V||^2.

Alternating maximization of the second term: with V fixed, U should span the top-R left singular
subspace of the stacked [sqrt(w_i) B_i A_i V]; its Gram matrix G = sum_i w_i B_i P_i P_i^T B_i^T
(P_i = A_i V, r x R) is applied to a d_out x R block through the factors (cost O(n r d R)), never
formed. Each half-step is a Rayleigh-Ritz step on span[U, G U]: the best R-dimensional subspace of a
space that contains the current U, so the objective never increases, and it converges in far
fewer iterations than plain subspace iteration at the same cost (B_i^T U is already known, only
B_i^T of the R new directions is computed). Then the same for V with U fixed.
"""

from __future__ import annotations

from typing import Callable

import torch

from lorabench.adapters.types import LoraStack
from lorabench.compress.fit import GroupFit, converged, one_thread, orthonormalize, rounding_floor, threads_by_size

Product = Callable[[torch.Tensor], torch.Tensor]


def _randn(rows: int, cols: int, seed: int, like: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g, dtype=torch.float64).to(like)


def initial_bases(stack: LoraStack, rank: int, w: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A randomized range finder: U from sum_i w_i B_i A_i A_i^T B_i^T applied to a Gaussian
    block, then V from the Gram matrix of the [A_i^T B_i^T U] given that U."""
    wt = w.to(stack.A)[:, None, None]
    gram_a = stack.A @ stack.A.transpose(1, 2)  # (n, r, r)
    U = orthonormalize(stack.sum_b_times(wt * (gram_a @ stack.bt_times(_randn(stack.d_out, rank, seed, stack.A)))))
    Qb = stack.bt_times(U)
    T = stack.a_times(_randn(stack.d_in, rank, seed + 1, stack.A))
    V = orthonormalize(stack.sum_at_times(wt * (Qb @ (Qb.transpose(1, 2) @ T))))
    return U, V


def _rayleigh_ritz(
    times: Product, sum_times: Product, basis: torch.Tensor, proj: torch.Tensor, other: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One half-step. With F_i the factor on this side (B_i for U, A_i^T for V):
    proj_i = F_i^T basis (n, r, R), other_i = the other side's projection (n, r, R).
    Returns the new basis, F_i^T new_basis, and the captured energy sum_i w_i ||S_i||^2."""
    rank = basis.shape[1]
    cores = proj.transpose(1, 2) @ other  # S_i or S_i^T (n, R, R)
    G_basis = sum_times(w.to(other)[:, None, None] * (other @ cores.transpose(1, 2)))
    room = min(rank, basis.shape[0] - rank)  # new directions that fit beside the basis (R > d/2: fewer)
    extra = orthonormalize(G_basis[:, :room], against=basis)
    proj_all = torch.cat([proj, times(extra)], dim=2)  # (n, r, 2R)
    Z = proj_all.transpose(1, 2) @ other  # (n, R + room, R): [basis, extra]^T F_i other_i
    Z = (Z * w.to(Z).sqrt()[:, None, None]).transpose(0, 1).reshape(rank + room, -1)
    H = (Z @ Z.T).double()  # sum_i w_i Z_i Z_i^T
    with one_thread():
        evals, evecs = torch.linalg.eigh(H)
    top = evecs[:, -rank:].to(basis)
    return torch.cat([basis, extra], dim=1) @ top, proj_all @ top, float(evals[-rank:].sum())


@threads_by_size
def fit_full(
    stack: LoraStack,
    rank: int,
    w: torch.Tensor,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    tol: float = 1e-4,
    max_iter: int = 50,
    seed: int = 0,
) -> GroupFit:
    """Fit orthonormal U (d_out x R), V (d_in x R) and S_i = U^T B_i A_i V to one group of adapters.

    w: (n,) float64 objective weights. Deterministic given `seed` (and `init`, if given).
    """
    norms2 = stack.norms2()
    w = w.to(norms2)
    total = float((w * norms2).sum())
    floor = rounding_floor(total, stack.A.dtype)
    U, V = init if init is not None else initial_bases(stack, rank, w, seed)
    P, Qb = stack.a_times(V), stack.bt_times(U)
    history = [total - float((w * (Qb.transpose(1, 2) @ P).double().pow(2).sum(dim=(1, 2))).sum())]
    while len(history) <= max_iter and not converged(history, tol, floor):
        U, Qb, _ = _rayleigh_ritz(stack.bt_times, stack.sum_b_times, U, Qb, P, w)
        V, P, captured = _rayleigh_ritz(stack.a_times, stack.sum_at_times, V, P, Qb, w)
        history.append(total - captured)
    S, err = project_full(stack, U, V)
    return GroupFit(U, V, S, err, history)


def project_full(stack: LoraStack, U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best cores on given orthonormal bases: S_i = U^T B_i A_i V (n, R, R), and the absolute
    errors ||B_i A_i||^2 - ||S_i||^2 (float64)."""
    S = stack.bt_times(U).transpose(1, 2) @ stack.a_times(V)
    return S, (stack.norms2() - S.double().pow(2).sum(dim=(1, 2))).clamp_min(0)
