"""One object per serving strategy: what its adapters cost in GPU memory and in host->GPU copies, and
what it asks of the scheduler.

- single:     the baseline. Every request uses one adapter, resident from the start.
- per-lora:   Punica / vLLM multi-LoRA. Fixed GPU slots of the largest rank (`max_lora_rank`
              padding), LRU eviction, a cap of distinct adapters per batch (= slots, as vLLM's
              max_loras), a synchronous load when a scheduled request's adapter is absent.
- paged:      S-LoRA unified paging. Exact pages per rank (one page = one hidden-size vector) in a
              pool shared with the KV cache; adapters of the next requests are prefetched while the
              current batch computes.
- compressed: "Compress then Serve". Shared bases U, V per cluster and module, plus one R x R
              matrix S_i per adapter, all resident when they fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lorabench.errors import LorabenchError
from lorabench.parallel import shard
from lorabench.presets import ModelShape

STRATEGIES = ("single", "per-lora", "paged", "compressed")


def parse_strategies(text: str) -> tuple[str, ...]:
    """'all' or a comma list -> strategy names, the single baseline always first."""
    names = STRATEGIES if text.strip() == "all" else tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown or not names:
        raise LorabenchError(
            f"--strategy: unknown {', '.join(unknown) or '(empty)'}; choose all or among {', '.join(STRATEGIES)}")
    return ("single",) + tuple(s for s in STRATEGIES[1:] if s in names)


@dataclass(frozen=True)
class Strategy:
    """Memory and copy costs of one strategy for one model, adapter set and dtype.

    adapter_bytes[i]: GPU bytes adapter i occupies while resident (per-lora: its padded slot).
    load_bytes[i]:    bytes copied host->GPU to make adapter i resident.
    copies_per_load:  separate host->GPU copies per load (each pays the link's fixed latency; see
                      anchors.md: 256 separate tensors cost 4x one packed buffer of the same bytes).
    shared_bytes:     GPU bytes every adapter needs (compressed: the bases U, V of every cluster).
    prefetch:         loads run in the background ahead of scheduling (True) or stall the step (False).
    shared_pool:      adapters and KV cache draw from one memory pool (paged).
    """

    name: str
    adapter_bytes: np.ndarray
    load_bytes: np.ndarray
    copies_per_load: int
    shared_bytes: int
    prefetch: bool
    shared_pool: bool

    @property
    def total_adapter_bytes(self) -> int:
        return int(self.adapter_bytes.sum())


def build_strategy(
    name: str, model: ModelShape, ranks: np.ndarray, target_modules: tuple[str, ...],
    compressed_rank: int, clusters: int, dtype_bytes: int = 2, packed: bool = False, tp: int = 1,
) -> Strategy:
    """The strategy `name` for adapters of the given ranks (one per adapter) on `target_modules`.
    `packed`: each adapter sits in one contiguous host buffer, so a load is one copy instead of one
    per tensor (serving engines copy tensor by tensor). Sizes are one GPU's of a `tp`-way group: its
    slice of each A and B as vLLM shards them (lorabench/parallel.py), copied to every GPU at once."""
    # (d_in of A, d_out of B) of every module's LoRA on one GPU
    sh = shard(model, tp)
    shapes = [sh.lora_elements(m) for m in target_modules]
    tensors = 1 if packed else 2 * len(target_modules) * model.layers  # A and B of every module and layer
    # Bytes of a rank-1 slice of one adapter over all its modules and layers: A row + B column.
    rank1 = model.layers * sum(d_in + d_out for d_in, d_out in shapes) * dtype_bytes
    exact = ranks.astype(np.int64) * rank1
    if name == "single":
        return Strategy(name, exact, exact, tensors, 0, prefetch=False, shared_pool=False)
    if name == "per-lora":
        padded = np.full_like(exact, int(ranks.max()) * rank1)  # every slot sized for max_lora_rank
        return Strategy(name, padded, exact, tensors, 0, prefetch=False, shared_pool=False)
    if name == "paged":
        # A page is one hidden-size vector (one GPU's 1 / tp of it); a rank-r adapter takes r pages per A
        # and per B of a module (a d-wide row of a non-square module takes ceil(d / page) pages).
        width = -(-model.hidden // tp)
        page = width * dtype_bytes
        pages_rank1 = model.layers * sum(-(-d_in // width) + -(-d_out // width) for d_in, d_out in shapes)
        pages = ranks.astype(np.int64) * pages_rank1
        return Strategy(name, pages * page, exact, tensors, 0, prefetch=True, shared_pool=True)
    if name == "compressed":
        r = compressed_rank
        s_bytes = model.layers * len(target_modules) * r * r * dtype_bytes
        bases = clusters * model.layers * sum(r * (d_in + d_out) for d_in, d_out in shapes) * dtype_bytes
        s = np.full(len(ranks), s_bytes, dtype=np.int64)
        # The S_i of one adapter are packed in one host buffer: one copy per load.
        return Strategy(name, s, s, 1, bases, prefetch=False, shared_pool=False)
    raise LorabenchError(f"unknown strategy {name!r}; choose among {', '.join(STRATEGIES)}")
