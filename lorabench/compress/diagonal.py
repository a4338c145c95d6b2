"""Diagonal joint compression: B_i A_i ~= U diag(s_i) V^T with U, V free (not orthonormal).

Alternating least squares over three blocks, each solved exactly, so the objective never
increases. With D_i = diag(s_i), P_i = A_i V and Q_i = B_i^T U (both r x R):

    U:  U [(V^T V) o sum_i w_i s_i s_i^T] = sum_i w_i B_i P_i D_i
    V:  V [(U^T U) o sum_i w_i s_i s_i^T] = sum_i w_i A_i^T Q_i D_i
    s:  [(U^T U) o (V^T V)] s_i = g_i,   g_i[j] = u_j^T B_i A_i v_j = sum_r Q_i[r, j] P_i[r, j]

(o: elementwise product). Columns of U and V are rescaled to unit norm after each sweep, the
scale moving into the s_i. The start: the full method's bases, then Jennrich's simultaneous
diagonalization of the R x R cores (S_i = X D_i Y^T: the eigenvectors of M_a M_b^-1 and of
M_a^T M_b^-T, M = random combinations of the S_i, give X and Y) -- exact when the collection is
exactly diagonal, a good start otherwise; ALS then refines.
"""

from __future__ import annotations

import torch

from lorabench.adapters.types import LoraStack
from lorabench.compress.fit import GroupFit, converged, one_thread, rounding_floor, threads_by_size
from lorabench.compress.full import fit_full


def _solve_right(rhs: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """X with X M = rhs for symmetric PSD M (least-squares minimum-norm if M is singular)."""
    with one_thread():
        inverse = torch.linalg.pinv(M.double(), hermitian=True)
    return (rhs.double() @ inverse).to(rhs)


def _cores_and_error(Qb: torch.Tensor, P: torch.Tensor, U: torch.Tensor, V: torch.Tensor, norms2: torch.Tensor):
    """Best s_i for given U, V, and the absolute errors (float64)."""
    M_s = (U.T @ U) * (V.T @ V)
    g = (Qb * P).sum(dim=1)  # (n, R)
    s = _solve_right(g, M_s)
    sd, gd = s.double(), g.double()
    err = norms2 - 2 * (sd * gd).sum(1) + ((sd @ M_s.double()) * sd).sum(1)
    return s, err.clamp_min(0)


def project_diagonal(stack: LoraStack, U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best diagonal cores s_i (n, R) on given bases and the absolute errors (float64)."""
    return _cores_and_error(stack.bt_times(U), stack.a_times(V), U, V, stack.norms2())


def _jennrich(S: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """X, Y (R x R, real) with S_i ~= X D_i Y^T, or None if the cores do not allow it."""
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.randn(S.shape[0], generator=g, dtype=torch.float64) for _ in range(2))
    Sd = S.double().cpu()
    Ma, Mb = torch.einsum("n,nij->ij", a, Sd), torch.einsum("n,nij->ij", b, Sd)
    with one_thread():
        if torch.linalg.cond(Mb) > 1e10:
            return None
        lam_x, X = torch.linalg.eig(Ma @ torch.linalg.inv(Mb))
        lam_y, Y = torch.linalg.eig((torch.linalg.inv(Mb) @ Ma).T)
    # The same eigenvalues a_j / b_j pair X's and Y's columns.
    order_x = torch.argsort(lam_x.real * 1e6 + lam_x.imag)
    order_y = torch.argsort(lam_y.real * 1e6 + lam_y.imag)
    X, Y = X[:, order_x].real, Y[:, order_y].real
    if torch.linalg.cond(X) > 1e10 or torch.linalg.cond(Y) > 1e10:
        return None
    return X.to(S), Y.to(S)


@threads_by_size
def fit_diagonal(
    stack: LoraStack,
    rank: int,
    w: torch.Tensor,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    tol: float = 1e-4,
    max_iter: int = 50,
    seed: int = 0,
) -> GroupFit:
    """Fit U (d_out x R), V (d_in x R) and diagonal cores s_i (n x R) to one group of adapters."""
    norms2 = stack.norms2()
    wd = w.to(norms2)
    total = float((wd * norms2).sum())
    floor = rounding_floor(total, stack.A.dtype)
    if init is None:
        full = fit_full(stack, rank, w, tol=tol, max_iter=max_iter, seed=seed)
        starts = [(full.U, full.V)]
        xy = _jennrich(full.S, seed)
        if xy is not None:
            starts.insert(0, (full.U @ xy[0], full.V @ xy[1]))
    else:
        starts = [init]
    best = None
    for U, V in starts:  # keep the better start
        Qb, P = stack.bt_times(U), stack.a_times(V)
        s, err = _cores_and_error(Qb, P, U, V, norms2)
        objective = float((wd * err).sum())
        if best is None or objective < best[-1]:
            best = (U, V, Qb, P, s, objective)
    U, V, Qb, P, s, objective = best
    history = [objective]
    wt = w.to(stack.A)[:, None]
    while len(history) <= max_iter and not converged(history, tol, floor):
        ss = s.T @ (wt * s)  # sum_i w_i s_i s_i^T
        U = _solve_right(stack.sum_b_times(wt[:, :, None] * P * s[:, None, :]), (V.T @ V) * ss)
        Qb = stack.bt_times(U)
        V = _solve_right(stack.sum_at_times(wt[:, :, None] * Qb * s[:, None, :]), (U.T @ U) * ss)
        P = stack.a_times(V)
        # Unit columns (scale into s): keeps U and V from drifting apart in magnitude.
        cu, cv = U.norm(dim=0), V.norm(dim=0)
        cu, cv = torch.where(cu > 0, cu, 1), torch.where(cv > 0, cv, 1)
        U, V, Qb, P = U / cu, V / cv, Qb / cu, P / cv
        s, err = _cores_and_error(Qb, P, U, V, norms2)
        history.append(float((wd * err).sum()))
    return GroupFit(U, V, s, err, history)
