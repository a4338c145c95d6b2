import random

import pytest
import torch

from lorabench.kernels import LoraBatch
from lorabench.kernels import reference


def test_segments_group_tokens_by_adapter():
    ids = [random.choice([-1, 0, 1, 2, 5]) for _ in range(200)]
    batch = LoraBatch.build(ids)
    seen = []
    for s in range(batch.num_segments):
        toks = batch.sorted_tokens[batch.seg_starts[s] : batch.seg_starts[s + 1]].tolist()
        assert toks == sorted(toks)  # stable within a segment
        assert {ids[t] for t in toks} == {int(batch.seg_adapters[s])}
        seen += toks
    assert sorted(seen) == [t for t, i in enumerate(ids) if i >= 0]
    assert batch.seg_adapters.tolist() == sorted(set(ids) - {-1})
    assert batch.max_seg_len == max((ids.count(a) for a in set(ids) - {-1}), default=0)


def test_empty_and_all_unadapted_batches():
    for ids in ([], [-1, -1, -1]):
        batch = LoraBatch.build(ids)
        assert batch.num_segments == 0 and batch.max_seg_len == 0
        assert batch.seg_starts.tolist() == [0]


def test_bad_ids_rejected():
    with pytest.raises(ValueError, match="-1 for no adapter"):
        LoraBatch.build([0, -2])
    with pytest.raises(ValueError, match="1-D"):
        LoraBatch.build(torch.zeros(2, 2, dtype=torch.int32))


def test_per_lora_reference_matches_per_token_loop():
    torch.manual_seed(random.randrange(2**31))
    slots, r, d_in, d_out, m = 5, 3, 7, 6, 40
    x = torch.randn(m, d_in, dtype=torch.float64)
    A = torch.randn(slots, r, d_in, dtype=torch.float64)
    B = torch.randn(slots, d_out, r, dtype=torch.float64)
    scales = torch.rand(slots, dtype=torch.float64)
    ids = torch.randint(-1, slots, (m,))
    y0 = torch.randn(m, d_out, dtype=torch.float64)
    y = reference.per_lora(x, y0.clone(), A, B, scales, LoraBatch.build(ids))
    for t in range(m):
        i = int(ids[t])
        want = y0[t] + (scales[i] * B[i] @ (A[i] @ x[t]) if i >= 0 else 0)
        torch.testing.assert_close(y[t], want)
