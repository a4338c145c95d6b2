"""Kernel physics: GEMM wave quantization against hand-worked tile counts and against a simulation
of tiles handed to SMs one by one; elementwise bytes; FP8 bytes; collectives; profile fields."""

import dataclasses
import heapq
import math

import numpy as np
import pytest

from lorabench.errors import LorabenchError
from lorabench.parallel import Parallel, shard
from lorabench.presets import DeviceSpec, model_preset
from lorabench.sim import physics
from lorabench.sim.physics import KernelPhysics

# A made-up GPU of 4 SMs, each 1 TFLOP/s, whose memory never limits a GEMM: times are pure waves.
GPU = DeviceSpec("toy", 4e12, 1e30, 1e9, 2**30, sm_count=4, fp8_flops=8e12, link_latency_s=1e-5, link_bandwidth=1e11)
WAVES_ONLY = KernelPhysics(gemm_tile=(128, 128), gemm_flops=1.0, gemm_tile_s=0.0, gemm_memory=1.0, gemm_kernel_s=0.0)
TILE_S = 2 * 128 * 128 * 1024 / 1e12  # one 128 x 128 tile over k = 1024 on one SM


def test_one_row_past_a_tile_boundary_costs_a_whole_wave():
    # m = 128, n = 512: 1 x 4 tiles = one wave of 4 SMs. m = 129: 2 x 4 = 8 tiles, two waves.
    assert physics.gemm_seconds(128, 512, 1024, GPU, WAVES_ONLY) == pytest.approx(TILE_S)
    assert physics.gemm_seconds(129, 512, 1024, GPU, WAVES_ONLY) == pytest.approx(2 * TILE_S)
    assert physics.gemm_seconds(256, 512, 1024, GPU, WAVES_ONLY) == pytest.approx(2 * TILE_S)
    # m = 64 uses a 64-row tile: half the work per tile, 4 tiles, one wave
    assert physics.gemm_seconds(64, 512, 1024, GPU, WAVES_ONLY) == pytest.approx(TILE_S / 2)


def test_too_few_tiles_split_k_to_fill_the_sms():
    # m = 100, n = 256: 2 tiles for 4 SMs; split-K by 2 gives 4 tiles of k = 512: one wave of half a tile.
    # (Split by 4 would give 8 tiles of k = 256: two waves of a quarter, no better.)
    assert physics.gemm_seconds(100, 256, 1024, GPU, WAVES_ONLY) == pytest.approx(TILE_S / 2)
    # k = 256 cannot be split (each slice would span under 256): 2 tiles, one wave
    assert physics.gemm_seconds(100, 256, 256, GPU, WAVES_ONLY) == pytest.approx(TILE_S / 4)


def list_schedule(tiles: int, sms: int, tile_s: float) -> float:
    """Makespan of `tiles` equal tiles handed, in order, to whichever SM frees up first."""
    free = [0.0] * sms
    for _ in range(tiles):
        heapq.heappush(free, heapq.heappop(free) + tile_s)
    return max(free)


def test_waves_equal_a_simulation_of_tiles_handed_to_sms():
    rng = np.random.default_rng(7)
    gpu = dataclasses.replace(GPU, sm_count=int(rng.integers(3, 40)))
    for _ in range(200):
        m, n, k = int(rng.integers(128, 3000)), int(rng.integers(1, 40)) * 64, 256  # no split-K at k = 256
        tiles = math.ceil(m / 128) * math.ceil(n / 128)
        expected = list_schedule(tiles, gpu.sm_count, 2 * 128 * 128 * k / (gpu.bf16_flops / gpu.sm_count))
        assert physics.gemm_seconds(m, n, k, gpu, WAVES_ONLY) == pytest.approx(expected, rel=1e-12)


def test_a_skinny_gemm_streams_its_weights_once_and_fp8_halves_them():
    gpu = DeviceSpec("toy", 1e15, 1e12, 1e9, 2**30, sm_count=100, fp8_flops=2e15)
    memory_bound = dataclasses.replace(WAVES_ONLY, gemm_memory=0.5, gemm_kernel_s=3e-6)
    m, n, k = 4, 8192, 8192
    bf16 = (2 * n * k + m * (2 * k + 2 * n)) / 0.5e12 + 3e-6
    fp8 = (n * k + m * (k + 2 * n)) / 0.5e12 + 3e-6  # one byte per weight and input, bf16 output
    assert physics.gemm_seconds(m, n, k, gpu, memory_bound) == pytest.approx(bf16, rel=1e-12)
    assert physics.gemm_seconds(m, n, k, gpu, memory_bound, weight_bytes=1, fp8=True) == pytest.approx(fp8, rel=1e-12)


def test_elementwise_kernels_move_their_real_bytes():
    gpu = DeviceSpec("toy", 1e15, 2e12, 1e9, 2**30, sm_count=10)
    k = KernelPhysics(elementwise_memory=0.5, row_kernel_s=2e-6, row_bandwidth=1e20, flat_kernel_s=1e-6)
    model = model_preset("llama-3.1-8b")  # hidden 4096, 32 heads, 8 KV heads, MLP 14336
    kernels = physics.layer_kernels(1000, shard(model, 2), gpu, k, Parallel(2))
    rate = 1e12  # 0.5 x 2 TB/s
    assert kernels["input_norm"] == pytest.approx(2e-6 + 1000 * 3 * 4096 * 2 / rate)  # reads its row twice, writes it
    assert kernels["rope"] == pytest.approx(2e-6 + 1000 * 2 * (2048 + 512) * 2 / rate)  # q and k of one GPU, in place
    assert kernels["act"] == pytest.approx(2e-6 + 1000 * 3 * 7168 * 2 / rate)  # gate, up in; product out
    assert kernels["residual"] == pytest.approx(1e-6 + 1000 * 3 * 4096 * 2 / rate)


def test_few_rows_take_as_long_as_one_block_streams_one_row():
    gpu = DeviceSpec("toy", 1e15, 2e12, 1e9, 2**30, sm_count=10)
    k = KernelPhysics(elementwise_memory=1.0, row_kernel_s=1e-6, row_bandwidth=1e10)
    row = 3 * 4096 * 2
    for rows in (1, 7, 10):
        assert physics.row_kernel_seconds(rows, row, gpu, k) == pytest.approx(1e-6 + row / 1e10)
    assert physics.row_kernel_seconds(11, row, gpu, k) == pytest.approx(1e-6 + 2 * row / 1e10)


def test_collectives_follow_the_ring_traffic():
    assert physics.all_reduce_seconds(1e6, 1, GPU) == 0
    assert physics.all_reduce_seconds(1e6, 4, GPU) == pytest.approx(1e-5 + 1.5e6 / 1e11)
    assert physics.gather_seconds(1e6, 8, GPU) == pytest.approx(1e-5 + 0.875e6 / 1e11)


@pytest.mark.parametrize("values, message", [
    ({"gemm_tile": [128]}, r"gemm_tile must be two positive integers"),
    ({"gemm_flops": -1}, r"gemm_flops must be a positive number"),
    ({"speed": 1}, r"unknown field\(s\) speed"),
])
def test_bad_kernel_fields_get_one_clear_error(values, message):
    with pytest.raises(LorabenchError, match=message):
        KernelPhysics.from_dict(values, "profile p.json: kernels")
