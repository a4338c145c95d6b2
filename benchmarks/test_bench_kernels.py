"""pytest-benchmark regression runs of every strategy's LoRA layer: the PyTorch paths on the CPU
and, where a GPU is present, the Triton kernels on CUDA.

    python -m pytest benchmarks/test_bench_kernels.py --benchmark-only

One layer, d_in = d_out = 1024, rank 16, compressed width 64 (fp32 on the CPU, bf16 on CUDA); a
decode-sized (M = 16) and a prefill-sized (M = 256) batch over 64 resident adapters drawn from
Zipf(1.0). CUDA calls are timed with CUDA events around each call (pytest-benchmark's own figures
include the host's wait for the device). extra_info: the median time per call, tokens/s, and GB/s
of the bytes a call must move at least (x once, y read and written, each distinct adapter's weights
once). For the full grid with CUDA graphs use `lorabench bench-kernels`.
"""

import statistics
import time

import pytest
import torch

from lorabench.kernels import LoraBatch, lora_compressed, lora_paged, lora_per_lora, lora_single
from lorabench.kernels.testing import compressed_problem, paged_problem, per_lora_problem, single_problem, zipf_ids

D, RANK, WIDTH, N = 1024, 16, 64, 64
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _call(strategy: str, m: int, device: str):
    """(the call, the bytes it must move at least)."""
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ids = zipf_ids(m, N, 1.0, gen).tolist()
    distinct = len(set(ids))
    if strategy == "single":
        p = single_problem(m, D, D, RANK, dtype, device, gen)
        weights = RANK * 2 * D
        call = lambda: lora_single(**p.inputs)  # noqa: E731
    else:
        if strategy == "per_lora":
            p = per_lora_problem(ids, N, D, D, RANK, dtype, device, gen)
            fn, weights = lora_per_lora, distinct * RANK * 2 * D
        elif strategy == "paged":
            p = paged_problem(ids, [RANK] * N, D, D, D, dtype, device, gen)
            fn, weights = lora_paged, distinct * 2 * RANK * D  # r pages of A and r of B, page size D
        else:
            diagonal = strategy == "compressed_diag"
            p = compressed_problem(ids, N, 1, WIDTH, diagonal, D, D, dtype, device, gen)
            fn, weights = lora_compressed, 2 * D * WIDTH + distinct * (WIDTH if diagonal else WIDTH * WIDTH)
        assert isinstance(p.batch, LoraBatch)
        call = lambda: fn(**p.inputs, batch=p.batch)  # noqa: E731
    element = p.inputs["x"].element_size()
    return call, (m * D + 2 * m * D + weights) * element


def _timed(call, device: str, seconds: list[float]):
    """The call, recording its own time: CUDA events on the GPU, the host clock on the CPU."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def run():
            start.record()
            call()
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
    else:

        def run():
            t0 = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - t0)

    return run


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [16, 256])
@pytest.mark.parametrize("strategy", ["single", "per_lora", "paged", "compressed_full", "compressed_diag"])
def test_lora_layer(benchmark, strategy, m, device):
    benchmark.group = f"lora layer {device} M={m}"
    call, nbytes = _call(strategy, m, device)
    seconds: list[float] = []
    if device == "cuda":
        call()  # compile the Triton kernels before timing
        torch.cuda.synchronize()
        benchmark.pedantic(_timed(call, device, seconds), rounds=50, warmup_rounds=5, iterations=1)
    else:
        benchmark(_timed(call, device, seconds))
    median = statistics.median(seconds)
    benchmark.extra_info.update(median_us=median * 1e6, tokens_per_s=m / median, gb_per_s=nbytes / median / 1e9,
                                min_bytes=nbytes, timer="cuda events" if device == "cuda" else "host clock")
