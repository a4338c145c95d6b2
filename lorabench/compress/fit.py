"""What every compression method returns, and the pieces they share.

All methods minimize, over one module's n adapters (scaling folded into B_i),

    sum_i w_i || B_i A_i - U S_i V^T ||_F^2

and work from the low-rank factors only: every product is one of LoraStack's four GEMMs of cost
O(n r d R), or an R x R (at most 2R x 2R) problem. Errors and objectives are accumulated in float64.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch


@dataclass
class GroupFit:
    """Shared bases of one group of adapters and each adapter's core.

    U: (d_out, R)   V: (d_in, R)   S: (n, R, R) full or (n, R) diagonal
    err: (n,) float64, ||B_i A_i - U S_i V^T||^2 (absolute, unweighted)
    history: the weighted objective after initialization and after each iteration
    """

    U: torch.Tensor
    V: torch.Tensor
    S: torch.Tensor
    err: torch.Tensor
    history: list[float] = field(default_factory=list)

    @property
    def iterations(self) -> int:
        return max(len(self.history) - 1, 0)


@dataclass
class ModuleFit:
    """One module's compression: K groups of shared bases, one core per adapter.

    U: (K, d_out, R)   V: (K, d_in, R)   S: (n, R, R) or (n, R)   (on the fit's device)
    cluster_of: (n,) int64; errors: (n,) float64 relative errors ||B_i A_i - U S_i V^T||^2 / ||B_i A_i||^2;
    norms2: (n,) float64 ||B_i A_i||^2, scaling included   (these three on the CPU)
    """

    U: torch.Tensor
    V: torch.Tensor
    S: torch.Tensor
    cluster_of: torch.Tensor
    errors: torch.Tensor
    norms2: torch.Tensor
    history: list[float] = field(default_factory=list)
    iterations: int = 0

    @property
    def clusters(self) -> int:
        return self.U.shape[0]

    @property
    def rank(self) -> int:
        return self.U.shape[2]

    # An all-zero adapter has no relative error (0 / 0): the means and maxima leave it out, and the
    # reports list it apart (compress/report.py), so it cannot pull the mean down.
    @property
    def mean_error(self) -> float:
        errors = self.errors[self.norms2 > 0]
        return float(errors.mean()) if errors.numel() else math.nan

    @property
    def max_error(self) -> float:
        errors = self.errors[self.norms2 > 0]
        return float(errors.max()) if errors.numel() else math.nan


def relative(err: torch.Tensor, norms2: torch.Tensor) -> torch.Tensor:
    """err / norms2, clipped to [0, inf); an all-zero adapter has error 0."""
    return torch.where(norms2 > 0, err.clamp_min(0) / norms2.clamp_min(1e-300), torch.zeros_like(err))


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run small LAPACK calls (R x R eigenproblems and solves, d x R QR) on one CPU thread: with
    several threads they spend far longer synchronizing than computing (a 128 x 128 eigh: about
    1 ms on one thread, 25-900 ms on two busy cores). The large GEMMs keep every thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


SMALL_STACK = 1 << 22  # numbers in A and B below which a whole fit runs on one thread


def threads_by_size(fit: Callable) -> Callable:
    """Run `fit(stack, ...)` on one thread when the stack is small: its ops are then tiny, and extra
    threads only add synchronization (milliseconds per op on busy shared cores). Large stacks keep
    every thread for their GEMMs."""

    @functools.wraps(fit)
    def wrapper(stack, *args, **kwargs):
        small = stack.A.numel() + stack.Bt.numel() < SMALL_STACK
        with one_thread() if small else contextlib.nullcontext():
            return fit(stack, *args, **kwargs)

    return wrapper


def orthonormalize(X: torch.Tensor, against: torch.Tensor | None = None) -> torch.Tensor:
    """Orthonormal basis of X's columns (made orthogonal to `against`'s first); twice, for stability.

    Householder QR returns orthonormal columns even when X is rank-deficient, so a basis larger
    than the data's rank is completed with arbitrary orthonormal directions.
    """
    for _ in range(2):
        if against is not None:
            X = X - against @ (against.T @ X)
        with one_thread():
            X = torch.linalg.qr(X)[0]
    return X


def resolve_weights(norms2: torch.Tensor, weights: torch.Tensor | None, normalize: bool) -> torch.Tensor:
    """Per-adapter objective weights (float64): the user's weights, divided by ||B_i A_i||^2 with
    `normalize` (every adapter then counts by its relative error; cores keep the true norms)."""
    w = torch.ones_like(norms2) if weights is None else weights.to(norms2).clone()
    if normalize:
        w = w / norms2.clamp_min(1e-300)
    return w


def converged(history: list[float], tol: float, floor: float) -> bool:
    """Stop when the objective's relative decrease over the last iteration is below tol, or when the
    objective is at rounding level (`floor`)."""
    if len(history) < 2:
        return False
    prev, now = history[-2], history[-1]
    return now <= floor or (prev - now) <= tol * max(prev, floor)


def rounding_floor(total: float, dtype: torch.dtype) -> float:
    return 100 * torch.finfo(dtype).eps * total
