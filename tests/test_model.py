"""The decoder with every LoRA strategy against a float64 reference that merges each request's
adapter into the weights and recomputes the whole sequence (no KV cache), step after step of mixed
prefill, chunked prefill and decode."""

import dataclasses
import math
import random

import pytest
import torch

from lorabench.model import (
    BlockKVCache, CompressedLora, Decoder, Engine, PagePool, PagedKVCache, PagedLora, SeqWork, SingleLora, SlotLora,
    random_adapter, random_compressed, target_modules,
)
from lorabench.presets import model_preset

TINY = model_preset("tiny")
# Multi-head attention (kv_heads == heads): a paged KV token then needs two pages (K, V).
TINY_MHA = dataclasses.replace(TINY, name="tiny-mha", kv_heads=TINY.heads)
# One KV head: K and V of a token take half a page, so a paged KV page holds two tokens.
TINY_MQA = dataclasses.replace(TINY, name="tiny-mqa", kv_heads=1)


# ---- independent float64 reference --------------------------------------------------------------

def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w.double()


def _rope(x, theta):
    L, _, D = x.shape
    half = D // 2
    freq = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / D)
    ang = torch.arange(L, dtype=torch.float64)[:, None] * freq[None, :]
    c, s = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def reference_logits(model, tokens, delta):
    """Logits at the last token of `tokens`; delta(layer, module) -> float64 weight change or None."""
    s = model.shape
    L = len(tokens)
    x = model.embed[torch.tensor(tokens)].double()

    def W(i, m):
        w = model.layers[i][m].double()
        d = delta(i, m)
        return w if d is None else w + d

    causal = torch.tril(torch.ones(L, L, dtype=torch.bool))
    for i, w in enumerate(model.layers):
        h = _rms(x, w["attn_norm"], s.norm_eps)
        q = _rope((h @ W(i, "q_proj").T).view(L, s.heads, s.head_dim), s.rope_theta)
        k = _rope((h @ W(i, "k_proj").T).view(L, s.kv_heads, s.head_dim), s.rope_theta)
        v = (h @ W(i, "v_proj").T).view(L, s.kv_heads, s.head_dim)
        g = s.heads // s.kv_heads
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(s.head_dim)
        p = torch.softmax(scores.masked_fill(~causal, -math.inf), -1)
        x = x + torch.einsum("hqk,khd->qhd", p, v).reshape(L, -1) @ W(i, "o_proj").T
        h = _rms(x, w["mlp_norm"], s.norm_eps)
        x = x + (torch.nn.functional.silu(h @ W(i, "gate_proj").T) * (h @ W(i, "up_proj").T)) @ W(i, "down_proj").T
    return _rms(x[-1], model.final_norm, s.norm_eps) @ model.lm_head.double().T


def lora_delta(adapter):
    if adapter is None:
        return lambda i, m: None
    return lambda i, m: (adapter.scale * adapter.modules[m][1][i].double() @ adapter.modules[m][0][i].double()
                         if m in adapter.modules else None)


def compressed_delta(cw, idx):
    def delta(i, m):
        if m not in cw.modules:
            return None
        U, V, S, cluster_of = cw.modules[m]
        k = int(cluster_of[i, idx])
        Si = torch.diag(S[i, idx].double()) if S.dim() == 3 else S[i, idx].double()
        return U[i, k].double() @ Si @ V[i, k].double().T
    return delta


# ---- strategy setups: (engine, {adapter index -> float64 delta}) ---------------------------------

