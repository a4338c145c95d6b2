"""GPU memory of one replica: the budget split per strategy, byte pools, resident adapters, KV blocks.

Fair memory: every strategy gets the same budget, device memory x utilization - base weights, and
splits it between adapters and the KV cache (`plan_memory`). The paged strategy puts both in one
pool (adapters evicted to make room for KV); the others give adapters a fixed part.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from lorabench.strategies import Strategy


class OutOfMemory(RuntimeError):
    """An allocation beyond a pool's capacity: a simulator bug, never a user error."""


class Pool:
    """Bytes of GPU memory that KV blocks and/or adapters are allocated from."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self.used = 0

    @property
    def free(self) -> int:
        return self.capacity - self.used

    def alloc(self, nbytes: int) -> None:
        if nbytes > self.free:
            raise OutOfMemory(f"allocating {nbytes} B with {self.free} B free of {self.capacity}")
        self.used += nbytes

    def release(self, nbytes: int) -> None:
        self.used -= nbytes


@dataclass(frozen=True)
class MemoryPlan:
    """How one strategy uses the budget. Bytes; `adapter_capacity` excludes `shared_bytes`."""

    budget: int  # device memory x utilization - weights
    weights: int
    shared_bytes: int  # compressed: the bases, always resident
    adapter_capacity: int  # bytes for resident adapters (paged: the whole pool, shared with KV)
    kv_capacity: int  # bytes for the KV cache (paged: the whole pool)
    max_distinct: int | None  # cap of distinct adapters per batch (per-lora: max_loras)
    slots: int  # adapters that fit at once (per-lora: max_loras; compressed: S_i that fit)
    preload: bool  # adapters 0 .. slots-1 resident from the start (single: its one; compressed: all S_i)
    status: str = "ok"


def plan_memory(strategy: Strategy, weights: int, device_bytes: int, utilization: float,
                n_loras: int, max_loras: int | None, matched_adapter_bytes: int, reserved: int = 0) -> MemoryPlan:
    """Split the budget for `strategy`; `reserved` bytes (an engine's activations, sampler and the
    like: sim/engine_model.py) are kept out of it.

    per-lora: `max_loras` slots (default: as many as fit in `matched_adapter_bytes`, the memory the
    compressed strategy's adapters take, as the paper matched memory; at least 1, at most n_loras).
    compressed: the bases plus every S_i when they fit in half the budget, else as many S_i as do.
    paged: one pool for adapters and KV. single: one adapter.
    """
    budget = int(device_bytes * utilization) - weights - reserved
    slot = int(strategy.adapter_bytes.max())

    def fail(why: str) -> MemoryPlan:
        return MemoryPlan(budget, weights, 0, 0, 0, None, 0, False, why)

    if budget <= 0:
        return fail(f"base weights ({weights / 2**30:.1f} GiB) do not fit in {utilization:.0%} of the device")
    if strategy.name == "single":
        return MemoryPlan(budget, weights, 0, slot, budget - slot, None, 1, True)
    if strategy.name == "paged":
        return MemoryPlan(budget, weights, 0, budget, budget, None, n_loras, False)
    if strategy.name == "per-lora":
        slots = max_loras if max_loras is not None else min(n_loras, max(1, matched_adapter_bytes // slot))
        need = slots * slot
        if need >= budget:
            return fail(f"adapters do not fit: {slots} slots x {slot / 2**20:.1f} MiB exceed the "
                        f"{budget / 2**30:.1f} GiB budget")
        return MemoryPlan(budget, weights, 0, need, budget - need, slots, slots, False)
    # compressed
    shared = strategy.shared_bytes
    if shared >= budget // 2:
        return fail(f"adapters do not fit: shared bases take {shared / 2**30:.2f} GiB, over half the budget")
    all_s = strategy.total_adapter_bytes
    if shared + all_s <= budget // 2:
        return MemoryPlan(budget, weights, shared, all_s, budget - shared - all_s, None, n_loras, True)
    slots = (budget // 2 - shared) // slot
    return MemoryPlan(budget, weights, shared, slots * slot, budget - shared - slots * slot, slots, slots, False)


EVICTION_POLICIES = ("lru", "fifo", "lfu")


class AdapterCache:
    """Adapters resident on the GPU; when room is needed, an adapter no running request uses is
    evicted by the policy: `lru` the least recently used (placed, or admitted a request), `fifo` the
    one placed longest ago, `lfu` the one that admitted the fewest requests so far in the run (then
    the least recently used). `pinned` adapters are never evicted (`--pin-hot`).

    `in_use[a]` counts running requests on adapter a: the scheduler pins an adapter for each
    (`pin`, `unpin`); an adapter being loaded is pinned too. Evictable adapters (resident, unpinned,
    loaded) wait in a heap by their policy's key, so an eviction costs no scan of the pinned ones.
    The host cache (vLLM's max_cpu_loras) is an LRU of adapters in host memory; a miss there reads
    the adapter from storage first.
    """

    def __init__(self, pool: Pool, strategy: Strategy, in_use: np.ndarray, host_slots: int | None,
                 preloaded: Iterable[int] = (), policy: str = "lru", pinned: Iterable[int] = ()):
        if policy not in EVICTION_POLICIES:
            raise ValueError(f"eviction policy {policy!r}: expected one of {', '.join(EVICTION_POLICIES)}")
        self.pool, self.strategy, self.in_use, self.policy = pool, strategy, in_use, policy
        n = len(strategy.adapter_bytes)
        self._bytes = strategy.adapter_bytes.tolist()
        # Flags per adapter, as lists: the scheduler reads them one adapter at a time.
        self.resident = [False] * n
        self.loading = [False] * n  # resident but its copy has not landed yet
        self.fresh = [False] * n  # copied in and not used by an admitted request yet
        self._pinned = [False] * n
        self._clock = 0
        self._last_used = [0] * n  # when it was last placed or admitted a request (a counter)
        self._placed = [0] * n  # when it was last placed
        self._uses = [0] * n  # requests it admitted
        self._evictable: list[tuple] = []  # heap of (policy key, adapter); stale entries are skipped
        self.host: OrderedDict[int, None] | None = None if host_slots is None else OrderedDict()
        self.host_slots = host_slots
        self.used = 0
        for a in pinned:
            self._pinned[a] = True
        for a in dict.fromkeys([*pinned, *preloaded]):
            self._place(a)
            self._may_evict(a)

    def pin(self, a: int) -> None:
        self.in_use[a] += 1

    def unpin(self, a: int) -> None:
        self.in_use[a] -= 1
        self._may_evict(a)

    def touch(self, a: int) -> None:
        """Adapter a (pinned) admitted a request."""
        self._clock += 1
        self._last_used[a] = self._clock
        self._uses[a] += 1

    def make_room(self, nbytes: int) -> bool:
        """Evict unpinned adapters in the policy's order until `nbytes` are free."""
        free = self.pool.capacity - self.pool.used
        if nbytes <= free:
            return True
        victims, freed = {}, 0  # adapter -> its entry (an adapter may sit in the heap twice)
        while free + freed < nbytes and self._evictable:
            entry = heapq.heappop(self._evictable)
            a = entry[1]
            if self._is_evictable(a) and self._key(a) == entry[0] and a not in victims:
                victims[a] = entry
                freed += self._bytes[a]
        if free + freed < nbytes:
            for entry in victims.values():
                heapq.heappush(self._evictable, entry)
            return False
        for a in victims:
            self._evict(a)
        return True

    def reserve(self, a: int) -> bool:
        """Make adapter a's GPU memory available and mark it loading; False when nothing evictable frees enough."""
        if not self.make_room(self._bytes[a]):
            return False
        self._place(a)
        self.loading[a] = True
        self.fresh[a] = True
        return True

    def loaded(self, a: int) -> None:
        self.loading[a] = False
        self._may_evict(a)

    def host_miss(self, a: int) -> bool:
        """Whether adapter a must be read from storage first; updates the host LRU."""
        if self.host is None:
            return False
        if a in self.host:
            self.host.move_to_end(a)
            return False
        self.host[a] = None
        if len(self.host) > self.host_slots:
            self.host.popitem(last=False)
        return True

    def _is_evictable(self, a: int) -> bool:
        return self.resident[a] and not self.loading[a] and self.in_use[a] == 0 and not self._pinned[a]

    def _key(self, a: int):
        """Evicted first: the smallest key (it changes only while the adapter is in use or loading)."""
        if self.policy == "lru":
            return self._last_used[a]
        if self.policy == "fifo":
            return self._placed[a]
        return self._uses[a], self._last_used[a]

    def _may_evict(self, a: int) -> None:
        if self._is_evictable(a):
            heapq.heappush(self._evictable, (self._key(a), a))

    def _place(self, a: int) -> None:
        size = self._bytes[a]
        self.pool.alloc(size)
        self.used += size
        self.resident[a] = True
        self._clock += 1
        self._last_used[a] = self._placed[a] = self._clock

    def _evict(self, a: int) -> None:
        size = self._bytes[a]
        self.resident[a] = False
        self.pool.release(size)
        self.used -= size


class KVCache:
    """KV cache in blocks of `block_size` tokens, drawn from a pool (possibly shared with adapters)."""

    def __init__(self, pool: Pool, block_size: int, bytes_per_token: int, adapters: AdapterCache | None):
        self.pool, self.block_size = pool, block_size
        self.block_bytes = block_size * bytes_per_token
        self.adapters = adapters  # evicted to make room when the pool is shared
        self.used_blocks = 0

    def blocks_for(self, tokens):
        return -(-tokens // self.block_size)

    @property
    def used(self) -> int:
        return self.used_blocks * self.block_bytes

    def can_alloc(self, blocks: int) -> bool:
        need = blocks * self.block_bytes
        pool = self.pool
        if need <= pool.capacity - pool.used:
            return True
        return self.adapters is not None and self.adapters.make_room(need)

    def alloc(self, blocks: int) -> bool:
        if not self.can_alloc(blocks):
            return False
        self.pool.alloc(blocks * self.block_bytes)
        self.used_blocks += blocks
        return True

    def release(self, blocks: int) -> None:
        self.pool.release(blocks * self.block_bytes)
        self.used_blocks -= blocks

    def capacity_blocks(self) -> int:
        return self.pool.capacity // self.block_bytes


def kv_bytes_per_token(layers: int, kv_dim: int, dtype_bytes: int = 2) -> int:
    """K and V of one token over all layers."""
    return 2 * layers * kv_dim * dtype_bytes
