"""The types an adapter collection is made of: module keys, adapter configs, stacked factors.

An adapter's delta on module m is  scaling * B A  with A: (r, d_in) and B: (d_out, r), where
scaling = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA (PEFT's definitions).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from lorabench.errors import LorabenchError
from lorabench.presets import ATTENTION_MODULES, MLP_MODULES


@dataclass(frozen=True, order=True)
class ModuleKey:
    """One adapted linear module of the base model: (layer index, module short name)."""

    layer: int
    module: str

    @property
    def name(self) -> str:
        """The module path inside the decoder, e.g. 'layers.3.q_proj' (used as a tensor-name prefix)."""
        return f"layers.{self.layer}.{self.module}"

    @property
    def hf_path(self) -> str:
        """The module's path in a Hugging Face Llama/Mistral model, e.g. 'model.layers.3.self_attn.q_proj'."""
        block = "self_attn" if self.module in ATTENTION_MODULES else "mlp"
        return f"model.layers.{self.layer}.{block}.{self.module}"

    @classmethod
    def parse(cls, name: str) -> "ModuleKey":
        m = re.fullmatch(r"layers\.(\d+)\.(\w+)", name)
        if not m or m.group(2) not in ATTENTION_MODULES + MLP_MODULES:
            raise LorabenchError(f"not a module name: {name!r} (expected 'layers.<i>.<module>')")
        return cls(int(m.group(1)), m.group(2))


def _pattern_value(patterns: dict[str, Any], key: ModuleKey, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern: a pattern matches a module whose path ends with it."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{pattern}", key.hf_path):
            return value
    return default


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of a PEFT `adapter_config.json` that lorabench reads; others are kept in `extra`."""

    r: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool = False
    base_model_name_or_path: str | None = None
    task_type: str = "CAUSAL_LM"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def rank(self, key: ModuleKey) -> int:
        return int(_pattern_value(self.rank_pattern, key, self.r))

    def scaling(self, key: ModuleKey) -> float:
        """The factor PEFT multiplies B A by on this module."""
        r = self.rank(key)
        alpha = float(_pattern_value(self.alpha_pattern, key, self.lora_alpha))
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_json(self) -> dict[str, Any]:
        """A complete PEFT LoraConfig dict (defaults for what PEFT expects, then the kept extras)."""
        out: dict[str, Any] = {
            "peft_type": "LORA",
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": 0.0,
            "target_modules": list(self.target_modules),
            "bias": "none",
            "use_rslora": self.use_rslora,
            "use_dora": False,
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "revision": None,
        }
        out.update(self.extra)
        return out


@dataclass(frozen=True)
class Adapter:
    """One adapter of a collection: its name (folder name), folder (None if in memory) and config."""

    name: str
    folder: str | None
    config: AdapterConfig


@dataclass
class LoraStack:
    """The factors of n adapters on one module, zero-padded to the largest rank, scaling folded in.

    A:  (n, r, d_in)   rows past an adapter's rank are zero
    Bt: (n, r, d_out)  B_i^T times the adapter's scaling, so  delta_i = Bt_i^T A_i
    Padding leaves every product unchanged, so algorithms need not know the ranks.
    """

    A: torch.Tensor
    Bt: torch.Tensor
    ranks: torch.Tensor  # (n,) int64

    def __post_init__(self) -> None:
        if self.A.dim() != 3 or self.Bt.dim() != 3 or self.A.shape[:2] != self.Bt.shape[:2]:
            raise ValueError(f"A {tuple(self.A.shape)} and Bt {tuple(self.Bt.shape)} are not stacked factors")

    @classmethod
    def from_factors(
        cls,
        As: list[torch.Tensor],
        Bs: list[torch.Tensor],
        scales: list[float] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> "LoraStack":
        """Stack A_i (r_i, d_in) and B_i (d_out, r_i), each B scaled by scales[i] (default 1)."""
        n = len(As)
        r = max(a.shape[0] for a in As)
        d_in, d_out = As[0].shape[1], Bs[0].shape[0]
        A = torch.zeros(n, r, d_in, dtype=dtype, device=device)
        Bt = torch.zeros(n, r, d_out, dtype=dtype, device=device)
        for i, (a, b) in enumerate(zip(As, Bs)):
            s = 1.0 if scales is None else float(scales[i])
            A[i, : a.shape[0]] = a.to(device=device, dtype=dtype)
            Bt[i, : a.shape[0]] = b.to(device=device, dtype=dtype).T * s
        return cls(A, Bt, torch.tensor([a.shape[0] for a in As]))

    @property
    def n(self) -> int:
        return self.A.shape[0]

    @property
    def d_in(self) -> int:
        return self.A.shape[2]

    @property
    def d_out(self) -> int:
        return self.Bt.shape[2]

    def subset(self, idx: torch.Tensor) -> "LoraStack":
        """The adapters idx (a copy; the stack itself when idx is all of them, in order)."""
        if idx.numel() == self.n and torch.equal(idx.cpu(), torch.arange(self.n)):
            return self
        return LoraStack(self.A[idx], self.Bt[idx], self.ranks[idx.cpu()])

    def norms2(self) -> torch.Tensor:
        """||B_i A_i||_F^2 for every adapter, (n,) float64, from r x r Gram matrices only."""
        gram_b = (self.Bt @ self.Bt.transpose(1, 2)).double()
        gram_a = (self.A @ self.A.transpose(1, 2)).double()
        return (gram_b * gram_a).sum(dim=(1, 2))

    # The four products every method is built from; each costs O(n r d c) and is one GEMM.
    def bt_times(self, X: torch.Tensor) -> torch.Tensor:
        """B_i^T X for every i: (n, r, c) from X (d_out, c)."""
        return (self.Bt.reshape(-1, self.d_out) @ X).reshape(self.n, self.A.shape[1], X.shape[1])

    def a_times(self, X: torch.Tensor) -> torch.Tensor:
        """A_i X for every i: (n, r, c) from X (d_in, c)."""
        return (self.A.reshape(-1, self.d_in) @ X).reshape(self.n, self.A.shape[1], X.shape[1])

    def sum_b_times(self, Y: torch.Tensor) -> torch.Tensor:
        """sum_i B_i Y_i: (d_out, c) from Y (n, r, c)."""
        return self.Bt.reshape(-1, self.d_out).T @ Y.reshape(-1, Y.shape[2])

    def sum_at_times(self, Y: torch.Tensor) -> torch.Tensor:
        """sum_i A_i^T Y_i: (d_in, c) from Y (n, r, c)."""
        return self.A.reshape(-1, self.d_in).T @ Y.reshape(-1, Y.shape[2])
