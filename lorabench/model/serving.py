"""An engine set up to serve one strategy over many adapters: where adapters come from (`AdapterBank`),
which are on the device (`Residency`, LRU over the strategy's slots), and `build_engine`.

The measured executor and `lorabench profile` both serve through these.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from lorabench.errors import LorabenchError
from lorabench.presets import ModelShape

from .adapters import AdapterWeights, CompressedWeights, random_adapter, random_compressed
from .decoder import Decoder, default_dtype
from .engine import Engine
from .kv_cache import BlockKVCache, PagedKVCache
from .lora import CompressedLora, LoraState, PagedLora, SingleLora, SlotLora
from .page_pool import PagePool

STRATEGIES = ("single", "per-lora", "paged", "compressed")
RANDOM_BANK = 4  # distinct random adapters per rank: copies cost the same whatever the numbers


class AdapterBank:
    """Host copies of the adapters (pinned when CUDA is there), by adapter id.

    Random adapters of the requested ranks are drawn once per rank and reused (a bank of a few per
    rank), since what is measured is the bytes moved and the kernels run, not the values; a real
    collection gives every adapter its own weights."""

    def __init__(self, shape: ModelShape, ranks, modules, dtype, pin: bool, adapters: list[AdapterWeights] | None = None,
                 seed: int = 0):
        self.ranks = [int(r) for r in ranks]
        self.modules, self._pin = tuple(modules), pin
        self._given = adapters
        self._random: dict[tuple[int, int], AdapterWeights] = {}
        self._shape, self._dtype, self._seed = shape, dtype, seed

    def __len__(self) -> int:
        return len(self.ranks)

    def get(self, adapter: int) -> AdapterWeights:
        if not 0 <= adapter < len(self.ranks):
            raise LorabenchError(f"adapter id {adapter} out of range: the collection has {len(self.ranks)}")
        if self._given is not None:
            return self._given[adapter]
        key = (self.ranks[adapter], adapter % RANDOM_BANK)
        if key not in self._random:
            a = random_adapter(self._shape, key[0], self.modules, seed=self._seed + 7919 * key[0] + key[1], dtype=self._dtype)
            self._random[key] = a.pin() if self._pin else a
        return self._random[key]


class Residency:
    """Which adapters the LoRA state holds, in which index; loads absent ones into the least
    recently used index (paged: evicting until the pool has room)."""

    def __init__(self, lora: LoraState, bank: AdapterBank, capacity: int):
        self.lora, self.bank, self.capacity = lora, bank, capacity
        self._index: OrderedDict[int, int] = OrderedDict()  # adapter -> index, least recent first
        self._free = list(range(capacity - 1, -1, -1))
        self.loads = 0

    def _evict_oldest(self) -> None:
        _, index = self._index.popitem(last=False)
        if isinstance(self.lora, PagedLora):
            self.lora.evict(index)
        self._free.append(index)

    def index(self, adapter: int) -> int:
        if self.lora.strategy in ("single", "compressed"):
            return 0 if self.lora.strategy == "single" else adapter
        if adapter in self._index:
            self._index.move_to_end(adapter)
            return self._index[adapter]
        weights = self.bank.get(adapter)
        if not self._free:
            self._evict_oldest()
        if isinstance(self.lora, PagedLora):
            while self.lora.pool.num_free < self.lora.pages_needed(weights.rank) and self._index:
                self._evict_oldest()
        index = self._free.pop()
        self.lora.load(index, weights)
        self._index[adapter] = index
        self.loads += 1
        return index

    def pin(self, adapters) -> list[int]:
        """Indices of a batch's adapters; raises when the batch holds more than fit at once."""
        distinct = list(dict.fromkeys(int(a) for a in adapters))
        if self.lora.strategy in ("per-lora", "paged") and len(distinct) > self.capacity:
            raise LorabenchError(f"{self.lora.strategy}: a batch uses {len(distinct)} adapters, {self.capacity} slots")
        where = {a: self.index(a) for a in distinct}
        return [where[int(a)] for a in adapters]


