"""LoraBatch's segment tiles: what the segmented kernels launch over."""

import random

import pytest

from lorabench.kernels import LoraBatch
from lorabench.kernels.common import MAX_PARTIAL_READS, TARGET_PROGRAMS, split_k
from lorabench.kernels.metadata import choose_block_m


@pytest.mark.parametrize("block_m", [None, 16, 32, 64])
def test_tiles_cut_every_segment_into_blocks(block_m):
    n = random.randint(1, 12)
    ids = [random.choice(range(-1, n)) for _ in range(random.randint(0, 300))]
    batch = LoraBatch.build(ids, block_m=block_m)
    bm = batch.block_m
    covered = []
    for adapter, first, end in batch.tiles.tolist():
        assert 0 < end - first <= bm
        toks = batch.sorted_tokens[first:end].tolist()
        assert {ids[t] for t in toks} == {adapter}
        covered += range(first, end)
    assert covered == list(range(batch.num_adapter_tokens))  # each sorted position once, in order
    # ceil(len / bm) tiles per segment, and no more
    lengths = [ids.count(a) for a in sorted(set(ids) - {-1})]
    assert batch.num_tiles == sum(-(-length // bm) for length in lengths) == batch.tiles.shape[0]
    assert batch.max_adapter == max(ids, default=-1)


def test_block_m_follows_mean_segment_length():
    assert [choose_block_m(t, s) for t, s in [(0, 0), (1, 1), (16, 16), (340, 100), (100, 3), (1024, 8)]] == [
        16, 16, 16, 16, 64, 64,
    ]
    assert choose_block_m(60, 2) == 32
    with pytest.raises(ValueError, match="block_m must be"):
        LoraBatch.build([0, 1], block_m=24)


def test_to_moves_the_tiles():
    batch = LoraBatch.build([2, 2, 0, -1], block_m=16).to("cpu")
    assert batch.tiles.tolist() == [[0, 0, 1], [2, 1, 3]] and batch.num_tiles == 2 and batch.block_m == 16


@pytest.mark.parametrize("rows, d_in, block_k, partial", [(1, 4096, 128, 0), (24, 4096, 128, 0), (400, 4096, 128, 0),
                                                          (24, 4096, 128, 2 << 20), (3, 100, 32, 0)])
def test_split_k_covers_d_in(rows, d_in, block_k, partial):
    splits, k_per_split = split_k(rows, d_in, block_k, partial)
    assert k_per_split % block_k == 0
    assert (splits - 1) * k_per_split < d_in <= splits * k_per_split  # every split has work, all of d_in covered
    assert splits * rows <= max(TARGET_PROGRAMS, rows) + rows  # about TARGET_PROGRAMS programs, never far more
    if partial:
        assert splits <= max(1, MAX_PARTIAL_READS // partial)
