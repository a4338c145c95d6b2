"""Per-batch LoRA metadata, built once per step and read by every layer's kernels.

Tokens are grouped by adapter so that segmented kernels load each adapter's weights once per
segment. Tokens without an adapter (id -1) belong to no segment and are left untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoraBatch:
    """Token -> adapter map of one batch, sorted into same-adapter segments.

    token_adapters: (M,) int32, adapter (slot) id of each token in batch order; -1 = no adapter.
    sorted_tokens:  (T,) int32, indices of the T tokens that have an adapter, grouped by adapter
                    (stable: batch order within a segment).
    seg_starts:     (S + 1,) int32, segment s covers sorted_tokens[seg_starts[s]:seg_starts[s+1]].
    seg_adapters:   (S,) int32, the adapter of each segment (ascending, no -1).
    max_seg_len:    longest segment, in tokens (a Python int: kernels size their grids by it).
    """

    token_adapters: torch.Tensor
    sorted_tokens: torch.Tensor
    seg_starts: torch.Tensor
    seg_adapters: torch.Tensor
    max_seg_len: int

    @property
    def num_tokens(self) -> int:
        return self.token_adapters.numel()

    @property
    def num_segments(self) -> int:
        return self.seg_adapters.numel()

    @classmethod
    def build(cls, token_adapters: torch.Tensor | list[int]) -> "LoraBatch":
        ids = torch.as_tensor(token_adapters, dtype=torch.int32)
        if ids.dim() != 1:
            raise ValueError(f"token_adapters must be 1-D (one id per token), got shape {tuple(ids.shape)}")
        if ids.numel() and int(ids.min()) < -1:
            raise ValueError(f"token_adapters holds {int(ids.min())}; ids are >= 0, or -1 for no adapter")
        device = ids.device
        with_adapter = torch.nonzero(ids >= 0).flatten()
        order = torch.argsort(ids[with_adapter], stable=True)
        sorted_tokens = with_adapter[order].to(torch.int32)
        seg_adapters, counts = torch.unique_consecutive(ids[sorted_tokens.long()], return_counts=True)
        seg_starts = torch.zeros(seg_adapters.numel() + 1, dtype=torch.int32, device=device)
        seg_starts[1:] = torch.cumsum(counts, 0)
        return cls(
            token_adapters=ids,
            sorted_tokens=sorted_tokens,
            seg_starts=seg_starts,
            seg_adapters=seg_adapters.to(torch.int32),
            max_seg_len=int(counts.max()) if counts.numel() else 0,
        )

    def to(self, device: torch.device | str) -> "LoraBatch":
        return LoraBatch(
            self.token_adapters.to(device),
            self.sorted_tokens.to(device),
            self.seg_starts.to(device),
            self.seg_adapters.to(device),
            self.max_seg_len,
        )
