"""Per-lora kernels (sgmv, bgmv) and the per-lora dispatch against the float64 reference."""

import random

import pytest
import torch

from lorabench.kernels import LoraBatch, lora_per_lora
from lorabench.kernels.bgmv import bgmv_lora
from lorabench.kernels.sgmv import sgmv_lora
from lorabench.kernels.testing import (
    assert_matches, id_cases, kernel_test_dtypes, per_lora_problem, device_under_test, workspace_poisoned,
)

DEVICE = device_under_test()
KERNEL_DTYPES = kernel_test_dtypes()
TORCH_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

SLOTS = 9
CASES = list(id_cases(SLOTS, torch.Generator().manual_seed(0)))
KERNELS = {"sgmv": sgmv_lora, "bgmv": bgmv_lora}


def _problem(case, dtype, r=5, d_in=72, d_out=40, block_m=16):
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    ids = id_cases(SLOTS, gen)[case]
    return per_lora_problem(ids, SLOTS, d_in, d_out, r, dtype, DEVICE, gen, block_m=block_m)


def _check(p, got, y_before):
    assert_matches(got, p.expected(), p.op)
    untouched = p.batch.token_adapters < 0
    assert torch.equal(got[untouched], y_before[untouched])  # rows without adapter: bit for bit


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference(kernel, dtype, case):
    p = _problem(case, dtype)
    inputs = p.fresh_y()
    out = KERNELS[kernel](**inputs, batch=p.batch, workspace_buffer=workspace_poisoned(1 << 14, torch.float32, DEVICE))
    assert out is inputs["y"]
    _check(p, out, p.inputs["y"])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("r, d_in, d_out, block_m", [(3, 40, 96, 32), (16, 96, 33, 64), (12, 130, 70, 16)])
def test_kernel_ranks_and_dims(kernel, r, d_in, d_out, block_m):
    """Ranks not powers of two (and 16), d not multiples of the blocks, tiles of every height."""
    p = _problem("mixed-with-none", torch.float32, r=r, d_in=d_in, d_out=d_out, block_m=block_m)
    inputs = p.fresh_y()
    _check(p, KERNELS[kernel](**inputs, batch=p.batch), p.inputs["y"])


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
@pytest.mark.parametrize("case", ["one-token", "empty", "all-different", "mixed-with-none"])
def test_torch_path_matches_reference(dtype, case):
    p = _problem(case, dtype)
    inputs = p.fresh_y()
    _check(p, lora_per_lora(**inputs, batch=p.batch, backend="torch"), p.inputs["y"])


@pytest.mark.parametrize("variant", ["auto", "sgmv", "bgmv"])
def test_dispatch_variants(variant):
    p = _problem("mixed-with-none", torch.float32)
    inputs = p.fresh_y()
    _check(p, lora_per_lora(**inputs, batch=p.batch, variant=variant, backend="triton"), p.inputs["y"])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_inputs_raise(backend):
    p = _problem("mixed-with-none", torch.float32, r=4, d_in=40, d_out=40)
    x, y, A, B, scales = (p.inputs[k] for k in ("x", "y", "A", "B", "scales"))

    def call(**kw):
        args = dict(x=x, y=y.clone(), A=A, B=B, scales=scales, batch=p.batch) | kw
        return lora_per_lora(**args, backend=backend)

    with pytest.raises(ValueError, match="adapter id 9 out of range: A \\(slots\\) holds 9"):
        call(batch=LoraBatch.build([9] * x.shape[0]).to(DEVICE))
    with pytest.raises(ValueError, match="B has shape"):
        call(B=B[:, :, :3])
    with pytest.raises(ValueError, match="A has shape"):
        call(A=A[:, :, :39])
    with pytest.raises(ValueError, match="rank \\(A.shape\\[1\\]\\) is 200, larger than the kernels allow"):
        call(A=torch.zeros(SLOTS, 200, 40, device=DEVICE), B=torch.zeros(SLOTS, 40, 200, device=DEVICE))
    with pytest.raises(ValueError, match="y has dtype"):
        call(y=y.half())
    with pytest.raises(ValueError, match="batch has 3 tokens but x has"):
        call(batch=LoraBatch.build([0, 1, 2]).to(DEVICE))
    with pytest.raises(ValueError, match="scales has shape"):
        call(scales=scales[:-1])
    with pytest.raises(ValueError, match="variant must be one of"):
        lora_per_lora(x, y, A, B, scales, p.batch, variant="mbgmv", backend=backend)
