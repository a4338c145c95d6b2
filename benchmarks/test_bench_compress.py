"""pytest-benchmark regression runs of joint compression on the CPU.

    python -m pytest benchmarks/test_bench_compress.py --benchmark-only

One 1024 x 1024 module, 200 rank-16 adapters (random, so the fit runs its iterations), R = 32,
float32, a fixed number of iterations so runs compare the cost per iteration. The issue's full-size
figure (1,000 adapters of a 4096 x 4096 module, R = 64) comes from benchmarks/compress_speed.py.
"""

import pytest
import torch

from lorabench.adapters.types import LoraStack
from lorabench.compress import CompressConfig, compress_module

N, D, RANK, R = 200, 1024, 16, 32


@pytest.fixture(scope="module")
def stack():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(N, RANK, D, generator=g) / D**0.5
    Bt = torch.randn(N, RANK, D, generator=g) / D**0.5
    return LoraStack(A, Bt, torch.full((N,), RANK))


@pytest.mark.parametrize("method,clusters", [("full", 1), ("diagonal", 1), ("full", 4), ("svd", 1)])
def test_compress_module(benchmark, stack, method, clusters):
    config = CompressConfig(rank=R, method=method, clusters=clusters, tol=0.0, max_iter=5, max_rounds=2)
    fit = benchmark(compress_module, stack, config)
    assert fit.errors.shape == (N,) and float(fit.errors.max()) <= 1.0
