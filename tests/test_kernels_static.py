"""Static batches (shapes and grids fixed by the token count, for CUDA graphs) and copy_ between
them: what a captured graph replays with another batch's adapters."""

import dataclasses
import random

import pytest
import torch

from lorabench.kernels import LoraBatch
from lorabench.kernels.bgmv import bgmv_lora
from lorabench.kernels.compressed import compressed_lora
from lorabench.kernels.paged import paged_lora
from lorabench.kernels.sgmv import sgmv_lora
from lorabench.kernels.testing import (
    assert_matches, compressed_problem, device_under_test, paged_problem, per_lora_problem, workspace_poisoned,
    zipf_ids,
)

DEVICE = device_under_test()
N, M, D_IN, D_OUT = 6, 40, 72, 40


def _problem(op, ids, gen):
    if op in ("sgmv", "bgmv"):
        return per_lora_problem(ids, N, D_IN, D_OUT, 5, torch.float32, DEVICE, gen, static=True)
    if op == "paged":
        return paged_problem(ids, [3, 8, 5, 1, 7, 2], D_IN, D_OUT, D_IN, torch.float32, DEVICE, gen, static=True)
    return compressed_problem(ids, N, 1, 24, False, D_IN, D_OUT, torch.float32, DEVICE, gen, static=True)


def _guarded(t):
    """t as a view into a NaN-filled buffer one entry larger on each side: reading t[-1] (a token
    without adapter taken for slot -1) or t[len] gives NaN, which the result then shows."""
    buf = torch.full((t.shape[0] + 2, *t.shape[1:]), float("nan"), dtype=t.dtype, device=t.device)
    buf[1:-1] = t
    return buf[1:-1]


KERNELS = {"sgmv": sgmv_lora, "bgmv": bgmv_lora, "paged": paged_lora, "compressed": compressed_lora}


@pytest.mark.parametrize("op", KERNELS)
def test_kernels_on_a_static_batch_and_after_copy(op):
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    first = zipf_ids(M, N, 1.0, gen, p_none=0.2).tolist()
    second = [N - 1] * (M // 2) + [-1] * (M - M // 2)  # another mix: one long segment, many without
    p = _problem(op, first, gen)
    guarded = {k: _guarded(v) if k in ("A", "B", "scales", "S") else v for k, v in p.inputs.items()}
    p = dataclasses.replace(p, inputs=guarded)
    batch = p.batch
    assert batch.static and batch.num_tiles == M and batch.sorted_tokens.numel() == M

    for ids in (first, second):
        if ids is second:
            batch.copy_(LoraBatch.build(torch.tensor(ids, dtype=torch.int32, device=DEVICE), static=True))
        want = dataclasses.replace(p, batch=LoraBatch.build(ids)).expected()
        scratch = workspace_poisoned(1 << 16, torch.float32, DEVICE)
        got = KERNELS[op](**p.fresh_y(), batch=batch, workspace_buffer=scratch)
        assert_matches(got, want, op)
        untouched = torch.tensor(ids, device=DEVICE) < 0
        assert torch.equal(got[untouched], p.inputs["y"][untouched])


def test_static_layout_and_copy_errors():
    batch = LoraBatch.build([2, -1, 2, 0, -1], static=True)
    assert batch.sorted_tokens.tolist() == [3, 0, 2, 1, 4]  # adapter tokens by adapter, then the rest
    assert batch.tiles.tolist() == [[0, 0, 1], [2, 1, 3], [0, 0, 0], [0, 0, 0], [0, 0, 0]]  # padded to 5 tiles
    assert batch.block_m == 16 and not batch.all_adapted
    batch.copy_(LoraBatch.build([1, 1, 1, 1, 1], static=True))
    assert batch.seg_adapters.tolist() == [1] and batch.max_adapter == 1 and batch.tiles[0].tolist() == [1, 0, 5]
    with pytest.raises(ValueError, match="copy_ needs two static batches"):
        batch.copy_(LoraBatch.build([1, 1, 1, 1, 1]))
    with pytest.raises(ValueError, match="copy_ needs batches of one size"):
        batch.copy_(LoraBatch.build([1, 1], static=True))
