"""pytest-benchmark regression runs of every strategy's LoRA layer on the CPU (PyTorch paths).

    python -m pytest benchmarks/test_bench_kernels.py --benchmark-only

One layer, d_in = d_out = 1024, rank 16, compressed width 64, fp32; a decode-sized (M = 16) and a
prefill-sized (M = 256) batch over 64 resident adapters drawn from Zipf(1.0). On a GPU machine use
`lorabench bench-kernels` instead (Triton kernels, CUDA graphs).
"""

import pytest
import torch

from lorabench.kernels import LoraBatch, lora_compressed, lora_paged, lora_per_lora, lora_single
from lorabench.kernels.testing import compressed_problem, paged_problem, per_lora_problem, single_problem, zipf_ids

D, RANK, WIDTH, N = 1024, 16, 64, 64


def _call(strategy: str, m: int):
    gen = torch.Generator().manual_seed(0)
    ids = zipf_ids(m, N, 1.0, gen).tolist()
    if strategy == "single":
        p = single_problem(m, D, D, RANK, torch.float32, "cpu", gen)
        return lambda: lora_single(**p.inputs)
    if strategy == "per_lora":
        p = per_lora_problem(ids, N, D, D, RANK, torch.float32, "cpu", gen)
        fn = lora_per_lora
    elif strategy == "paged":
        p = paged_problem(ids, [RANK] * N, D, D, D, torch.float32, "cpu", gen)
        fn = lora_paged
    else:
        p = compressed_problem(ids, N, 1, WIDTH, strategy == "compressed_diag", D, D, torch.float32, "cpu", gen)
        fn = lora_compressed
    assert isinstance(p.batch, LoraBatch)
    return lambda: fn(**p.inputs, batch=p.batch)


@pytest.mark.parametrize("m", [16, 256])
@pytest.mark.parametrize("strategy", ["single", "per_lora", "paged", "compressed_full", "compressed_diag"])
def test_lora_layer(benchmark, strategy, m):
    benchmark.group = f"lora layer M={m}"
    benchmark(_call(strategy, m))
