"""Per-batch LoRA metadata, built once per step and read by every layer's kernels.

Tokens are grouped by adapter so that segmented kernels load each adapter's weights once per
segment. Tokens without an adapter (id -1) belong to no segment and are left untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Rows of one segment tile: the segmented kernels (sgmv, paged, compressed) process a segment in
# tiles of block_m tokens, so each tile reads its adapter's weights once. Short segments (decode,
# many adapters) want small tiles; long ones (prefill) want large tiles to reuse weights more.
MIN_BLOCK_M, MAX_BLOCK_M = 16, 64


def choose_block_m(num_adapter_tokens: int, num_segments: int) -> int:
    """The tile height for a batch: the mean segment length rounded up to a power of two, in [16, 64]."""
    mean_len = -(-num_adapter_tokens // max(num_segments, 1))
    block_m = MIN_BLOCK_M
    while block_m < min(mean_len, MAX_BLOCK_M):
        block_m *= 2
    return block_m


@dataclass(frozen=True)
class LoraBatch:
    """Token -> adapter map of one batch, sorted into same-adapter segments.

    token_adapters: (M,) int32, adapter (slot) id of each token in batch order; -1 = no adapter.
    sorted_tokens:  (T,) int32, indices of the T tokens that have an adapter, grouped by adapter
                    (stable: batch order within a segment).
    seg_starts:     (S + 1,) int32, segment s covers sorted_tokens[seg_starts[s]:seg_starts[s+1]].
    seg_adapters:   (S,) int32, the adapter of each segment (ascending, no -1).
    max_seg_len:    longest segment, in tokens (a Python int).
    max_adapter:    largest adapter id in the batch, -1 if none (a Python int: wrappers check ids
                    against the number of slots without reading the device).
    block_m:        tile height of the segmented kernels: 16, 32 or 64 chosen from the batch
                    (choose_block_m), or forced by build(..., block_m=).
    tiles:          (num_tiles, 3) int32, one row per tile of block_m tokens of one segment:
                    (adapter, first, end) with sorted_tokens[first:end] the tile's tokens.
    num_tiles:      rows of `tiles` (a Python int: the grid of the segmented kernels).
    static:         shapes and launch sizes depend on M alone (see `build`), for CUDA graphs.

    Everything a kernel launch needs is computed here, once per batch, so the per-layer calls do
    no host work that reads the device and can be captured in a CUDA graph.

    A captured graph keeps the grid sizes and tensor addresses of its capture. To replay it for
    another batch of the same size, build that batch with static=True and `copy_` it into the
    batch the graph was captured with: a static batch always has M tiles (the real ones first,
    then empty ones, which the kernels skip) and M sorted tokens (those with an adapter sorted
    by adapter, then those without, which the per-token kernels skip), and block_m 16 unless
    given.
    """

    token_adapters: torch.Tensor
    sorted_tokens: torch.Tensor
    seg_starts: torch.Tensor
    seg_adapters: torch.Tensor
    max_seg_len: int
    max_adapter: int = -1
    block_m: int = MIN_BLOCK_M
    tiles: torch.Tensor | None = None
    num_tiles: int = 0
    static: bool = False

    @property
    def num_tokens(self) -> int:
        return self.token_adapters.numel()

    @property
    def num_segments(self) -> int:
        return self.seg_adapters.numel()

    @property
    def num_adapter_tokens(self) -> int:
        """Rows of sorted_tokens: the tokens that have an adapter (all tokens if static)."""
        return self.sorted_tokens.numel()

    @property
    def all_adapted(self) -> bool:
        """Every token has an adapter (never assumed of a static batch: a later copy_ may differ)."""
        return not self.static and self.num_adapter_tokens == self.num_tokens

    @classmethod
    def build(
        cls, token_adapters: torch.Tensor | list[int], block_m: int | None = None, static: bool = False
    ) -> "LoraBatch":
        """Sort a batch's tokens into segments; `block_m` forces the tile height (tests), `static`
        makes every shape and launch size a function of the number of tokens (CUDA graphs)."""
        ids = torch.as_tensor(token_adapters, dtype=torch.int32)
        if ids.dim() != 1:
            raise ValueError(f"token_adapters must be 1-D (one id per token), got shape {tuple(ids.shape)}")
        lo, hi = (int(v) for v in torch.aminmax(ids)) if ids.numel() else (-1, -1)
        if lo < -1:
            raise ValueError(f"token_adapters holds {lo}; ids are >= 0, or -1 for no adapter")
        if block_m is not None and block_m not in (16, 32, 64, 128):
            raise ValueError(f"block_m must be 16, 32, 64 or 128, got {block_m}")
        device = ids.device
        with_adapter = torch.nonzero(ids >= 0).flatten()
        order = torch.argsort(ids[with_adapter], stable=True)
        sorted_tokens = with_adapter[order].to(torch.int32)
        seg_adapters, counts = torch.unique_consecutive(ids[sorted_tokens.long()], return_counts=True)
        seg_starts = torch.zeros(seg_adapters.numel() + 1, dtype=torch.int32, device=device)
        seg_starts[1:] = torch.cumsum(counts, 0)
        seg_adapters = seg_adapters.to(torch.int32)
        if static:
            block_m = block_m or MIN_BLOCK_M
        else:
            block_m = block_m or choose_block_m(sorted_tokens.numel(), seg_adapters.numel())
        tiles = _segment_tiles(seg_starts.cpu(), seg_adapters.cpu(), block_m)
        if static:  # pad to M tiles (a tile holds one token or more) and M tokens
            tiles = torch.cat([tiles, torch.zeros(ids.numel() - tiles.shape[0], 3, dtype=torch.int32)])
            without = torch.nonzero(ids < 0).flatten().to(torch.int32)
            sorted_tokens = torch.cat([sorted_tokens, without])
        tiles = tiles.to(device)
        return cls(
            token_adapters=ids,
            sorted_tokens=sorted_tokens,
            seg_starts=seg_starts,
            seg_adapters=seg_adapters,
            max_seg_len=int(counts.max()) if counts.numel() else 0,
            max_adapter=hi,
            block_m=block_m,
            tiles=tiles,
            num_tiles=tiles.shape[0],
            static=static,
        )

    def copy_(self, other: "LoraBatch") -> "LoraBatch":
        """Take `other`'s tokens into this static batch's tensors in place (for a graph replay).

        Both must be static, of the same size and block_m. The tensors the kernels read are
        overwritten in place (a captured graph reads them at their addresses); the segment fields
        and Python ints, which no graph reads, are replaced. Adapter ids are not checked against
        the slots here: the graph replays without the wrappers' checks.
        """
        if not (self.static and other.static):
            raise ValueError("copy_ needs two static batches: LoraBatch.build(ids, static=True)")
        if (self.num_tokens, self.block_m) != (other.num_tokens, other.block_m):
            raise ValueError(
                f"copy_ needs batches of one size and block_m: {self.num_tokens} tokens, block_m {self.block_m}"
                f" vs {other.num_tokens}, {other.block_m}"
            )
        for name in ("token_adapters", "sorted_tokens", "tiles"):
            getattr(self, name).copy_(getattr(other, name), non_blocking=True)
        for name in ("seg_starts", "seg_adapters", "max_seg_len", "max_adapter"):
            object.__setattr__(self, name, getattr(other, name))
        return self

    def to(self, device: torch.device | str) -> "LoraBatch":
        return LoraBatch(
            self.token_adapters.to(device),
            self.sorted_tokens.to(device),
            self.seg_starts.to(device),
            self.seg_adapters.to(device),
            self.max_seg_len,
            self.max_adapter,
            self.block_m,
            None if self.tiles is None else self.tiles.to(device),
            self.num_tiles,
            self.static,
        )


def _segment_tiles(seg_starts: torch.Tensor, seg_adapters: torch.Tensor, block_m: int) -> torch.Tensor:
    """(num_tiles, 3) int32 rows (adapter, first, end): each segment cut into tiles of block_m tokens."""
    starts, ends = seg_starts[:-1].long(), seg_starts[1:].long()
    per_seg = (ends - starts + block_m - 1) // block_m
    seg_of_tile = torch.repeat_interleave(torch.arange(per_seg.numel()), per_seg)
    first_tile = torch.cumsum(per_seg, 0) - per_seg
    first = starts[seg_of_tile] + (torch.arange(seg_of_tile.numel()) - first_tile[seg_of_tile]) * block_m
    end = torch.minimum(first + block_m, ends[seg_of_tile])
    return torch.stack([seg_adapters[seg_of_tile].long(), first, end], dim=1).to(torch.int32).contiguous()
