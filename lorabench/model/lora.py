"""LoRA on the decoder's linear layers, one state object per serving strategy.

Each state holds its strategy's device tensors for every layer and target module and adds the LoRA
delta of one (layer, module) into y through the strategy's kernel from `lorabench.kernels`
(Triton on CUDA, PyTorch elsewhere). `batch.token_adapters` holds, per token, the index the state
understands: ignored by `single`, a slot for `per-lora`, a page-table row for `paged`, an adapter
index for `compressed`. Loads copy host adapters into device memory and return the bytes copied.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch

from lorabench import kernels
from lorabench.errors import LorabenchError
from lorabench.kernels import LoraBatch
from lorabench.presets import ModelShape

from .adapters import AdapterWeights, CompressedWeights
from .page_pool import PagePool


_backend = "auto"  # lorabench.kernels backend: "auto" (Triton on CUDA), "triton" or "torch"
# reference op -> the dispatching function of `lorabench.kernels`
_DISPATCH = {"single_lora": "lora_single", "per_lora": "lora_per_lora", "paged_lora": "lora_paged",
             "compressed_lora": "lora_compressed"}


def _op(name: str):
    """The strategy op as `lorabench.kernels` dispatches it (with the chosen backend)."""
    return partial(getattr(kernels, _DISPATCH[name]), backend=_backend)


@contextmanager
def lora_backend(backend: str):
    """Within the block, LoRA ops run on `backend`: "torch" (the PyTorch implementation, on any
    device: device checks compare against it), "triton" (the kernels, also under the interpreter)."""
    global _backend
    saved, _backend = _backend, backend
    try:
        yield
    finally:
        _backend = saved


class LoraState:
    strategy: str
    modules: tuple[str, ...]

    def apply(self, layer: int, module: str, x: torch.Tensor, y: torch.Tensor, batch: LoraBatch) -> torch.Tensor:
        raise NotImplementedError


class SingleLora(LoraState):
    """One adapter for every token: the baseline. Its weights are loaded once, up front."""

    strategy = "single"

    def __init__(self, adapter: AdapterWeights, device, dtype):
        self.modules = tuple(adapter.modules)
        self.scale = adapter.scale
        self.A = {m: a.to(device, dtype) for m, (a, _) in adapter.modules.items()}
        self.B = {m: b.to(device, dtype) for m, (_, b) in adapter.modules.items()}

    def apply(self, layer, module, x, y, batch):
        if module in self.A:
            _op("single_lora")(x, y, self.A[module][layer], self.B[module][layer], self.scale)
        return y


class SlotLora(LoraState):
    """per-lora (Punica / vLLM): `slots` adapters stacked per module, padded to `max_rank` with zeros."""

    strategy = "per-lora"

    def __init__(self, shape: ModelShape, modules, slots: int, max_rank: int, device, dtype):
        self.modules, self.max_rank = tuple(modules), max_rank
        self.A, self.B = {}, {}
        for m in self.modules:
            d_in, d_out = shape.module_shape(m)
            self.A[m] = torch.zeros(shape.layers, slots, max_rank, d_in, device=device, dtype=dtype)
            self.B[m] = torch.zeros(shape.layers, slots, d_out, max_rank, device=device, dtype=dtype)
        self.scales = torch.zeros(slots, device=device, dtype=torch.float32)

    def load(self, slot: int, adapter: AdapterWeights) -> int:
        if adapter.rank > self.max_rank:
            raise LorabenchError(f"per-lora: adapter rank {adapter.rank} exceeds the slots' max rank {self.max_rank}")
        r = adapter.rank
        for m in self.modules:
            a, b = adapter.modules[m]
            self.A[m][:, slot, :r].copy_(a, non_blocking=True)
            self.B[m][:, slot, :, :r].copy_(b, non_blocking=True)
            self.A[m][:, slot, r:].zero_()
            self.B[m][:, slot, :, r:].zero_()
        self.scales[slot] = adapter.scale
        return adapter.nbytes

    def apply(self, layer, module, x, y, batch):
        if module in self.A:
            _op("per_lora")(x, y, self.A[module][layer], self.B[module][layer], self.scales, batch)
        return y


class PagedLora(LoraState):
    """paged (S-LoRA): every row of A and column of B is one page of the pool the KV cache shares;
    a page table per adapter and module; adapters of different ranks side by side, unpadded."""

    strategy = "paged"

    def __init__(self, pool: PagePool, shape: ModelShape, modules, max_adapters: int, max_rank: int):
        self.pool, self.modules, self.max_rank = pool, tuple(modules), max_rank
        for m in self.modules:
            if max(shape.module_shape(m)) > pool.page_size:
                raise LorabenchError(f"paged: module {m} {shape.module_shape(m)} is wider than the page size {pool.page_size}")
        device = pool.pages.device
        self.shape = shape
        self.a_pages = {m: torch.zeros(max_adapters, max_rank, dtype=torch.int32, device=device) for m in self.modules}
        self.b_pages = {m: torch.zeros(max_adapters, max_rank, dtype=torch.int32, device=device) for m in self.modules}
        self.ranks = torch.zeros(max_adapters, dtype=torch.int32, device=device)
        self.scales = torch.zeros(max_adapters, dtype=torch.float32, device=device)
        self._held: dict[int, torch.Tensor] = {}  # table row -> pages it owns

    def pages_needed(self, rank: int) -> int:
        return 2 * rank * len(self.modules)

    def load(self, row: int, adapter: AdapterWeights) -> int:
        if adapter.rank > self.max_rank:
            raise LorabenchError(f"paged: adapter rank {adapter.rank} exceeds the page tables' max rank {self.max_rank}")
        self.evict(row)
        r, device = adapter.rank, self.pool.pages.device
        pages = self.pool.alloc(self.pages_needed(r))
        self._held[row] = pages
        for j, m in enumerate(self.modules):
            a, b = adapter.modules[m]
            d_in, d_out = self.shape.module_shape(m)
            pa, pb = pages[2 * j * r : (2 * j + 1) * r], pages[(2 * j + 1) * r : (2 * j + 2) * r]
            dev_pa, dev_pb = pa.to(device), pb.to(device)
            self.pool.pages[:, dev_pa, :d_in] = a.to(device, non_blocking=True).to(self.pool.pages.dtype)
            self.pool.pages[:, dev_pb, :d_out] = b.to(device, non_blocking=True).transpose(1, 2).to(self.pool.pages.dtype)
            self.a_pages[m][row, :r] = dev_pa.to(torch.int32)
            self.b_pages[m][row, :r] = dev_pb.to(torch.int32)
        self.ranks[row] = r
        self.scales[row] = adapter.scale
        return adapter.nbytes

    def evict(self, row: int) -> None:
        pages = self._held.pop(row, None)
        if pages is not None:
            self.pool.free(pages)
            self.ranks[row] = 0

    def apply(self, layer, module, x, y, batch):
        if module in self.a_pages:
            _op("paged_lora")(x, y, self.pool.pages[layer], self.a_pages[module], self.b_pages[module],
                              self.ranks, self.scales, batch)
        return y


class CompressedLora(LoraState):
    """compressed: shared U, V per cluster and every adapter's small S_i, all resident."""

    strategy = "compressed"

    def __init__(self, weights: CompressedWeights, device, dtype):
        self.modules = tuple(weights.modules)
        self.U = {m: u.to(device, dtype) for m, (u, _, _, _) in weights.modules.items()}
        self.V = {m: v.to(device, dtype) for m, (_, v, _, _) in weights.modules.items()}
        self.S = {m: s.to(device, dtype) for m, (_, _, s, _) in weights.modules.items()}
        self.cluster_of = {m: c.to(device) for m, (_, _, _, c) in weights.modules.items()}

    def apply(self, layer, module, x, y, batch):
        if module in self.U:
            _op("compressed_lora")(x, y, self.U[module][layer], self.V[module][layer], self.S[module][layer],
                                   self.cluster_of[module][layer], batch)
        return y