def build(strategy, shape, modules, kv_kind="block"):
    model = Decoder(shape, seed=1)
    dtype = model.dtype
    pool = None
    if strategy == "paged" or kv_kind == "paged":
        page = max([shape.hidden] + [max(shape.module_shape(m)) for m in modules])
        pool = PagePool(shape.layers, 600, page, dtype, "cpu")
        kv = PagedKVCache(pool, shape.kv_dim)
    else:
        kv = BlockKVCache(shape.layers, shape.kv_dim, num_blocks=40, block_size=4, dtype=dtype, device="cpu")
    ranks = [3, 5, 4]
    adapters = [random_adapter(shape, r, modules, seed=10 + j) for j, r in enumerate(ranks)]
    deltas = {-1: lora_delta(None)}
    if strategy == "none":
        lora = None
    elif strategy == "single":
        lora = SingleLora(adapters[0], "cpu", dtype)
        deltas = {-1: lora_delta(adapters[0])}
    elif strategy == "per-lora":
        lora = SlotLora(shape, modules, slots=4, max_rank=6, device="cpu", dtype=dtype)
        lora.load(3, adapters[2])  # then overwritten: stale rows of a larger rank must not leak
        for slot, a in zip([2, 0, 3], adapters):
            lora.load(slot, a)
            deltas[slot] = lora_delta(a)
    elif strategy == "paged":
        lora = PagedLora(pool, shape, modules, max_adapters=4, max_rank=6)
        lora.load(1, adapters[1])
        lora.evict(1)  # its pages go back to the pool and are reused
        for row, a in zip([1, 3, 0], adapters):
            lora.load(row, a)
            deltas[row] = lora_delta(a)
    else:
        cw = random_compressed(shape, n_adapters=5, rank=6, clusters=2, modules=modules,
                               diagonal=strategy == "compressed-diag", seed=5)
        for U, V, S, cluster_of in cw.modules.values():
            cluster_of[1] = 1 - cluster_of[0]  # clusters differ from layer to layer
        lora = CompressedLora(cw, "cpu", dtype)
        deltas.update({i: compressed_delta(cw, i) for i in range(5)})
    return Engine(model, kv, lora, attention_backend="torch"), deltas


