"""What one forward step needs, built once per step and read by every layer.

`ForwardBatch.prepare` takes the sequences of a step (new tokens, adapter), reserves their KV-cache
room, orders them decode-first (so decode attention works on one contiguous prefix), and packs
positions, cache rows and the `LoraBatch` on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorabench.kernels import LoraBatch

from .kv_cache import KVCache


@dataclass(frozen=True)
class SeqWork:
    """One sequence's share of a step: its new tokens (a prefill chunk, or 1 when decoding) and the
    LoRA index its tokens use (slot, page-table row or adapter index; -1 for none)."""

    seq_id: int
    tokens: list[int]
    adapter: int = -1


@dataclass
class ForwardBatch:
    order: list[int]  # order[b] = index, in the caller's list, of the b-th sequence here
    num_decode: int  # the first num_decode sequences decode one token each
    cu_q: list[int]  # (B + 1) token offsets of each sequence's new tokens
    cu_ctx: list[int]  # (B + 1) offsets of each sequence's context in the packed context rows
    input_ids: torch.Tensor  # (T,)
    positions: torch.Tensor  # (T,)
    new_k_rows: torch.Tensor  # (T,) where this step's K and V are written
    new_v_rows: torch.Tensor
    ctx_k_rows: torch.Tensor  # (sum of context lengths,) rows read by attention
    ctx_v_rows: torch.Tensor
    decode_ctx_seq: torch.Tensor  # (cu_ctx[num_decode],) decode sequence of each context row
    last_token: torch.Tensor  # (B,) index of each sequence's last new token
    lora: LoraBatch
    decode_k_table: torch.Tensor | None = None  # (num_decode, max context) rows, for the Triton kernel
    decode_v_table: torch.Tensor | None = None
    decode_ctx_lens: torch.Tensor | None = None
    graph_bucket: int | None = None  # set when the step replays a CUDA graph (cuda_graphs.py)
    graph_lora: LoraBatch | None = None  # the LoRA metadata padded to that graph's bucket (host)

    @property
    def num_seqs(self) -> int:
        return len(self.order)

    @property
    def num_tokens(self) -> int:
        return self.cu_q[-1]

    @classmethod
    def prepare(cls, kv: KVCache, seqs: list[SeqWork], device, decode_tables: bool = False) -> "ForwardBatch":
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].tokens) != 1)
        ordered = [seqs[i] for i in order]
        num_decode = sum(len(s.tokens) == 1 for s in ordered)
        q_lens = torch.tensor([len(s.tokens) for s in ordered], dtype=torch.int64)
        past = torch.tensor([kv.length(s.seq_id) for s in ordered], dtype=torch.int64)
        ctx = past + q_lens
        for s, c in zip(ordered, ctx.tolist()):
            kv.reserve(s.seq_id, c)
        ids = [s.seq_id for s in ordered]
        k_rows, v_rows = kv.rows(ids, torch.zeros_like(ctx), ctx)
        cu_q = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(q_lens, 0)])
        cu_ctx = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(ctx, 0)])
        seq_of_ctx = torch.repeat_interleave(torch.arange(len(ordered)), ctx)
        is_new = torch.arange(int(cu_ctx[-1])) - cu_ctx[seq_of_ctx] >= past[seq_of_ctx]
        seq_of_tok = torch.repeat_interleave(torch.arange(len(ordered)), q_lens)
        positions = torch.arange(int(cu_q[-1])) - cu_q[seq_of_tok] + past[seq_of_tok]
        tokens = [t for s in ordered for t in s.tokens]
        adapters = torch.repeat_interleave(torch.tensor([s.adapter for s in ordered], dtype=torch.int32), q_lens)
        to = dict(device=device)
        fb = cls(
            order=order,
            num_decode=num_decode,
            cu_q=cu_q.tolist(),
            cu_ctx=cu_ctx.tolist(),
            input_ids=torch.tensor(tokens, dtype=torch.int64, **to),
            positions=positions.to(**to),
            new_k_rows=k_rows[is_new].to(**to),
            new_v_rows=v_rows[is_new].to(**to),
            ctx_k_rows=k_rows.to(**to),
            ctx_v_rows=v_rows.to(**to),
            decode_ctx_seq=seq_of_ctx[: int(cu_ctx[num_decode])].to(**to),
            last_token=(cu_q[1:] - 1).to(**to),
            lora=LoraBatch.build(adapters).to(device),
        )
        if decode_tables and num_decode:
            n = int(cu_ctx[num_decode])
            lens = ctx[:num_decode].tolist()
            pad = torch.nn.utils.rnn.pad_sequence
            fb.decode_k_table = pad(list(torch.split(k_rows[:n], lens)), batch_first=True).to(**to)
            fb.decode_v_table = pad(list(torch.split(v_rows[:n], lens)), batch_first=True).to(**to)
            fb.decode_ctx_lens = ctx[:num_decode].to(dtype=torch.int32, **to)
        return fb
