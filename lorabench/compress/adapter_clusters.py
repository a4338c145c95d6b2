"""Whole-adapter clusters: one group per adapter across all its modules (`--cluster-by adapter`).

Clustering each module on its own asks one module's delta which adapters belong together; on
trained adapters that evidence is weak (two adapters of the same task family start from different
random A and share only part of their deltas), and modules disagree. Here every module's evidence
is pooled, as "Compress then Serve" clusters whole LoRAs:

1. *Distances*: per module, the cosine similarity of every pair of deltas <B_i A_i, B_j A_j> /
   (||B_i A_i|| ||B_j A_j||) (from r x r Gram blocks of the factors, no d_out x d_in matrix),
   standardized over the module's pairs (z-score: modules with large or small typical similarity
   count alike), averaged over modules.
   The same for the share of each delta's energy inside the other adapter's column and row
   spaces (`subspace`: what one shared pair of bases could keep of both). The cosine sees trained
   adapters' shared updates (their subspaces differ: each keeps its random start A_i); the
   subspace share sees planted shared subspaces with unrelated cores (their cosines are near 0).
2. *Initialization and restarts*: spectral clustering of each similarity and of their sum (the
   positive part as affinity, the K leading eigenvectors of the normalized affinity, rows scaled to
   unit length), then k-means on those rows with 10 k-means++ starts, keeping the lowest
   within-cluster sum of squares. The start is the grouping of the similarity with the largest
   eigengap lambda_K - lambda_K+1 (the one that shows K groups most clearly). The compression
   objective does not choose: on trained adapters it can prefer a grouping that matches behaviour
   less well than the cosine's (tried on the quality study's adapters).
3. *Refinement*: k-means-like rounds on the compression objective, pooled: fit every group's bases
   on every module (warm-started), then move each adapter to the group with the lowest sum over
   modules of its relative reconstruction error, until no adapter moves.

Cost: step 1 is O(n^2 r^2 d) per module (all pairs of adapters), the rest as many fits as rounds.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from lorabench.adapters.types import LoraStack
from lorabench.compress.clusters import METHODS
from lorabench.compress.fit import one_thread, relative
from lorabench.compress.module import check_sizes

StackLoader = Callable[[object], LoraStack]


def delta_cosines(stack: LoraStack) -> torch.Tensor:
    """(n, n) float64 cosine similarity of the adapters' deltas B_i A_i on one module."""
    A, Bt = stack.A.double(), stack.Bt.double()
    n, r = A.shape[:2]
    gram_a = (A.reshape(n * r, -1) @ A.reshape(n * r, -1).T).view(n, r, n, r)  # A_i A_j^T blocks
    gram_b = (Bt.reshape(n * r, -1) @ Bt.reshape(n * r, -1).T).view(n, r, n, r)
    inner = (gram_a * gram_b).sum(dim=(1, 3))  # <B_i A_i, B_j A_j> = sum (B_i^T B_j) o (A_i A_j^T)
    norms = inner.diagonal().clamp_min(0).sqrt()
    scale = norms[:, None] * norms[None, :]
    return torch.where(scale > 0, inner / scale.clamp_min(1e-300), torch.zeros_like(inner)).cpu()


def subspace_captures(stack: LoraStack) -> torch.Tensor:
    """(n, n) float64: the share of B_i A_i's energy inside adapter j's own column and row spaces,
    ||Qb_j^T B_i A_i Qa_j||^2 / ||B_i A_i||^2, averaged with its transpose (what one shared pair of
    bases for i and j could keep)."""
    A, Bt = stack.A.double(), stack.Bt.double()
    n, r = A.shape[:2]
    with one_thread():
        Qb = torch.linalg.qr(Bt.transpose(1, 2))[0]  # (n, d_out, r) orthonormal columns spanning B_j's
        Qa = torch.linalg.qr(A.transpose(1, 2))[0]  # (n, d_in, r) spanning A_j's rows
    bq = (Bt.reshape(n * r, -1) @ Qb.transpose(0, 1).reshape(Qb.shape[1], -1)).view(n, r, n, r)  # B_i^T Qb_j
    aq = (A.reshape(n * r, -1) @ Qa.transpose(0, 1).reshape(Qa.shape[1], -1)).view(n, r, n, r)  # A_i Qa_j
    captured = torch.einsum("iajb,iajc->ijbc", bq, aq).pow(2).sum(dim=(2, 3))
    share = relative(captured, stack.norms2().double()[:, None].expand(n, n))
    return ((share + share.T) / 2).cpu()


def standardized(sim: torch.Tensor) -> torch.Tensor:
    """sim minus the mean of its off-diagonal entries, over their standard deviation (0 if constant)."""
    n = sim.shape[0]
    off = sim[~torch.eye(n, dtype=torch.bool)]
    if off.numel() < 2 or float(off.std()) == 0:
        return torch.zeros_like(sim)
    return (sim - off.mean()) / off.std()


SIMILARITIES = {"cosine": delta_cosines, "subspace": subspace_captures}


