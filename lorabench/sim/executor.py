"""What the simulator asks of whatever runs (or predicts) a batch: the `Executor` protocol and `Step`.

The engine builds one `Step` per iteration of continuous batching and advances the SimPy clock by
`executor.step(step)` seconds; an adapter copy host->GPU takes `executor.load(nbytes, copies)`.
Two implementations: the modeled one (`costmodel.ModeledExecutor`, a roofline) and the measured one
(`measured.py`, real kernels timed on the device). `ConstantExecutor` serves queueing checks.

Plugging in an executor: `RunConfig.executor = NAME` makes the runner import the module
`runner.EXECUTORS[NAME]` and call its `make_executor(config, model, device, lora)` once per strategy,
where `lora` is a `costmodel.LoraSetup` (strategy name, rank of every adapter, target modules,
compressed rank R, cluster of every adapter, per-lora resident slots). The executor's `step` gets
adapter ids 0 .. n_loras-1 (the single strategy: all 0); `load` gets the bytes of one adapter and the
number of separate copies the strategy makes (each copy has a fixed cost on a real link).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Step:
    """One iteration of the batch: per running request (parallel int arrays of length batch_size),

    tokens:       tokens it processes now (a prefill chunk, or 1 when decoding),
    context_lens: its context after this step (tokens in the KV cache it attends to, these included),
    adapters:     its adapter id (0 .. n_loras-1; the single strategy uses 0 for all),
    is_prefill:   bool, True while the request is still reading its prompt;
    and for the whole batch: the strategy name and the number of distinct adapters.
    """

    strategy: str
    tokens: np.ndarray
    context_lens: np.ndarray
    adapters: np.ndarray
    is_prefill: np.ndarray
    distinct_adapters: int
    num_tokens: int = field(init=False)  # tokens.sum()

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_tokens", int(self.tokens.sum()))

    @property
    def batch_size(self) -> int:
        return len(self.tokens)

    @property
    def prefill_tokens(self) -> int:
        return int(self.tokens[self.is_prefill].sum())


@runtime_checkable
class Executor(Protocol):
    """Runs or predicts steps and adapter loads. Times in seconds."""

    name: str  # "modeled", "measured", ...

    def step(self, step: Step) -> float:
        """Duration of one batch iteration."""
        ...

    def load(self, nbytes: int, copies: int = 1) -> float:
        """Duration of copying one adapter (`nbytes` in `copies` separate transfers) host->GPU."""
        ...


@dataclass(frozen=True)
class ConstantExecutor:
    """Every step takes `step_s`, every load `load_s`: a deterministic server for queueing checks."""

    step_s: float
    load_s: float = 0.0
    name: str = "constant"

    def step(self, step: Step) -> float:
        return self.step_s

    def load(self, nbytes: int, copies: int = 1) -> float:
        return self.load_s