@dataclass(frozen=True)
class ServingSetup:
    """How to build an engine for one strategy. kv_tokens: KV-cache capacity in tokens."""

    shape: ModelShape
    strategy: str
    ranks: tuple[int, ...]  # rank of every adapter (their number is n_loras)
    modules: tuple[str, ...]
    device: str = "cpu"
    kv_tokens: int = 4096
    max_seqs: int = 256  # sequences at once: each may leave its last KV block part empty
    slots: int = 64  # per-lora slots / paged page-table rows
    block_size: int = 16
    compressed_rank: int = 64
    cluster_of: tuple[int, ...] | None = None  # compressed: each adapter's cluster (default: all in one)
    diagonal: bool = False
    cuda_graphs: bool = False
    max_context: int = 4096
    seed: int = 0
    dtype: torch.dtype | None = None  # None: bf16 on CUDA, fp32 on the CPU
    attention_backend: str = "auto"  # triton on CUDA, torch elsewhere


def page_size(shape: ModelShape, modules) -> int:
    """A pool page holds one row of A or column of B of any target module: the hidden size, or
    wider when an MLP module is targeted."""
    return max([shape.hidden] + [max(shape.module_shape(m)) for m in modules])


def kv_tokens_per_page(shape: ModelShape, page: int) -> tuple[int, int]:
    """(tokens per page, pages per token) of the paged KV cache (see PagedKVCache)."""
    width = 2 * shape.kv_dim
    if width > page:
        return 1, 2
    return (page // width if page % width == 0 else 1), 1


def build_engine(setup: ServingSetup, adapters: list[AdapterWeights] | None = None,
                 compressed: CompressedWeights | None = None, model: Decoder | None = None) -> tuple[Engine, Residency]:
    """An engine for `setup`; pass `model` to share one decoder's weights between engines."""
    s = setup
    if s.strategy not in STRATEGIES:
        raise LorabenchError(f"unknown strategy {s.strategy!r}; choose from {', '.join(STRATEGIES)}")
    device = torch.device(s.device)
    dtype = s.dtype or default_dtype(device)
    model = model or Decoder(s.shape, device, dtype, seed=s.seed)
    bank = AdapterBank(s.shape, s.ranks, s.modules, dtype, pin=device.type == "cuda", adapters=adapters, seed=s.seed)
    max_rank = max(s.ranks)
    slots = min(s.slots, len(s.ranks))
    if s.strategy == "paged":
        page = page_size(s.shape, s.modules)
        tokens_per_page, pages_per_token = kv_tokens_per_page(s.shape, page)
        kv_pages = (-(-s.kv_tokens // tokens_per_page) + s.max_seqs) * pages_per_token
        pages = kv_pages + slots * 2 * max_rank * len(s.modules)
        pool = PagePool(s.shape.layers, pages, page, dtype, device)
        kv = PagedKVCache(pool, s.shape.kv_dim)
        lora: LoraState = PagedLora(pool, s.shape, s.modules, slots, max_rank)
    else:
        num_blocks = -(-s.kv_tokens // s.block_size) + s.max_seqs
        kv = BlockKVCache(s.shape.layers, s.shape.kv_dim, num_blocks, s.block_size, dtype, device)
        if s.strategy == "single":
            lora = SingleLora(bank.get(0), device, dtype)
        elif s.strategy == "per-lora":
            lora = SlotLora(s.shape, s.modules, slots, max_rank, device, dtype)
        else:
            cw = compressed or random_compressed(s.shape, len(s.ranks), s.compressed_rank, 1, s.modules,
                                                 s.diagonal, seed=s.seed, cluster_of=s.cluster_of)
            if cw.num_adapters != len(s.ranks):
                raise LorabenchError(f"compressed collection holds {cw.num_adapters} adapters, the run asks {len(s.ranks)}")
            lora = CompressedLora(cw, device, dtype)
    engine = Engine(model, kv, lora, s.attention_backend, cuda_graphs=s.cuda_graphs, max_context=s.max_context)
    return engine, Residency(lora, bank, slots)
