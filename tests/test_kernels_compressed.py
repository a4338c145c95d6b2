"""Compressed kernels (shared U, V per cluster; full or diagonal S_i) against the float64 reference."""

import random

import pytest
import torch

from lorabench.kernels import LoraBatch, lora_compressed
from lorabench.kernels.compressed import compressed_lora
from lorabench.kernels.testing import (
    assert_matches, compressed_problem, device_under_test, id_cases, kernel_test_dtypes, workspace_poisoned,
)

DEVICE = device_under_test()
N = 9
CASES = list(id_cases(N, torch.Generator().manual_seed(0)))


def _problem(case, dtype, clusters=1, width=24, diagonal=False, d_in=72, d_out=40, block_m=16):
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    ids = id_cases(N, gen)[case]
    return compressed_problem(ids, N, clusters, width, diagonal, d_in, d_out, dtype, DEVICE, gen, block_m=block_m)


def _check(p, got):
    assert_matches(got, p.expected(), p.op)
    untouched = p.batch.token_adapters < 0
    assert torch.equal(got[untouched], p.inputs["y"][untouched])


def _run_kernel(p, dense="triton"):
    inputs = p.fresh_y()
    scratch = workspace_poisoned(1 << 16, torch.float32 if dense == "triton" else p.inputs["x"].dtype, DEVICE)
    out = compressed_lora(**inputs, batch=p.batch, workspace_buffer=scratch, dense=dense)
    assert out is inputs["y"]
    return out


@pytest.mark.parametrize("dense", ["triton", "torch"])
@pytest.mark.parametrize("dtype", kernel_test_dtypes())
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference(dense, dtype, case):
    _check(p := _problem(case, dtype), _run_kernel(p, dense))


@pytest.mark.parametrize(
    "clusters, width, diagonal, block_m",
    [
        (1, 16, True, 16),  # diagonal S
        (3, 24, False, 32),  # several clusters, R not a power of two
        (4, 20, True, 64),  # several clusters, diagonal
        (2, 100, False, 16),  # a wider R: S_i in two column chunks, the second ragged
    ],
)
@pytest.mark.parametrize("dense", ["triton", "torch"])
def test_kernel_clusters_and_variants(clusters, width, diagonal, block_m, dense):
    p = _problem("mixed-with-none", torch.float32, clusters, width, diagonal, block_m=block_m)
    _check(p, _run_kernel(p, dense))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("case", ["one-token", "empty", "mixed-with-none"])
def test_torch_path_matches_reference(dtype, diagonal, case):
    p = _problem(case, dtype, clusters=2, diagonal=diagonal)
    _check(p, lora_compressed(**p.fresh_y(), batch=p.batch, backend="torch"))


def test_dispatch_runs_triton():
    p = _problem("all-different", torch.float32, clusters=2)
    _check(p, lora_compressed(**p.fresh_y(), batch=p.batch, backend="triton"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_inputs_raise(backend):
    p = _problem("mixed-with-none", torch.float32, clusters=2)
    inp = p.inputs

    def call(**kw):
        return lora_compressed(**(p.fresh_y() | {"batch": p.batch} | kw), backend=backend)

    with pytest.raises(ValueError, match="adapter id 9 out of range: S holds 9"):
        call(batch=LoraBatch.build([9] * inp["x"].shape[0]).to(DEVICE))
    with pytest.raises(ValueError, match="cluster_of holds 2, outside \\[0, 1\\]"):
        call(cluster_of=torch.full((N,), 2, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="S has shape"):
        call(S=inp["S"][:, :, :5])
    with pytest.raises(ValueError, match="U has shape"):
        call(U=inp["U"][:1])
    with pytest.raises(ValueError, match="R \\(V.shape\\[2\\]\\) is 200, larger than the kernels allow"):
        call(U=torch.zeros(2, 40, 200, device=DEVICE), V=torch.zeros(2, 72, 200, device=DEVICE),
             S=torch.zeros(N, 200, device=DEVICE))
    with pytest.raises(ValueError, match="cluster_of must be an integer tensor"):
        call(cluster_of=inp["cluster_of"].float())


def test_in_place_change_of_clusters_is_checked_again():
    p = _problem("mixed-with-none", torch.float32, clusters=2)
    cluster_of = p.inputs["cluster_of"]
    lora_compressed(**p.fresh_y(), batch=p.batch, backend="triton")
    cluster_of[int(p.batch.seg_adapters[0])] = 7  # the tables' check is cached per tensor version
    with pytest.raises(ValueError, match="cluster_of holds 7"):
        lora_compressed(**p.fresh_y(), batch=p.batch, backend="triton")
