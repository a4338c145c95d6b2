"""The compressed collection on disk, loaded back, and what it can do.

A folder:
    metadata.json              method, rank, dtype, adapters (names, sha256 of their files, configs),
                               modules (shapes, clusters, errors, bytes), totals
    modules/<module>.safetensors   for module 'layers.3.q_proj':
        U (K, d_out, R)  V (K, d_in, R)  S (n, R, R) full or (n, R) diagonal  cluster_of (n,) int64
    summary.json, errors.csv   (see report.py)

Scaling is folded in: S_i carries adapter i's LoRA scaling (alpha/r, or alpha/sqrt(r) with rsLoRA),
so adapter i's delta on a module is exactly U_k S_i V_k^T with k = cluster_of[i] -- what
`kernels.reference.compressed_lora` computes, with no separate scales. Rebuilt factors are
B' = U_k S_i (d_out x R) and A' = V_k^T (R x d_in), exported with lora_alpha = r = R (scaling 1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from lorabench.adapters.peft import read_adapter, write_adapter
from lorabench.adapters.types import AdapterConfig, LoraStack, ModuleKey
from lorabench.compress.clusters import METHODS
from lorabench.compress.fit import one_thread, relative
from lorabench.errors import LorabenchError

METADATA_FILE = "metadata.json"
MODULES_DIR = "modules"
FORMAT = "lorabench-compressed-collection"
VERSION = 1


@dataclass(frozen=True)
class CompressedModule:
    """One module of a compressed collection (see the module docstring for shapes)."""

    U: torch.Tensor
    V: torch.Tensor
    S: torch.Tensor
    cluster_of: torch.Tensor

    @property
    def diagonal(self) -> bool:
        return self.S.dim() == 2

    def delta_factors(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A' = V_k^T (R, d_in), B' = U_k S_i (d_out, R)) of adapter i; B' A' is its scaled delta."""
        k = int(self.cluster_of[i])
        U, S = self.U[k].float(), self.S[i].float()
        B = U * S if self.diagonal else U @ S
        return self.V[k].T.contiguous(), B


@dataclass
class AdapterFit:
    """A new adapter fitted onto a collection's bases: per module its core, cluster and error."""

    name: str
    config: AdapterConfig
    ranks: dict[ModuleKey, int]
    S: dict[ModuleKey, torch.Tensor]
    cluster: dict[ModuleKey, int]
    errors: dict[ModuleKey, float]
    norms2: dict[ModuleKey, float]


