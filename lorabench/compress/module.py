"""Compress one module's adapters as a `CompressConfig` says: method, rank, clusters (or auto)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorabench.adapters.types import LoraStack
from lorabench.compress.clusters import METHODS, fit_clusters
from lorabench.compress.fit import ModuleFit, resolve_weights
from lorabench.compress.svd import fit_svd
from lorabench.errors import LorabenchError


@dataclass(frozen=True)
class CompressConfig:
    """How to compress. clusters: a count, or "auto" (smallest count whose mean relative error is at
    most target_error, within max_bytes of GPU memory per module if given)."""

    rank: int
    method: str = "full"  # full | diagonal | svd
    clusters: int | str = 1
    target_error: float = 0.6
    normalize: bool = False
    tol: float = 1e-4  # stop when an iteration lowers the total error by less than this fraction
    max_iter: int = 50
    max_rounds: int = 20
    seed: int = 0
    cluster_by: str = "module"  # module: each module clusters its adapters; adapter: one group per adapter

    def __post_init__(self) -> None:
        if self.method not in (*METHODS, "svd"):
            raise LorabenchError(f"--method must be one of full, diagonal, svd; got {self.method!r}")
        if self.rank < 1:
            raise LorabenchError(f"--rank must be >= 1, got {self.rank}")
        if self.clusters != "auto" and (not isinstance(self.clusters, int) or self.clusters < 1):
            raise LorabenchError(f"--clusters must be a positive integer or 'auto', got {self.clusters!r}")
        if self.method == "svd" and self.clusters != 1:
            raise LorabenchError("--method svd compresses each adapter alone; it takes no --clusters")
        if self.cluster_by not in ("module", "adapter"):
            raise LorabenchError(f"--cluster-by must be module or adapter, got {self.cluster_by!r}")
        if self.cluster_by == "adapter" and (self.clusters == "auto" or self.method == "svd"):
            raise LorabenchError("--cluster-by adapter takes a number of --clusters and method full or diagonal")
        if not 0 < self.target_error <= 1:
            raise LorabenchError(f"--target-error must be in (0, 1], got {self.target_error}")
        if not 0 <= self.tol < 1:
            raise LorabenchError(f"--tol must be a fraction in [0, 1), got {self.tol}")
        if self.max_iter < 1:
            raise LorabenchError(f"--max-iter must be >= 1, got {self.max_iter}")
        if self.seed < 0:
            raise LorabenchError(f"--seed must be an integer >= 0, got {self.seed}")

    def core_numbers(self) -> int:
        """Numbers per adapter core: R x R (full) or R (diagonal, svd)."""
        return self.rank * self.rank if self.method == "full" else self.rank


def _max_clusters(stack: LoraStack, config: CompressConfig, max_bytes: int | None, element_size: int) -> int:
    if max_bytes is None:
        return stack.n
    per_cluster = (stack.d_in + stack.d_out) * config.rank * element_size
    cores = stack.n * config.core_numbers() * element_size
    k = (max_bytes - cores) // per_cluster
    if k < 1:
        raise LorabenchError(
            f"--memory-budget too small: one cluster of this {stack.d_out} x {stack.d_in} module needs "
            f"{(per_cluster + cores) / 2**20:.2f} MiB, its share of the budget is {max_bytes / 2**20:.2f} MiB"
        )
    return int(min(k, stack.n))


def check_sizes(stack: LoraStack, rank: int, clusters: int | str) -> None:
    """The rank fits the module and the clusters (unless "auto") fit the adapters."""
    if rank > min(stack.d_in, stack.d_out):
        raise LorabenchError(f"--rank {rank} exceeds the module's size {stack.d_out} x {stack.d_in}")
    if clusters != "auto" and clusters > stack.n:
        raise LorabenchError(f"--clusters {clusters} exceeds the {stack.n} adapters")


def compress_module(
    stack: LoraStack,
    config: CompressConfig,
    weights: torch.Tensor | None = None,
    max_bytes: int | None = None,
    element_size: int = 4,
    assignment: torch.Tensor | None = None,
) -> ModuleFit:
    """Compress one module. With clusters="auto": K = 1, 2, 4, ... until the mean relative error
    meets config.target_error (or K reaches its memory cap), then bisection for the smallest such K.
    `assignment`: the adapters' groups, fixed (whole-adapter clustering, `cluster_adapters`)."""
    check_sizes(stack, config.rank, config.clusters)
    if config.method == "svd":
        return fit_svd(stack, config.rank)
    w = resolve_weights(stack.norms2(), weights, config.normalize)

    def run(k: int) -> ModuleFit:
        return fit_clusters(
            stack, config.rank, k, w, method=config.method, tol=config.tol, max_iter=config.max_iter,
            max_rounds=config.max_rounds, seed=config.seed, assignment=assignment,
        )

    if config.clusters != "auto":
        return run(int(config.clusters))
    cap = _max_clusters(stack, config, max_bytes, element_size)
    fits: dict[int, ModuleFit] = {}

    def meets(k: int) -> bool:
        fits[k] = fits.get(k) or run(k)
        return fits[k].mean_error <= config.target_error

    k, failed = 1, 0
    while not meets(k):
        if k == cap:
            return fits[k]  # the target cannot be met within the cap: the best allowed
        failed, k = k, min(2 * k, cap)
    while k - failed > 1:  # smallest meeting K lies in (failed, k]
        mid = (failed + k) // 2
        failed, k = (failed, mid) if meets(mid) else (mid, k)
    return fits[k]
