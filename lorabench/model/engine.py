"""One model, its KV cache and a LoRA state: steps of mixed prefill and decode, greedy decoding.

`Engine.step` is what a serving loop calls; the measured executor splits it into `prepare` (host
work: KV reservation, packing, capturing a CUDA graph the first time a bucket is seen) and `run`
(the device work, the part that is timed).
"""

from __future__ import annotations

import torch

from .batch import ForwardBatch, SeqWork
from .cuda_graphs import DecodeGraphs
from .decoder import Decoder
from .kv_cache import KVCache
from .lora import LoraState


class Engine:
    def __init__(self, model: Decoder, kv: KVCache, lora: LoraState | None = None, attention_backend: str = "auto",
                 cuda_graphs: bool = False, max_context: int = 4096):
        """attention_backend: 'triton' (paged decode kernel; the default on CUDA) or 'torch'.
        cuda_graphs: replay decode-only steps as CUDA graphs (CUDA with the Triton backend only)."""
        if attention_backend == "auto":
            attention_backend = "triton" if model.device.type == "cuda" else "torch"
        self.model, self.kv, self.lora, self.attention_backend = model, kv, lora, attention_backend
        use_graphs = cuda_graphs and model.device.type == "cuda" and attention_backend == "triton"
        self.graphs = DecodeGraphs(self, max_context) if use_graphs else None

    def prepare(self, seqs: list[SeqWork]) -> ForwardBatch:
        fb = ForwardBatch.prepare(self.kv, seqs, self.model.device, decode_tables=self.attention_backend == "triton")
        if self.graphs is not None:
            self.graphs.ensure(fb)
        return fb

    @staticmethod
    def mode_of(fb: ForwardBatch) -> str:
        """'cuda-graph' when `run(fb)` replays a graph, else 'eager'."""
        return "cuda-graph" if fb.graph_bucket is not None else "eager"

    def forward_tokens(self, fb: ForwardBatch) -> torch.Tensor:
        """Greedy next token of each sequence (argmax over the logits), in batch order, on the device."""
        return self.model.forward(fb, self.kv, self.lora, self.attention_backend).argmax(-1)

    def run(self, fb: ForwardBatch) -> torch.Tensor:
        return self.graphs.run(fb) if fb.graph_bucket is not None else self.forward_tokens(fb)

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
