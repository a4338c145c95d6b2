"""A pool of fixed-size pages, one vector per page per layer, shared by KV cache and adapters.

As S-LoRA's unified memory pool: page p of layer l is `pages[l, p]`, a vector of `page_size`
elements. A page index is the same in every layer, so one allocation serves all layers: a KV-cache
token holds one page index (K and V side by side when they fit, else two), and row j of an
adapter's A (or column j of its B) on one module holds one page index.
"""

from __future__ import annotations

import torch

from lorabench.errors import LorabenchError


class PagePool:
    """pages: (layers, num_pages, page_size). Free pages are kept on a stack (a tensor)."""

    def __init__(self, layers: int, num_pages: int, page_size: int, dtype: torch.dtype, device: torch.device | str):
        if num_pages < 1:
            raise LorabenchError(f"page pool: num_pages must be >= 1, got {num_pages}")
        self.page_size = page_size
        self.pages = torch.zeros(layers, num_pages, page_size, dtype=dtype, device=device)
        # Popped from the end: the lowest indices are handed out first.
        self._free = torch.arange(num_pages - 1, -1, -1, dtype=torch.int64)
        self._num_free = num_pages

    @property
    def num_pages(self) -> int:
        return self.pages.shape[1]

    @property
    def num_free(self) -> int:
        return self._num_free

    def alloc(self, n: int) -> torch.Tensor:
        """n page indices (int64, on the host); raises when the pool is exhausted."""
        if n > self._num_free:
            raise LorabenchError(f"page pool exhausted: {n} pages wanted, {self._num_free} of {self.num_pages} free")
        self._num_free -= n
        return self._free[self._num_free : self._num_free + n].flip(0).clone()

    def free(self, pages: torch.Tensor) -> None:
        n = pages.numel()
        self._free[self._num_free : self._num_free + n] = pages.flatten().flip(0).cpu()
        self._num_free += n
