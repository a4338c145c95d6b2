"""KV cache in blocks with a block table per sequence.

Storage is one tensor `(layers, rows, width)`; each token of a sequence owns `rows_per_token` row
indices, the same in every layer. K sits at column 0 of its row, V at column `v_col` of its own row
(the same row when K and V fit side by side). Two ways to hand out rows:

- `BlockKVCache`: blocks of `block_size` consecutive tokens in a cache of its own (vLLM's layout);
- `PagedKVCache`: pages of a `PagePool`, competing with adapter pages for the same pool (S-LoRA's
  unified paging): a block is one page, holding as many tokens as fit side by side.

Attention reads each sequence's own context through `rows(...)`, so no sequence is padded to the
length of another.
"""

from __future__ import annotations

import torch

from lorabench.errors import LorabenchError

from .page_pool import PagePool


class KVCache:
    storage: torch.Tensor  # (layers, rows, width)
    kv_dim: int
    block_size: int  # tokens per block
    rows_per_token: int
    v_col: int

    def __init__(self) -> None:
        self._tables: dict[int, torch.Tensor] = {}  # seq_id -> int64 block indices (host)
        self._lengths: dict[int, int] = {}  # seq_id -> tokens reserved

    def length(self, seq_id: int) -> int:
        return self._lengths.get(seq_id, 0)

    def block_table(self, seq_id: int) -> torch.Tensor:
        return self._tables.get(seq_id, torch.empty(0, dtype=torch.int64))

    def reserve(self, seq_id: int, total_tokens: int) -> None:
        """Make room for `total_tokens` tokens of `seq_id`, growing its block table."""
        have = self._lengths.get(seq_id, 0)
        if total_tokens > have:
            table = self.block_table(seq_id)
            self._tables[seq_id] = torch.cat([table, self._grow(table.numel(), total_tokens)])
            self._lengths[seq_id] = total_tokens

    def release(self, seq_id: int) -> None:
        table = self._tables.pop(seq_id, None)
        self._lengths.pop(seq_id, None)
        if table is not None and table.numel():
            self._give_back(table)

    def rows(self, seq_ids: list[int], starts: torch.Tensor, ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices (int64, host) of K and of V for tokens [starts[b], ends[b]) of each sequence,
        packed sequence after sequence."""
        for s, e in zip(seq_ids, ends.tolist()):
            if e > self.length(s):
                raise LorabenchError(f"KV cache: sequence {s} reads up to token {e}, {self.length(s)} reserved")
        lens = ends - starts
        tables = torch.nn.utils.rnn.pad_sequence([self._tables[s] for s in seq_ids], batch_first=True)
        seq = torch.repeat_interleave(torch.arange(len(seq_ids)), lens)
        first = torch.cumsum(lens, 0) - lens
        pos = torch.arange(int(lens.sum())) - first[seq] + starts[seq]
        if self.rows_per_token == 1:
            rows = tables[seq, pos // self.block_size] * self.block_size + pos % self.block_size
            return rows, rows
        return tables[seq, 2 * pos], tables[seq, 2 * pos + 1]  # one page for K, one for V (block of 1)

    # Layout-specific parts.
    def _grow(self, blocks_held: int, total_tokens: int) -> torch.Tensor:
        raise NotImplementedError

    def _give_back(self, table: torch.Tensor) -> None:
        raise NotImplementedError


class BlockKVCache(KVCache):
    """`num_blocks` blocks of `block_size` tokens in a cache of their own; K and V side by side."""

    def __init__(self, layers: int, kv_dim: int, num_blocks: int, block_size: int, dtype, device):
        super().__init__()
        if num_blocks < 1 or block_size < 1:
            raise LorabenchError(f"KV cache: num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        self.kv_dim, self.block_size = kv_dim, block_size
        self.rows_per_token, self.v_col = 1, kv_dim
        self.storage = torch.zeros(layers, num_blocks * block_size, 2 * kv_dim, dtype=dtype, device=device)
        self._free_blocks = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free_tokens(self) -> int:
        return len(self._free_blocks) * self.block_size

    def _grow(self, blocks_held: int, total_tokens: int) -> torch.Tensor:
        need = -(-total_tokens // self.block_size) - blocks_held
        if need > len(self._free_blocks):
            raise LorabenchError(f"KV cache full: {need} blocks wanted, {len(self._free_blocks)} free")
        return torch.tensor([self._free_blocks.pop() for _ in range(need)], dtype=torch.int64)

    def _give_back(self, table: torch.Tensor) -> None:
        self._free_blocks += reversed(table.tolist())


class PagedKVCache(KVCache):
    """KV pages from a `PagePool` that adapters share. When K and V of a token (2 * kv_dim) divide
    the page size, a page holds page_size / (2 kv_dim) tokens side by side (grouped-query models:
    a 4,096-wide Mistral page holds two tokens); otherwise a token takes one page for K and V, or,
    when they do not fit together (multi-head models with page = hidden), one page each."""

    def __init__(self, pool: PagePool, kv_dim: int):
        super().__init__()
        if kv_dim > pool.page_size:
            raise LorabenchError(f"paged KV cache: kv_dim {kv_dim} exceeds the page size {pool.page_size}")
        self.pool, self.kv_dim = pool, kv_dim
        width, page = 2 * kv_dim, pool.page_size
        self.rows_per_token = 1 if width <= page else 2
        self.block_size = page // width if self.rows_per_token == 1 and page % width == 0 else 1  # tokens per page
        self.v_col = kv_dim if self.rows_per_token == 1 else 0
        layers, num_pages, _ = pool.pages.shape
        # Token slot t of page p is row p * block_size + t of this view (the same memory).
        self.storage = pool.pages.view(layers, num_pages * self.block_size, page // self.block_size)

    def _grow(self, blocks_held: int, total_tokens: int) -> torch.Tensor:
        # The table lists pages: a page per block_size tokens, or rows_per_token pages per token.
        return self.pool.alloc(-(-total_tokens // self.block_size) * self.rows_per_token - blocks_held)

    def _give_back(self, table: torch.Tensor) -> None:
        self.pool.free(table)
