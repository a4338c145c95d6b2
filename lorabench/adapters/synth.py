"""Synthetic adapter collections with known structure, written in PEFT format.

Adapter i belongs to cluster c(i) and has rank r_i. On every module its delta is

    scaling * B_i A_i = t_i * normalize( Ub_c X_i Y_i Vb_c^T  +  Gb_i Ga_i  +  noise )

- Ub_c (d_out x m), Vb_c (d_in x m): the cluster's shared subspaces (orthonormal, m = shared_dim),
- X_i Y_i: round(shared * r_i) rank-one terms inside them; Gb_i Ga_i: the other ranks, the
  adapter's own random directions; the two parts carry energy in proportion to their ranks,
- noise: i.i.d. Gaussian added to every entry of A and B, relative to their typical entry,
- t_i = exp(norm_spread * z_i), z_i ~ N(0, 1): the spread of adapter norms.

With shared = 1 and noise = 0 a cluster lies exactly in span(Ub_c) (x) span(Vb_c), so
compressing each cluster at rank m recovers it exactly. Everything is a function of the seed;
adapter i does not depend on how many adapters are generated.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lorabench.adapters.peft import write_adapter
from lorabench.adapters.types import AdapterConfig, ModuleKey
from lorabench.errors import LorabenchError
from lorabench.outputs.results import atomic_dir
from lorabench.presets import ALL_LINEAR, ATTENTION_MODULES, model_preset

SYNTH_FILE = "synth.json"
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class SynthSpec:
    n: int
    model: str = "tiny"
    ranks: tuple[int, ...] = (16,)  # adapter i's rank is drawn from these
    clusters: int = 1
    shared: float = 0.75  # fraction of each adapter's rank inside its cluster's shared subspace
    shared_dim: int | None = None  # m, dimension of a cluster's subspaces (default: the largest rank)
    noise: float = 0.0
    norm_spread: float = 0.5
    modules: tuple[str, ...] = ATTENTION_MODULES
    layers: int | None = None  # adapt the first `layers` layers (default: all of the model's)
    alpha_per_rank: float = 2.0  # lora_alpha = alpha_per_rank * r
    rslora: bool = False
    dtype: str = "float32"
    seed: int = 0
    m: int = field(init=False)

    def __post_init__(self) -> None:
        preset = model_preset(self.model)
        checks = [
            (self.n >= 1, "--n must be >= 1"),
            (len(self.ranks) > 0 and all(r >= 1 for r in self.ranks), "--rank values must be >= 1"),
            (1 <= self.clusters <= self.n, "--clusters must be between 1 and --n"),
            (0.0 <= self.shared <= 1.0, "--shared must be in [0, 1]"),
            (self.noise >= 0 and self.norm_spread >= 0, "--noise and --norm-spread must be >= 0"),
            (self.layers is None or 1 <= self.layers <= preset.layers, f"--layers must be in 1..{preset.layers}"),
            (self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise LorabenchError(message)
        for module in self.modules:
            preset.module_shape(module)  # raises for unknown module names
        m = self.shared_dim if self.shared_dim is not None else max(self.ranks)
        if m < 1:
            raise LorabenchError("--shared-dim must be >= 1")
        object.__setattr__(self, "m", m)

    @property
    def module_keys(self) -> list[ModuleKey]:
        layers = self.layers if self.layers is not None else model_preset(self.model).layers
        return [ModuleKey(layer, module) for layer in range(layers) for module in self.modules]


def _generator(*ints: int) -> torch.Generator:
    seed = int(np.random.SeedSequence([int(i) for i in ints]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


def planted_clusters(spec: SynthSpec) -> list[int]:
    """Cluster of each adapter: every cluster gets at least one adapter, the rest at random."""
    g = _generator(spec.seed, 1)
    labels = torch.cat([torch.arange(spec.clusters), torch.randint(spec.clusters, (spec.n - spec.clusters,), generator=g)])
    return labels[torch.randperm(spec.n, generator=g)].tolist()


def planted_ranks(spec: SynthSpec) -> list[int]:
    g = _generator(spec.seed, 2)
    choice = torch.randint(len(spec.ranks), (spec.n,), generator=g)
    return [spec.ranks[int(c)] for c in choice]


@lru_cache(maxsize=1024)
def _cluster_bases(seed: int, d_in: int, d_out: int, m: int, layer: int, module: str, cluster: int):
    g = _generator(seed, 3, layer, ALL_LINEAR.index(module), cluster)
    Ub = torch.linalg.qr(torch.randn(d_out, m, generator=g, dtype=torch.float64))[0]
    Vb = torch.linalg.qr(torch.randn(d_in, m, generator=g, dtype=torch.float64))[0]
    return Ub.float(), Vb.float()  # cached for every adapter: float32 halves the cache


def synth_adapter(spec: SynthSpec, i: int, cluster: int, rank: int) -> tuple[AdapterConfig, dict]:
    """Config and {module: (A, B)} of adapter i (see the module docstring for the structure)."""
    preset = model_preset(spec.model)
    config = AdapterConfig(
        r=rank,
        lora_alpha=spec.alpha_per_rank * rank,
        target_modules=tuple(spec.modules),
        use_rslora=spec.rslora,
        base_model_name_or_path=f"lorabench/{spec.model}-random",
    )
    g = _generator(spec.seed, 4, i)
    target_norm = math.exp(spec.norm_spread * float(torch.randn((), generator=g, dtype=torch.float64)))
    r_shared = min(round(spec.shared * rank), spec.m)
    r_own = rank - r_shared
    factors = {}
    for key in spec.module_keys:
        d_in, d_out = preset.module_shape(key.module)
        Ub, Vb = (b.double() for b in _cluster_bases(spec.seed, d_in, d_out, spec.m, key.layer, key.module, cluster))
        X = torch.randn(spec.m, r_shared, generator=g, dtype=torch.float64) / math.sqrt(spec.m)
        Y = torch.randn(r_shared, spec.m, generator=g, dtype=torch.float64) / math.sqrt(spec.m)
        Gb = torch.randn(d_out, r_own, generator=g, dtype=torch.float64) / math.sqrt(d_out)
        Ga = torch.randn(r_own, d_in, generator=g, dtype=torch.float64) / math.sqrt(d_in)
        B = torch.cat([Ub @ X, Gb], dim=1)
        A = torch.cat([Y @ Vb.T, Ga], dim=0)
        if spec.noise:
            B += spec.noise * torch.randn(B.shape, generator=g, dtype=torch.float64) / math.sqrt(d_out)
            A += spec.noise * torch.randn(A.shape, generator=g, dtype=torch.float64) / math.sqrt(d_in)
        scaling = config.scaling(key)
        norm = scaling * math.sqrt(float(((B.T @ B) * (A @ A.T)).sum()))
        B *= target_norm / max(norm, 1e-30)
        dtype = getattr(torch, spec.dtype)
        factors[key] = (A.to(dtype), B.to(dtype))
    return config, factors


def write_synth_collection(spec: SynthSpec, out: str | Path, progress: bool = True) -> Path:
    """Write `spec.n` adapters as PEFT folders adapter_0000, ... under `out`, plus synth.json
    (the spec and the planted cluster and rank of every adapter)."""
    clusters, ranks = planted_clusters(spec), planted_ranks(spec)
    width = max(4, len(str(spec.n - 1)))
    with atomic_dir(out) as tmp:
        # disable=None: tqdm draws bars only on a terminal, so a log gets no cursor codes
        for i in tqdm(range(spec.n), desc="adapters", unit="adapter", disable=not progress or None):
            config, factors = synth_adapter(spec, i, clusters[i], ranks[i])
            write_adapter(tmp / f"adapter_{i:0{width}d}", config, factors)
        meta = {k: v for k, v in asdict(spec).items() if k != "m"}
        meta.update(shared_dim=spec.m, clusters_of_adapters=clusters, ranks_of_adapters=ranks)
        (tmp / SYNTH_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return Path(out)