class CompressedCollection:
    """A compressed collection folder, read lazily (one module's tensors at a time)."""

    def __init__(self, root: Path, metadata: dict):
        self.root = root
        self.metadata = metadata

    @classmethod
    def load(cls, root: str | Path) -> "CompressedCollection":
        root = Path(root)
        path = root / METADATA_FILE
        if not path.is_file():
            raise LorabenchError(f"{root}: not a compressed collection (no {METADATA_FILE})")
        try:
            metadata = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise LorabenchError(f"{path}: malformed JSON ({err})") from None
        if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
            raise LorabenchError(f"{path}: field 'format'/'version' is not {FORMAT} version {VERSION}")
        return cls(root, metadata)

    @property
    def method(self) -> str:
        return self.metadata["method"]

    @property
    def rank(self) -> int:
        return int(self.metadata["rank"])

    @property
    def adapter_names(self) -> list[str]:
        return [a["name"] for a in self.metadata["adapters"]]

    @property
    def modules(self) -> list[ModuleKey]:
        return [ModuleKey.parse(m["name"]) for m in self.metadata["modules"]]

    def __len__(self) -> int:
        return len(self.metadata["adapters"])

    def index(self, adapter: int | str) -> int:
        if isinstance(adapter, int):
            if not 0 <= adapter < len(self):
                raise LorabenchError(f"adapter index {adapter} out of range 0..{len(self) - 1}")
            return adapter
        try:
            return self.adapter_names.index(adapter)
        except ValueError:
            raise LorabenchError(f"{self.root}: no adapter named {adapter!r}") from None

    def module(self, key: ModuleKey) -> CompressedModule:
        path = self.root / MODULES_DIR / f"{key.name}.safetensors"
        if not path.is_file():
            raise LorabenchError(f"{self.root}: missing {path.relative_to(self.root)}")
        with safe_open(str(path), framework="pt") as f:
            return CompressedModule(*(f.get_tensor(t) for t in ("U", "V", "S", "cluster_of")))

    def adapter_config(self, adapter: int | str) -> AdapterConfig:
        """The PEFT config of a rebuilt adapter: rank R, lora_alpha R (scaling 1: S_i holds it)."""
        source = self.metadata["adapters"][self.index(adapter)]
        rank = max(m["rank"] for m in self.metadata["modules"])
        return AdapterConfig(
            r=rank,
            lora_alpha=rank,
            target_modules=tuple(self.metadata["target_modules"]),
            base_model_name_or_path=source.get("base_model_name_or_path"),
        )

    def factors(self, adapter: int | str, modules: dict | None = None) -> dict[ModuleKey, tuple[torch.Tensor, torch.Tensor]]:
        """Every module's rebuilt (A', B') of one adapter, zero-padded to one rank, in the stored dtype.
        `modules`: every module already read (by a caller rebuilding many adapters); default: read each."""
        i = self.index(adapter)
        rank = self.adapter_config(i).r
        dtype = getattr(torch, self.metadata["dtype"])
        out = {}
        for key in self.modules:
            A, B = (self.module(key) if modules is None else modules[key]).delta_factors(i)
            pad = rank - A.shape[0]
            out[key] = (
                torch.nn.functional.pad(A, (0, 0, 0, pad)).to(dtype),
                torch.nn.functional.pad(B, (0, pad)).to(dtype),
            )
        return out

    def export_peft(self, adapter: int | str, out: str | Path) -> Path:
        """Write one adapter, as the compression reconstructs it, as a PEFT adapter folder."""
        return write_adapter(out, self.adapter_config(adapter), self.factors(adapter))

    def fit_adapter(self, folder: str | Path, compute_dtype: torch.dtype = torch.float32) -> AdapterFit:
        """Fit a new PEFT adapter onto the existing bases (no recompression): on every module, the
        best core on each cluster's bases, keeping the cluster that reconstructs it best."""
        if self.method not in METHODS:
            raise LorabenchError(f"{self.root}: method {self.method!r} has no shared bases to fit new adapters onto")
        folder = Path(folder)
        config, factors = read_adapter(folder)
        if set(factors) != set(self.modules):
            missing = sorted(set(self.modules) - set(factors))
            key = (missing or sorted(set(factors) - set(self.modules)))[0]
            raise LorabenchError(
                f"adapter {folder}: module {key.name} is {'missing' if missing else 'not in the compressed collection'}"
            )
        fit = AdapterFit(folder.name, config, {k: A.shape[0] for k, (A, _) in factors.items()}, {}, {}, {}, {})
        with one_thread():  # one adapter: tiny products
            for key in self.modules:
                self._fit_module(fit, key, *factors[key], config.scaling(key), folder, compute_dtype)
        return fit

    def _fit_module(self, fit: AdapterFit, key: ModuleKey, A, B, scaling: float, folder: Path, compute_dtype) -> None:
        d_in, d_out = next((m["d_in"], m["d_out"]) for m in self.metadata["modules"] if m["name"] == key.name)
        if (A.shape[1], B.shape[0]) != (d_in, d_out):
            raise LorabenchError(
                f"adapter {folder}: module {key.name} is ({B.shape[0]} x {A.shape[1]}), the collection's is "
                f"({d_out} x {d_in})"
            )
        project = METHODS[self.method][1]
        stack = LoraStack.from_factors([A], [B], [scaling], dtype=compute_dtype)
        mod = self.module(key)
        tries = [project(stack, mod.U[k].to(compute_dtype), mod.V[k].to(compute_dtype)) for k in range(mod.U.shape[0])]
        k = min(range(len(tries)), key=lambda c: float(tries[c][1][0]))
        norms2 = stack.norms2()
        fit.S[key], fit.cluster[key] = tries[k][0][0], k
        fit.errors[key] = float(relative(tries[k][1], norms2)[0])
        fit.norms2[key] = float(norms2[0])
