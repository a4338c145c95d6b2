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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


class Step:
    """One iteration of the batch: per running request (parallel int arrays of length batch_size),

    tokens:       tokens it processes now (a prefill chunk, or 1 when decoding),
    context_lens: its context after this step (tokens in the KV cache it attends to, these included),
    adapters:     its adapter id (0 .. n_loras-1; the single strategy uses 0 for all),
    is_prefill:   bool, True while the request is still reading its prompt;
    and for the whole batch: the strategy name, the number of distinct adapters, and totals:
    num_tokens, prefill_tokens, context_sum (of context_lens) and twice_attention_pairs (the
    query-key pairs the attention computes, doubled to stay an integer: a row of t tokens ending at
    context n attends t (n - (t - 1) / 2)). `adapter_ids` are the distinct adapters of the batch (a
    frozenset of ints). `batch_id` is the same for two steps exactly when they hold
    the same requests in the same order (so the same adapters): an executor may cache what depends
    only on them; None when unknown.

    `Step(strategy, tokens, context_lens, adapters, is_prefill, distinct_adapters)` takes the arrays
    and derives the totals. The scheduler builds steps from its running totals instead
    (`Step.from_totals`), and the arrays and adapter ids only when an executor reads them: a modeled
    step then costs no pass over the batch. Such a step describes the batch as it is when built; read its arrays
    before the step is applied (inside `Executor.step`), as every executor does.
    """

    __slots__ = ("strategy", "distinct_adapters", "batch_size", "num_tokens", "prefill_tokens", "context_sum",
                 "twice_attention_pairs", "batch_id", "_arrays", "_build", "_adapter_ids")

    def __init__(self, strategy: str, tokens: np.ndarray, context_lens: np.ndarray, adapters: np.ndarray,
                 is_prefill: np.ndarray, distinct_adapters: int, batch_id: int | None = None):
        self.strategy, self.distinct_adapters, self.batch_id = strategy, distinct_adapters, batch_id
        self._arrays, self._build = (tokens, context_lens, adapters, is_prefill), None
        self._adapter_ids = lambda: frozenset(adapters.tolist())
        self.batch_size = len(tokens)
        self.num_tokens = int(tokens.sum())
        self.prefill_tokens = int(tokens[is_prefill].sum())
        self.context_sum = int(context_lens.sum())
        self.twice_attention_pairs = int((tokens * (2 * context_lens - tokens + 1)).sum())

    @classmethod
    def from_totals(cls, strategy: str, distinct_adapters: int, batch_size: int, num_tokens: int, prefill_tokens: int,
                    context_sum: int, twice_attention_pairs: int, batch_id: int | None,
                    arrays: Callable[[], tuple], adapter_ids: Callable[[], frozenset]) -> "Step":
        """A step whose arrays `arrays()` returns, as (tokens, context_lens, adapters, is_prefill),
        when first read, and its distinct adapters `adapter_ids()`."""
        step = cls.__new__(cls)
        step.strategy, step.distinct_adapters, step.batch_id = strategy, distinct_adapters, batch_id
        step.batch_size, step.num_tokens, step.prefill_tokens = batch_size, num_tokens, prefill_tokens
        step.context_sum, step.twice_attention_pairs = context_sum, twice_attention_pairs
        step._arrays, step._build, step._adapter_ids = None, arrays, adapter_ids
        return step

    def _get(self) -> tuple:
        if self._arrays is None:
            self._arrays, self._build = self._build(), None
        return self._arrays

    tokens = property(lambda self: self._get()[0])
    context_lens = property(lambda self: self._get()[1])
    adapters = property(lambda self: self._get()[2])
    is_prefill = property(lambda self: self._get()[3])

    @property
    def adapter_ids(self) -> frozenset[int]:
        return self._adapter_ids()

    def decoded(self, iterations: int) -> "Step":
        """This decode-only step `iterations` iterations later: every context that much longer."""
        context_sum = self.context_sum + iterations * self.batch_size

        def arrays():
            tokens, context_lens, adapters, is_prefill = self._get()
            return tokens, context_lens + iterations, adapters, is_prefill

        return Step.from_totals(self.strategy, self.distinct_adapters, self.batch_size, self.num_tokens, 0,
                                context_sum, 2 * context_sum, self.batch_id, arrays, self._adapter_ids)


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
