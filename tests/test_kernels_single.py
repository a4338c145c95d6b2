"""Single-LoRA kernels and dispatch against the float64 reference."""

import random

import pytest
import torch

from lorabench.kernels import lora_single, use_triton
from lorabench.kernels.single import single_lora
from lorabench.kernels.testing import (
    assert_matches, device_under_test, kernel_test_dtypes, single_problem, workspace_poisoned,
)

DEVICE = device_under_test()


def _problem(m, dtype, r=5, d_in=72, d_out=40):
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    return single_problem(m, d_in, d_out, r, dtype, DEVICE, gen)


@pytest.mark.parametrize("dtype", kernel_test_dtypes())
@pytest.mark.parametrize("m, r, d_in, d_out", [(1, 5, 72, 40), (0, 5, 72, 40), (37, 3, 40, 96), (70, 16, 130, 33)])
def test_kernel_matches_reference(dtype, m, r, d_in, d_out):
    p = _problem(m, dtype, r, d_in, d_out)
    inputs = p.fresh_y()
    out = single_lora(**inputs, workspace_buffer=workspace_poisoned(1 << 14, torch.float32, DEVICE))
    assert out is inputs["y"]
    assert_matches(out, p.expected(), "single")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dispatch_matches_reference(dtype, backend):
    if backend == "triton" and dtype not in kernel_test_dtypes():
        dtype = torch.float32  # bf16 tl.dot is wrong under the interpreter
    p = _problem(20, dtype)
    assert_matches(lora_single(**p.fresh_y(), backend=backend), p.expected(), "single")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_inputs_raise(backend):
    p = _problem(4, torch.float32)
    x, y, A, B = (p.inputs[k] for k in ("x", "y", "A", "B"))
    with pytest.raises(ValueError, match="B has shape"):
        lora_single(x, y, A, B[:, :2], 1.0, backend=backend)
    with pytest.raises(ValueError, match="x has 4 tokens but y has 3"):
        lora_single(x, y[:3], A, B, 1.0, backend=backend)
    with pytest.raises(ValueError, match="A is on"):
        lora_single(x, y, A.to("meta"), B, 1.0, backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        lora_single(x, y, A, B, 1.0, backend="cuda")


def test_backend_choice(monkeypatch):
    x = torch.zeros(2, 3)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not use_triton(x, "auto") and not use_triton(x, "torch") and use_triton(x, "triton")
    monkeypatch.delenv("TRITON_INTERPRET")  # compiled Triton needs CUDA tensors
    with pytest.raises(ValueError, match="backend='triton' needs triton and CUDA tensors"):
        use_triton(x, "triton")
