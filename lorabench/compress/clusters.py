"""Clustered joint compression: K groups of adapters, each with its own shared bases.

k-means-like alternation: fit every group's bases (full or diagonal method, warm-started from the
previous round), then move every adapter to the group whose bases reconstruct it best; repeat until
no adapter moves. Both steps never increase the total objective. A group left empty takes the
adapter reconstructed worst (from a group of two or more) and is refitted from scratch.
The start is k-means++ on adapters: a seed adapter's own column and row spaces serve as bases,
and each next seed is drawn with probability proportional to the squared relative error of an
adapter under the seeds so far.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from lorabench.adapters.types import LoraStack
from lorabench.compress.diagonal import fit_diagonal, project_diagonal
from lorabench.compress.fit import GroupFit, ModuleFit, orthonormalize, relative, threads_by_size
from lorabench.compress.full import fit_full, project_full

# method -> (fit one group, best cores and absolute errors on given bases)
METHODS: dict[str, tuple[Callable[..., GroupFit], Callable[..., tuple[torch.Tensor, torch.Tensor]]]] = {
    "full": (fit_full, project_full),
    "diagonal": (fit_diagonal, project_diagonal),
}


def _seed_bases(stack: LoraStack, j: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases spanning adapter j's column and row spaces, completed to `rank` columns."""
    g = torch.Generator().manual_seed(seed + j)
    pad_out = torch.randn(stack.d_out, rank, generator=g, dtype=torch.float64).to(stack.A)
    pad_in = torch.randn(stack.d_in, rank, generator=g, dtype=torch.float64).to(stack.A)
    r = min(int(stack.ranks[j]), rank)
    U = orthonormalize(torch.cat([stack.Bt[j, :r].T, pad_out[:, r:]], dim=1))
    V = orthonormalize(torch.cat([stack.A[j, :r].T, pad_in[:, r:]], dim=1))
    return U, V


def _kmeanspp_assignment(stack: LoraStack, rank: int, k: int, norms2: torch.Tensor, seed: int) -> torch.Tensor:
    """Greedy k-means++: each next seed is the best (lowest total error) of a few candidates drawn
    with probability proportional to the squared error under the seeds so far."""
    g = torch.Generator().manual_seed(seed)

    def errors_under(j: int) -> torch.Tensor:
        return relative(project_full(stack, *_seed_bases(stack, j, rank, seed))[1].cpu(), norms2)

    seeds = [int(torch.randint(stack.n, (1,), generator=g))]
    errors = [errors_under(seeds[0])]
    candidates = 2 + int(math.log(k))
    while len(seeds) < k:
        closest = torch.stack(errors).min(dim=0).values
        closest[seeds] = 0
        p = closest.pow(2)
        if p.sum() <= 0:  # everything reconstructed exactly: any unused adapter will do
            p = torch.ones_like(p)
            p[seeds] = 0
        drawn = torch.multinomial(p / p.sum(), min(candidates, int((p > 0).sum())), generator=g).tolist()
        tries = {j: errors_under(j) for j in drawn}
        best = min(drawn, key=lambda j: float(torch.minimum(closest, tries[j]).sum()))
        seeds.append(best)
        errors.append(tries[best])
    assignment = torch.stack(errors).argmin(dim=0)
    assignment[seeds] = torch.arange(k)
    return assignment


def _fill_empty(assignment: torch.Tensor, rel_err: torch.Tensor, k: int) -> list[int]:
    """Give every empty group the worst-reconstructed adapter of a group with >= 2 members; returns
    the groups that were refilled."""
    refilled = []
    for group in range(k):
        if (assignment == group).any():
            continue
        sizes = torch.bincount(assignment, minlength=k)
        movable = sizes[assignment] >= 2
        worst = int(torch.where(movable, rel_err, torch.full_like(rel_err, -1)).argmax())
        assignment[worst] = group
        refilled.append(group)
    return refilled


