"""One model, its KV cache and a LoRA state: steps of mixed prefill and decode, greedy decoding.

`Engine.step` is what a serving loop calls; the measured executor splits it into `prepare` (host
work: KV reservation, packing) and `run` (device work, the part that is timed).
"""

from __future__ import annotations

import torch

from .batch import ForwardBatch, SeqWork
from .decoder import Decoder
from .kv_cache import KVCache
from .lora import LoraState


class Engine:
    def __init__(self, model: Decoder, kv: KVCache, lora: LoraState | None = None, attention_backend: str = "auto"):
        if attention_backend == "auto":
            attention_backend = "triton" if model.device.type == "cuda" else "torch"
        self.model, self.kv, self.lora, self.attention_backend = model, kv, lora, attention_backend

    def prepare(self, seqs: list[SeqWork]) -> ForwardBatch:
        return ForwardBatch.prepare(self.kv, seqs, self.model.device, decode_tables=self.attention_backend == "triton")

    def run(self, fb: ForwardBatch) -> torch.Tensor:
        """Next token of each sequence (greedy argmax over the logits), in batch order, on the device."""
        return self.model.forward(fb, self.kv, self.lora, self.attention_backend).argmax(-1)

    def step(self, seqs: list[SeqWork]) -> list[int]:
        """Next token of each sequence, in the order given."""
        fb = self.prepare(seqs)
        tokens = self.run(fb).tolist()
        out = [0] * len(seqs)
        for b, i in enumerate(fb.order):
            out[i] = tokens[b]
        return out

    def release(self, seq_id: int) -> None:
        self.kv.release(seq_id)
