"""Host-side adapter weights in the layout the model's LoRA states load from.

`AdapterWeights`: one LoRA adapter, per target module A (layers, r, d_in) and B (layers, d_out, r).
`CompressedWeights`: a jointly compressed collection, per module shared bases U (layers, K, d_out, R)
and V (layers, K, d_in, R) per cluster, and every adapter's S_i (layers, N, R, R) or, diagonal,
(layers, N, R), scale folded in; `cluster_of` (N,). Random ones have the real shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorabench.presets import DEFAULT_TARGET_MODULES, ModelShape, target_modules  # noqa: F401 (target_modules: re-exported)
from lorabench.errors import LorabenchError


@dataclass
class AdapterWeights:
    rank: int
    scale: float
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (A, B)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.modules.values())

    def pin(self) -> "AdapterWeights":
        """Page-locked copies, so host->device copies run at link speed and can be asynchronous."""
        return AdapterWeights(self.rank, self.scale, {m: (a.pin_memory(), b.pin_memory()) for m, (a, b) in self.modules.items()})


@dataclass
class CompressedWeights:
    rank: int  # shared rank R
    # name -> (U, V, S, cluster_of (layers, N) int64): clusters may differ per layer and module
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]

    @property
    def num_adapters(self) -> int:
        return next(iter(self.modules.values()))[3].shape[1]

    @property
    def diagonal(self) -> bool:
        return next(iter(self.modules.values()))[2].dim() == 3


def random_adapter(
    shape: ModelShape, rank: int, modules=DEFAULT_TARGET_MODULES, seed: int = 0, dtype=torch.float32, alpha: float | None = None
) -> AdapterWeights:
    """A rank-`rank` adapter with A and B both random (a trained adapter's B is not zero), sized so
    the delta is about half the size of the layer's own output; scale = alpha / rank (alpha
    defaults to rank / 2)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in modules:
        d_in, d_out = shape.module_shape(m)
        A = torch.randn(shape.layers, rank, d_in, generator=g) / d_in**0.5
        B = torch.randn(shape.layers, d_out, rank, generator=g) / rank**0.5
        out[m] = (A.to(dtype), B.to(dtype))
    return AdapterWeights(rank, (alpha if alpha is not None else rank / 2) / rank, out)


def random_compressed(
    shape: ModelShape, n_adapters: int, rank: int, clusters: int = 1, modules=DEFAULT_TARGET_MODULES,
    diagonal: bool = False, seed: int = 0, dtype=torch.float32, cluster_of=None,
) -> CompressedWeights:
    """Random U, V per cluster (columns of unit length; R may exceed a small test shape's width) and
    random S_i; adapter i in cluster cluster_of[i] (default: round-robin over `clusters`), the same
    in every layer and module."""
    cluster_of = torch.arange(n_adapters) % clusters if cluster_of is None else torch.as_tensor(cluster_of).long()
    if cluster_of.shape != (n_adapters,) or (n_adapters and int(cluster_of.min()) < 0):
        raise LorabenchError(f"compressed: cluster_of must give a cluster >= 0 to each of {n_adapters} adapters")
    clusters = int(cluster_of.max()) + 1 if n_adapters else 1
    if rank < 1:
        raise LorabenchError(f"compressed rank must be >= 1, got {rank}")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in modules:
        d_in, d_out = shape.module_shape(m)
        U = torch.randn(shape.layers, clusters, d_out, rank, generator=g) / d_out**0.5
        V = torch.randn(shape.layers, clusters, d_in, rank, generator=g) / d_in**0.5
        s_shape = (shape.layers, n_adapters, rank) if diagonal else (shape.layers, n_adapters, rank, rank)
        S = torch.randn(*s_shape, generator=g) * (0.1 if diagonal else 0.1 / rank**0.5)
        out[m] = (U.to(dtype), V.to(dtype), S.to(dtype), cluster_of.expand(shape.layers, n_adapters).clone())
    return CompressedWeights(rank, out)