@threads_by_size
def fit_clusters(
    stack: LoraStack,
    rank: int,
    k: int,
    w: torch.Tensor,
    method: str = "full",
    tol: float = 1e-4,
    max_iter: int = 50,
    max_rounds: int = 20,
    seed: int = 0,
    assignment: torch.Tensor | None = None,
) -> ModuleFit:
    """Compress one module's adapters into k groups (k = 1: one shared pair of bases). With
    `assignment` (a group per adapter, e.g. from whole-adapter clustering) the groups are fitted
    as given, no adapter moves."""
    fit, project = METHODS[method]
    norms2, w = stack.norms2().cpu(), w.cpu()  # per-adapter bookkeeping on the CPU, fits on the stack's device
    if not 1 <= k <= stack.n:
        raise ValueError(f"clusters must be in 1..{stack.n} (the number of adapters), got {k}")
    fixed = assignment is not None
    if fixed:
        assignment = torch.as_tensor(assignment, dtype=torch.long).cpu()
    else:
        assignment = torch.zeros(stack.n, dtype=torch.long) if k == 1 else _kmeanspp_assignment(stack, rank, k, norms2, seed)
    inits: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * k
    history: list[float] = []

    def fit_groups() -> list[GroupFit]:
        groups = []
        for group in range(k):
            idx = torch.nonzero(assignment == group).flatten()
            groups.append(fit(stack.subset(idx), rank, w[idx], init=inits[group], tol=tol, max_iter=max_iter, seed=seed))
            inits[group] = (groups[-1].U, groups[-1].V)
        return groups

    for _ in range(max_rounds):
        groups = fit_groups()
        history.append(sum(float((w[assignment == g].double() * gf.err.cpu()).sum()) for g, gf in enumerate(groups)))
        if k == 1 or fixed:
            break
        err = torch.stack([project(stack, gf.U, gf.V)[1].cpu() for gf in groups], dim=1)  # (n, k)
        current = err.gather(1, assignment[:, None]).squeeze(1)
        best, choice = err.min(dim=1)
        moved = best < current * (1 - 1e-9)  # move only on a real improvement: no ping-pong on ties
        new = torch.where(moved, choice, assignment)
        for group in _fill_empty(new, relative(err.gather(1, new[:, None]).squeeze(1), norms2), k):
            inits[group] = None
        if torch.equal(new, assignment):
            break
        assignment = new
    else:  # rounds ran out while adapters still moved: fit the final groups
        groups = fit_groups()
    S = torch.zeros((stack.n,) + groups[0].S.shape[1:], dtype=stack.A.dtype, device=stack.A.device)
    err = torch.zeros(stack.n, dtype=torch.float64)
    for group, gf in enumerate(groups):
        idx = torch.nonzero(assignment == group).flatten()
        S[idx.to(S.device)], err[idx] = gf.S, gf.err.cpu()
    return ModuleFit(
        U=torch.stack([gf.U for gf in groups]),
        V=torch.stack([gf.V for gf in groups]),
        S=S,
        cluster_of=assignment,
        errors=relative(err, norms2),
        norms2=norms2,
        history=history if k > 1 else groups[0].history,
        iterations=sum(gf.iterations for gf in groups),
    )


def adjusted_rand_index(a: list[int] | torch.Tensor, b: list[int] | torch.Tensor) -> float:
    """Hubert and Arabie's adjusted Rand index of two labelings, from their contingency table."""
    a, b = torch.as_tensor(a).long(), torch.as_tensor(b).long()
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError("labelings must be 1-D and of equal length")
    _, a = torch.unique(a, return_inverse=True)
    _, b = torch.unique(b, return_inverse=True)
    table = torch.zeros(int(a.max()) + 1, int(b.max()) + 1, dtype=torch.float64)
    table.index_put_((a, b), torch.ones_like(a, dtype=torch.float64), accumulate=True)

    def pairs(x: torch.Tensor) -> float:
        return float((x * (x - 1) / 2).sum())

    index, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), pairs(torch.tensor(float(a.numel())))
    expected = rows * cols / total if total else 0.0
    maximum = (rows + cols) / 2
    return 1.0 if maximum == expected else (index - expected) / (maximum - expected)