def run_schedule(engine, deltas, schedule, adapter_of, seed=0):
    """schedule: steps, each [(seq_id, new tokens)]; compares logits at every step."""
    rng = random.Random(seed)
    history = {}
    checked = 0
    for step in schedule:
        seqs = []
        for sid, n in step:
            new = [rng.randrange(engine.model.shape.vocab) for _ in range(n)]
            history.setdefault(sid, []).extend(new)
            seqs.append(SeqWork(sid, new, adapter_of[sid]))
        fb = engine.prepare(seqs)
        logits = engine.model.forward(fb, engine.kv, engine.lora, engine.attention_backend)
        for b, i in enumerate(fb.order):
            sid = seqs[i].seq_id
            ref = reference_logits(engine.model, history[sid], deltas[adapter_of[sid]])
            torch.testing.assert_close(logits[b].double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
            checked += 1
    return checked


SCHEDULE = [
    [(0, 5), (1, 3), (2, 6)],  # prefill of three requests in one step
    [(0, 1), (1, 1), (2, 2), (3, 7)],  # decode, chunked prefill, and a new request, mixed
    [(0, 1), (1, 1), (2, 1), (3, 1)],
    [(3, 1), (2, 1), (1, 1), (0, 1)],
]


@pytest.mark.parametrize(
    "strategy,modules,shape,kv_kind",
    [
        ("single", "q_proj,k_proj,v_proj,o_proj", TINY, "block"),
        ("per-lora", "q_proj,k_proj,v_proj,o_proj", TINY, "block"),
        ("per-lora", "all-linear", TINY, "block"),
        ("paged", "q_proj,k_proj,v_proj,o_proj", TINY, "paged"),
        ("paged", "q_proj,k_proj,v_proj,o_proj", TINY_MHA, "paged"),
        ("paged", "q_proj,v_proj", TINY_MQA, "paged"),
        ("compressed", "all-linear", TINY, "block"),
        ("compressed-diag", "q_proj,v_proj", TINY, "block"),
    ],
)
def test_forward_matches_merged_reference(strategy, modules, shape, kv_kind):
    modules = target_modules(modules)
    engine, deltas = build(strategy, shape, modules, kv_kind)
    indices = sorted(deltas)
    adapter_of = {sid: indices[sid % len(indices)] for sid in range(4)}  # includes -1 (no adapter)
    assert run_schedule(engine, deltas, SCHEDULE, adapter_of) == 15


@pytest.mark.parametrize("strategy,shape,kv_kind", [
    ("per-lora", TINY, "block"), ("paged", TINY_MQA, "paged"), ("compressed", TINY, "block"), ("single", TINY, "block"),
])
def test_forward_through_the_triton_kernels(strategy, shape, kv_kind):
    """The same check with the strategy's Triton kernels (under the interpreter, fp32): the model
    hands them its per-layer views, tables and the step's LoraBatch correctly."""
    from lorabench.model.lora import lora_backend

    engine, deltas = build(strategy, shape, target_modules("q_proj,v_proj"), kv_kind)
    indices = sorted(deltas)
    adapter_of = {sid: indices[sid % len(indices)] for sid in range(3)}
    schedule = [[(0, 20), (1, 3), (2, 1)], [(0, 1), (1, 1), (2, 1)]]  # a segment of 20 tokens: several tiles
    with lora_backend("triton"):
        assert run_schedule(engine, deltas, schedule, adapter_of) == 6


def test_adapters_change_the_output():
    """Guard against a reference that would pass with LoRA silently ignored."""
    engine, deltas = build("per-lora", TINY, target_modules("q_proj,v_proj"))
    tokens = [1, 2, 3, 4]
    with_lora = reference_logits(engine.model, tokens, deltas[0])
    without = reference_logits(engine.model, tokens, deltas[-1])
    assert (with_lora - without).abs().max() > 1e-2 * without.abs().max()


@pytest.mark.parametrize("shape,kv_kind", [(TINY, "block"), (TINY_MHA, "paged"), (TINY_MQA, "paged")])
def test_kv_cache_decode_equals_recompute(shape, kv_kind):
    """Greedy decoding with the cache gives the logits of recomputing the whole sequence."""
    engine, _ = build("none", shape, target_modules("q_proj"), kv_kind)
    seq = [7, 3, 11, 5, 2]
    tok = engine.step([SeqWork(0, list(seq))])[0]
    for n in range(6):
        seq.append(tok)
        fb = engine.prepare([SeqWork(0, [tok])])
        cached = engine.model.forward(fb, engine.kv, None)[0]
        fresh_fb = engine.prepare([SeqWork(100 + n, list(seq))])
        fresh = engine.model.forward(fresh_fb, engine.kv, None)[0]
        engine.release(100 + n)
        torch.testing.assert_close(cached, fresh, rtol=1e-5, atol=1e-5)
        tok = int(cached.argmax())


def test_released_sequences_return_their_blocks():
    engine, _ = build("none", TINY, target_modules("q_proj"))
    free = engine.kv.num_free_tokens
    engine.step([SeqWork(0, [1] * 9), SeqWork(1, [2] * 3)])
    assert engine.kv.num_free_tokens == free - 12 - 4  # blocks of 4: 3 + 1 blocks
    engine.release(0), engine.release(1)
    assert engine.kv.num_free_tokens == free


def test_paged_kv_packs_tokens_into_pages():
    for shape, per_page, pages_per_token in [(TINY_MQA, 2, 1), (TINY, 1, 1), (TINY_MHA, 1, 2)]:
        engine, _ = build("none", shape, target_modules("q_proj"), "paged")
        free = engine.kv.pool.num_free
        engine.step([SeqWork(0, [1] * 9)])
        assert free - engine.kv.pool.num_free == -(-9 // per_page) * pages_per_token
        engine.release(0)
        assert engine.kv.pool.num_free == free


@pytest.mark.parametrize("shape", [TINY_MHA, TINY_MQA])
def test_triton_paged_decode_matches_torch(shape):
    model_engine, _ = build("none", shape, target_modules("q_proj"), "paged")
    lens = [1, 9, 33, 4]
    for sid, n in enumerate(lens):
        model_engine.step([SeqWork(sid, list(range(1, n + 1)))])
    kv = model_engine.kv
    kv.storage.normal_()  # fresh random K/V in every page
    from lorabench.model.attention import _decode_segmented
    from lorabench.model.batch import ForwardBatch
    from lorabench.model.paged_decode import paged_decode_attention

    fb = ForwardBatch.prepare(kv, [SeqWork(sid, [0]) for sid in range(len(lens))], "cpu", decode_tables=True)
    q = torch.randn(len(lens), shape.heads, shape.head_dim)
    want = _decode_segmented(q.double(), kv.storage[1].double(), fb, shape.kv_heads, kv.v_col)
    got = paged_decode_attention(q, kv.storage[1], fb.decode_k_table, fb.decode_v_table, fb.decode_ctx_lens,
                                 shape.kv_heads, kv.v_col)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", ["per-lora", "paged", "compressed"])
def test_padded_lora_batch_for_graphs_gives_the_same_delta(strategy):
    """A CUDA graph replays a LoraBatch padded to its bucket (empty trailing segments and tiles);
    the Triton kernels (here under the interpreter, fp32) must add the same delta on the real tokens."""
    from lorabench import kernels
    from lorabench.kernels import LoraBatch
    from lorabench.model.cuda_graphs import _padded_lora_batch

    torch.manual_seed(0)
    ids = torch.tensor([3, 1, 3, 0, 2, 3, 3, 1] * 3, dtype=torch.int32)  # 24 tokens: segmented kernels
    n, b, d = ids.numel(), 32, 16
    x = torch.randn(b, d)
    if strategy == "per-lora":
        A, B, scales = torch.randn(4, 5, d), torch.randn(4, 8, 5), torch.rand(4)
        op = lambda x, y, batch: kernels.lora_per_lora(x, y, A, B, scales, batch, variant="sgmv", backend="triton")  # noqa: E731
    elif strategy == "paged":
        pool, pages = torch.randn(40, d), torch.randperm(40)[:32].view(4, 8).int()
        ranks, scales = torch.tensor([3, 4, 2, 4], dtype=torch.int32), torch.rand(4)
        op = lambda x, y, batch: kernels.lora_paged(x, y, pool, pages[:, :4], pages[:, 4:], ranks, scales, batch,  # noqa: E731
                                                    backend="triton")
    else:
        U, V, S = torch.randn(2, 8, 6), torch.randn(2, d, 6), torch.randn(4, 6, 6)
        cluster_of = torch.tensor([0, 1, 1, 0])
        op = lambda x, y, batch: kernels.lora_compressed(x, y, U, V, S, cluster_of, batch, backend="triton")  # noqa: E731
    want = op(x[:n], torch.zeros(n, 8), LoraBatch.build(ids))
    padded = _padded_lora_batch(ids, b)
    assert padded.seg_starts.shape == (b + 1,) and padded.tiles.shape == (b + b // 16, 3)
    got = op(x, torch.zeros(b, 8), padded)
    torch.testing.assert_close(got[:n], want, rtol=1e-5, atol=1e-5)


def test_residency_loads_each_adapter_once_while_it_fits_and_evicts_lru():
    from lorabench.model.serving import ServingSetup, build_engine

    for strategy in ("per-lora", "paged"):
        setup = ServingSetup(TINY, strategy, ranks=(4, 8, 4, 2, 8), modules=target_modules("q_proj,v_proj"),
                             kv_tokens=64, slots=3)
        engine, res = build_engine(setup)
        assert res.pin([0, 1, 0]) == [res.index(0), res.index(1), res.index(0)]
        res.pin([2, 1])
        assert res.loads == 3
        res.pin([3])  # evicts adapter 0, the least recently used
        assert res.loads == 4
        res.pin([1, 2, 3])
        assert res.loads == 4
        res.pin([0])
        assert res.loads == 5
        with pytest.raises(Exception, match="slots"):
            res.pin([0, 1, 2, 3])
