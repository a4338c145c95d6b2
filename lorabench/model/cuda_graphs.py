"""Decode steps replayed as CUDA graphs captured per bucketed batch size, as serving engines do, so
Python launch cost does not dominate what is measured.

A decode-only batch of B sequences runs in the graph of the smallest bucket >= B. The graph reads
static buffers: token ids, positions, KV rows to write, each sequence's row table and length (the
Triton paged-decode kernel loops to each sequence's own length), and a `LoraBatch` padded to the
bucket (padding tokens on adapter 0, unused segments and tiles empty). Padding sequences write and read a
scratch KV row. Whatever cannot be captured (a LoRA op that synchronizes, a batch with tokens
without adapter, a context longer than the tables) runs eagerly; `ForwardBatch.graph_bucket`
says which ran.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from lorabench.kernels import LoraBatch

from .batch import ForwardBatch

SCRATCH_SEQ = -1  # KV-cache sequence id of the scratch row padding sequences use

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512)


class DecodeGraphs:
    def __init__(self, engine, max_context: int, buckets=DEFAULT_BUCKETS):
        self.engine, self.max_context, self.buckets = engine, max_context, tuple(sorted(buckets))
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, ForwardBatch, torch.Tensor]] = {}
        self._pool = None
        self.disabled_reason: str | None = None
        engine.kv.reserve(SCRATCH_SEQ, 1)
        rows = engine.kv.rows([SCRATCH_SEQ], torch.zeros(1, dtype=torch.int64), torch.ones(1, dtype=torch.int64))
        self._scratch_row = int(rows[0][0])

    def _bucket(self, fb: ForwardBatch) -> int | None:
        """The bucket a batch can replay in, or None when it must run eagerly."""
        if self.disabled_reason or fb.num_decode != fb.num_seqs or fb.decode_k_table is None:
            return None
        if fb.decode_k_table.shape[1] > self.max_context or bool((fb.lora.token_adapters < 0).any()):
            return None
        return next((b for b in self.buckets if b >= fb.num_seqs), None)

    def ensure(self, fb: ForwardBatch) -> None:
        """Choose the batch's graph, capturing it the first time its bucket is seen, and prepare the
        padded LoRA metadata; all host work, outside any timed region. Sets fb.graph_bucket."""
        b = self._bucket(fb)
        if b is not None and b not in self._graphs:
            self._capture(b)
        if b is not None and b in self._graphs:
            fb.graph_bucket, fb.graph_lora = b, _padded_lora_batch(fb.lora.token_adapters, b)

    def _capture(self, b: int) -> None:
        static = self._static_batch(b)
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm up (Triton compiles) outside the capture
                self.engine.forward_tokens(static)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self.engine.forward_tokens(static)
            self._pool = graph.pool()
            self._graphs[b] = (graph, static, out)
        except Exception as err:  # noqa: BLE001 - any capture failure means: run eagerly, and say why
            self.disabled_reason = f"{type(err).__name__}: {err}".splitlines()[0][:200]
            torch.cuda.synchronize()  # the failed capture has ended; later work runs eagerly

    def run(self, fb: ForwardBatch) -> torch.Tensor:
        """Next tokens (B,) of a batch `ensure` gave a graph: fill the static inputs, replay."""
        graph, static, out = self._graphs[fb.graph_bucket]
        n, L = fb.num_seqs, fb.decode_k_table.shape[1]
        static.input_ids[:n].copy_(fb.input_ids)
        static.positions[:n].copy_(fb.positions)
        static.new_k_rows[:n].copy_(fb.new_k_rows)
        static.new_v_rows[:n].copy_(fb.new_v_rows)
        static.decode_k_table[:n, :L].copy_(fb.decode_k_table)
        static.decode_v_table[:n, :L].copy_(fb.decode_v_table)
        static.decode_ctx_lens[:n].copy_(fb.decode_ctx_lens)
        static.input_ids[n:].fill_(0)
        static.positions[n:].fill_(0)
        static.new_k_rows[n:].fill_(self._scratch_row)
        static.new_v_rows[n:].fill_(self._scratch_row)
        static.decode_ctx_lens[n:].fill_(1)
        for name in ("token_adapters", "sorted_tokens", "seg_starts", "seg_adapters", "tiles"):
            getattr(static.lora, name).copy_(getattr(fb.graph_lora, name), non_blocking=True)
        graph.replay()
        return out[:n]

    def _static_batch(self, b: int) -> ForwardBatch:
        dev = self.engine.model.device
        zeros = lambda *shape, dtype=torch.int64: torch.zeros(*shape, dtype=dtype, device=dev)  # noqa: E731
        rows = torch.full((b, self.max_context), self._scratch_row, dtype=torch.int64, device=dev)
        return ForwardBatch(
            order=list(range(b)), num_decode=b, cu_q=list(range(b + 1)), cu_ctx=[0] * (b + 1),
            input_ids=zeros(b), positions=zeros(b),
            new_k_rows=torch.full((b,), self._scratch_row, device=dev), new_v_rows=torch.full((b,), self._scratch_row, device=dev),
            ctx_k_rows=zeros(0), ctx_v_rows=zeros(0), decode_ctx_seq=zeros(0), last_token=torch.arange(b, device=dev),
            lora=_padded_lora_batch(torch.zeros(b, dtype=torch.int32), b).to(dev),
            decode_k_table=rows, decode_v_table=rows.clone(), decode_ctx_lens=torch.ones(b, dtype=torch.int32, device=dev),
        )


GRAPH_BLOCK_M = 16  # segment-tile height of graph-replayed batches (decode: short segments)


def _padded_lora_batch(token_adapters: torch.Tensor, b: int) -> LoraBatch:
    """The LoraBatch of `token_adapters` padded to b tokens (padding on adapter 0), b segments
    (trailing ones empty) and the most segment tiles b tokens can need (trailing ones empty), with
    a fixed tile height, so that one bucket's tensors and launch sizes never change."""
    ids = torch.zeros(b, dtype=torch.int32)
    ids[: token_adapters.numel()] = token_adapters.cpu()
    lb = LoraBatch.build(ids, block_m=GRAPH_BLOCK_M)
    s = lb.num_segments
    seg_starts = torch.full((b + 1,), b, dtype=torch.int32)
    seg_starts[: s + 1] = lb.seg_starts
    seg_adapters = torch.zeros(b, dtype=torch.int32)
    seg_adapters[:s] = lb.seg_adapters
    cap = b + -(-b // GRAPH_BLOCK_M)  # sum over segments of ceil(len / block_m) <= segments + b / block_m
    tiles = torch.zeros(cap, 3, dtype=torch.int32)  # (adapter 0, first 0, end 0): a tile of no tokens
    tiles[: lb.num_tiles] = lb.tiles
    return replace(lb, seg_starts=seg_starts, seg_adapters=seg_adapters, max_seg_len=b, tiles=tiles, num_tiles=cap)
