"""Paged (S-LoRA) kernels and dispatch against the float64 reference, heterogeneous ranks included."""

import random

import pytest
import torch

from lorabench.kernels import LoraBatch, lora_paged
from lorabench.kernels.paged import paged_lora
from lorabench.kernels.testing import (
    assert_matches, device_under_test, id_cases, kernel_test_dtypes, paged_problem, workspace_poisoned,
)

DEVICE = device_under_test()
RANKS = [3, 8, 5, 16, 1, 7, 12, 2, 0]  # heterogeneous, mostly not powers of two; one adapter of rank 0
CASES = list(id_cases(len(RANKS), torch.Generator().manual_seed(0)))


def _problem(case, dtype, d_in=72, d_out=40, page_size=80, ranks=RANKS, block_m=16):
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    ids = id_cases(len(ranks), gen)[case]
    return paged_problem(ids, ranks, d_in, d_out, page_size, dtype, DEVICE, gen, block_m=block_m)


def _check(p, got):
    assert_matches(got, p.expected(), p.op)
    untouched = p.batch.token_adapters < 0
    assert torch.equal(got[untouched], p.inputs["y"][untouched])


@pytest.mark.parametrize("dtype", kernel_test_dtypes())
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference(dtype, case):
    p = _problem(case, dtype)
    inputs = p.fresh_y()
    out = paged_lora(**inputs, batch=p.batch, workspace_buffer=workspace_poisoned(1 << 14, torch.float32, DEVICE))
    assert out is inputs["y"]
    _check(p, out)


@pytest.mark.parametrize(
    "d_in, d_out, page_size, block_m",
    [
        (96, 40, 96, 32),  # k/v-like module: d_out below the page size uses a page prefix
        (40, 96, 96, 64),  # d_in below the page size
        (130, 70, 130, 16),  # several blocks, ragged last block
    ],
)
def test_kernel_page_prefix_and_dims(d_in, d_out, page_size, block_m):
    p = _problem("mixed-with-none", torch.float32, d_in, d_out, page_size, block_m=block_m)
    inputs = p.fresh_y()
    _check(p, paged_lora(**inputs, batch=p.batch))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["one-token", "empty", "all-different", "mixed-with-none"])
def test_torch_path_matches_reference(dtype, case):
    p = _problem(case, dtype)
    _check(p, lora_paged(**p.fresh_y(), batch=p.batch, backend="torch"))


def test_dispatch_runs_triton():
    p = _problem("all-different", torch.float32)
    _check(p, lora_paged(**p.fresh_y(), batch=p.batch, backend="triton"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_inputs_raise(backend):
    p = _problem("mixed-with-none", torch.float32, ranks=[2, 4, 3])
    inp = p.inputs

    def call(**kw):
        return lora_paged(**(p.fresh_y() | {"batch": p.batch} | kw), backend=backend)

    with pytest.raises(ValueError, match="adapter id 3 out of range: the page table holds 3"):
        call(batch=LoraBatch.build([3] * inp["x"].shape[0]).to(DEVICE))
    with pytest.raises(ValueError, match="ranks .* holds 5, outside \\[0, 4\\]"):
        call(ranks=torch.tensor([2, 5, 3], dtype=torch.int32, device=DEVICE))
    bad_pages = inp["a_pages"].clone()
    bad_pages[1, 0] = inp["pool"].shape[0]
    with pytest.raises(ValueError, match="a_pages \\(page numbers\\) holds"):
        call(a_pages=bad_pages)
    with pytest.raises(ValueError, match="pool pages hold 40 values, fewer than d_in=72"):
        call(pool=inp["pool"][:, :40])
    with pytest.raises(ValueError, match="b_pages has shape"):
        call(b_pages=inp["b_pages"][:, :2])
    with pytest.raises(ValueError, match="page table width .* larger than the kernels allow"):
        wide = torch.zeros(3, 200, dtype=torch.int32, device=DEVICE)
        call(a_pages=wide, b_pages=wide)