def pooled_similarities(stacks: Iterable[LoraStack]) -> dict[str, torch.Tensor]:
    """Per kind of similarity, its mean over modules after standardizing each module's: (n, n) float64."""
    totals, count = {}, 0
    for stack in stacks:
        for name, similarity in SIMILARITIES.items():
            z = standardized(similarity(stack))
            totals[name] = z if name not in totals else totals[name] + z
        count += 1
    return {name: total / count for name, total in totals.items()}


def _kmeans(points: torch.Tensor, k: int, restarts: int, g: torch.Generator, max_iter: int = 100) -> torch.Tensor:
    """Lloyd's k-means with k-means++ starts; the labels of the start with the lowest inertia."""
    best, best_cost = None, float("inf")
    n = points.shape[0]
    for _ in range(restarts):
        centers = points[torch.randint(n, (1,), generator=g)]
        while centers.shape[0] < k:
            d2 = torch.cdist(points, centers).min(dim=1).values.pow(2)
            p = d2 / d2.sum() if float(d2.sum()) > 0 else torch.ones(n, dtype=points.dtype) / n
            centers = torch.cat([centers, points[torch.multinomial(p, 1, generator=g)]])
        for _ in range(max_iter):
            labels = torch.cdist(points, centers).argmin(dim=1)
            moved = torch.stack([points[labels == j].mean(0) if (labels == j).any() else centers[j] for j in range(k)])
            if torch.allclose(moved, centers):
                break
            centers = moved
        cost = float((points - centers[labels]).pow(2).sum())
        if cost < best_cost:
            best, best_cost = labels, cost
    return best


def spectral_assignment(sim: torch.Tensor, k: int, seed: int = 0, restarts: int = 10) -> tuple[torch.Tensor, float]:
    """K groups of a similarity matrix by normalized spectral clustering (Ng, Jordan and Weiss), and
    the eigengap lambda_K - lambda_K+1 of the normalized affinity: how clearly it shows K groups."""
    n = sim.shape[0]
    W = sim.double().clamp_min(0) * (1 - torch.eye(n, dtype=torch.float64))
    W = W + 1e-12 * (1 - torch.eye(n, dtype=torch.float64))  # no adapter without a neighbour
    d = W.sum(1).rsqrt()
    with one_thread():
        values, vectors = torch.linalg.eigh(d[:, None] * W * d[None, :])  # ascending
    rows = vectors[:, -k:]
    rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-300)
    gap = float(values[-k] - values[-k - 1]) if k < n else 0.0
    return _kmeans(rows, k, restarts, torch.Generator().manual_seed(seed)), gap


def refine(load: StackLoader, keys: list, assignment: torch.Tensor, k: int, fit_group, project,
           weights: Callable[[LoraStack], torch.Tensor], max_rounds: int) -> torch.Tensor:
    """k-means-like rounds on the pooled objective: fit each group per module (warm-started), move
    every adapter to the group with the lowest sum over modules of its relative error."""
    inits: dict = {}
    for _ in range(max_rounds):
        cost = torch.zeros(assignment.shape[0], k, dtype=torch.float64)
        for key in keys:
            stack = load(key)
            w, norms2 = weights(stack).cpu(), stack.norms2().cpu()
            for group in range(k):
                idx = torch.nonzero(assignment == group).flatten()
                fit = fit_group(stack.subset(idx), w[idx], inits.get((key, group)))
                inits[(key, group)] = (fit.U, fit.V)
                cost[:, group] += relative(project(stack, fit.U, fit.V)[1].cpu(), norms2)
        current = cost.gather(1, assignment[:, None]).squeeze(1)
        best, choice = cost.min(dim=1)
        new = torch.where(best < current * (1 - 1e-9), choice, assignment)  # move only on a real improvement
        if torch.bincount(new, minlength=k).min() == 0 or torch.equal(new, assignment):
            break  # a group would empty: keep the last assignment that had every group
        assignment = new
    return assignment


def cluster_adapters(load: StackLoader, keys: list, rank: int, k: int, method: str, weights: Callable[[LoraStack], torch.Tensor],
                     tol: float = 1e-4, max_iter: int = 50, max_rounds: int = 20, seed: int = 0) -> torch.Tensor:
    """One group in 0..k-1 per adapter from every module of `keys` (`load(key)` gives its stack)."""
    fit, project = METHODS[method]

    def checked(key) -> LoraStack:  # the checks compress_module makes, before any work
        stack = load(key)
        check_sizes(stack, rank, k)
        return stack

    n = checked(keys[0]).n
    if k == 1:
        return torch.zeros(n, dtype=torch.long)
    sims = pooled_similarities(checked(key) for key in keys)
    sims["both"] = sum(sims.values())
    # The similarity that shows K groups most clearly (largest eigengap) gives the start.
    start, _ = max((spectral_assignment(sim, k, seed) for sim in sims.values()), key=lambda found: found[1])
    if torch.bincount(start, minlength=k).min() == 0:  # degenerate similarity: one group per k-th adapter
        start = torch.arange(n) % k

    def fit_group(stack: LoraStack, w: torch.Tensor, init):
        return fit(stack, rank, w, init=init, tol=tol, max_iter=max_iter, seed=seed)
    return refine(load, keys, start, k, fit_group, project, weights, max_rounds)
