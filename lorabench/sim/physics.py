"""Kernel physics: what one GPU's base-model kernels take, from tiles, bytes, launches and links.

The plain roofline of `costmodel` (max of FLOPs / rate and bytes / bandwidth per kernel) averages
over the steps real kernels take. This model follows them, with factors fitted per device
(`KernelPhysics`, from `lorabench profile --from-vidur`):

- **GEMM** y (m x n) = x (m x k) W^T: the library computes the output in tiles of the device's tile
  shape (`gemm_tile`; skinny problems use tiles of 64 rows, as the libraries' small-M kernels do),
  each tile on one SM, so the tiles run in waves of `sm_count`: ceil(tiles / SMs) waves, each as long
  as one tile (2 x rows x cols x k / (the SM's tensor-core rate x `gemm_flops`) + `gemm_tile_s`).
  That is why a batch one row past a tile boundary can cost a whole extra wave. When there are
  fewer tiles than SMs the library splits k into 2, 4 or 8 slices (split-K: more tiles, fp32
  partial sums to reduce); the fastest split is taken. The kernel cannot beat streaming its operands
  (weights once, activations in and out) at `gemm_memory` x the memory bandwidth. Plus
  `gemm_kernel_s` per kernel.
- **Elementwise** kernels by the bytes they really move per token: RMSNorm reads its row twice
  (sum of squares, then the scaling) and writes it; RoPE reads and rewrites q and k; SiLU-and-mul
  reads gate and up and writes their product; the residual add reads two rows and writes one. The
  row-wise kernels (norm, RoPE, SiLU-mul) give each token one thread block, so with fewer tokens than
  SMs a kernel lasts as long as one block takes to stream one row (`row_bandwidth`); with many they
  stream at `elementwise_memory` x the memory bandwidth. The residual add spreads all elements over
  the GPU. Plus a fixed cost per kernel (`row_kernel_s`, `flat_kernel_s`).
- **Collectives** over the GPUs' link (DeviceSpec.link_latency_s, link_bandwidth): an all-reduce of
  B bytes over n GPUs takes latency + 2 (n - 1) / n x B / bus bandwidth (a ring's traffic), a gather
  latency + (n - 1) / n x B / bus bandwidth.

Every function takes the token count as an int or a numpy array (the fitter evaluates a whole
table at once).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from lorabench.errors import LorabenchError
from lorabench.parallel import ACTIVATION_BYTES, Parallel, Shard
from lorabench.presets import DeviceSpec

SPLIT_K = (1, 2, 4, 8)  # the k-slicings a GEMM library chooses among when tiles do not fill the GPU
MIN_SPLIT_DEPTH = 256  # a split-K slice spans at least this much of k
SMALL_TILE_ROWS = 64  # the smallest tile height: batches below a tile's height use 64, then 128, ...
PARTIAL_SUM_BYTES = 4  # split-K partial sums are fp32

# One decoder layer's non-attention kernels, in order (the names `layer_kernels` returns).
LAYER_KERNELS = ("input_norm", "qkv", "rope", "o", "post_norm", "gate_up", "act", "down", "residual")


@dataclass(frozen=True)
class KernelPhysics:
    """Fitted factors of the kernel physics of one device (module docstring). Seconds, fractions, bytes/s."""

    gemm_tile: tuple[int, int] = (128, 128)  # output tile (rows, cols): one of DeviceSpec.gemm_tiles
    gemm_flops: float = 0.8  # fraction of an SM's tensor-core rate a running tile sustains
    gemm_tile_s: float = 1e-6  # per tile: filling and draining its pipeline, writing its output
    gemm_memory: float = 0.8  # fraction of the memory bandwidth a GEMM streams its operands at
    gemm_kernel_s: float = 3e-6  # per GEMM kernel
    elementwise_memory: float = 0.7  # fraction of the memory bandwidth elementwise kernels stream at
    row_kernel_s: float = 2e-6  # per row-wise kernel (RMSNorm, RoPE, SiLU-and-mul)
    row_bandwidth: float = 15e9  # bytes/s one thread block streams (one token's row on one SM)
    flat_kernel_s: float = 1e-6  # per flat elementwise kernel (the residual add)

    @classmethod
    def from_dict(cls, values: dict, where: str) -> "KernelPhysics":
        """From a profile's "kernels" object; one clear error per bad field."""
        check_fields(cls, values, where)
        values = dict(values)
        if "gemm_tile" in values:
            values["gemm_tile"] = tile_pair(values["gemm_tile"], f"{where}: field gemm_tile")
        for key, value in values.items():
            if key != "gemm_tile" and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise LorabenchError(f"{where}: field {key} must be a positive number, got {value!r}")
        return cls(**values)


def check_fields(fields_of, values: dict, where: str, what: str = "field(s)") -> None:
    """One clear error naming the keys of `values` that are not fields of the dataclass `fields_of`
    (a typo in a JSON file would otherwise be ignored or fail obscurely)."""
    names = {f.name for f in dataclasses.fields(fields_of)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise LorabenchError(f"{where}: unknown {what} {', '.join(unknown)}; expected among {', '.join(sorted(names))}")


def tile_pair(value, where: str) -> tuple[int, int]:
    """A tile shape [rows, cols] as a tuple of two positive ints."""
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise LorabenchError(f"{where} must be two positive integers [rows, cols], got {value!r}")
    return int(value[0]), int(value[1])


def gemm_seconds(m, n: int, k: int, device: DeviceSpec, physics: KernelPhysics, weight_bytes: int = 2,
                 fp8: bool = False):
    """One GEMM of m tokens (int or array) against an n x k weight, in waves of tiles (module docstring).
    `fp8`: FP8 weights and activations at the device's FP8 rate (the output stays bf16)."""
    if not device.sm_count:
        raise LorabenchError(f"device {device.name}: the kernel physics needs sm_count")
    rate_sm = (device.fp8_flops if fp8 else device.bf16_flops) * physics.gemm_flops / device.sm_count
    tile_m, tile_n = physics.gemm_tile
    m = np.asarray(m, dtype=np.float64)
    rows = np.minimum(tile_m, np.maximum(SMALL_TILE_ROWS, 2.0 ** np.ceil(np.log2(np.maximum(m, 1.0)))))
    tiles = np.ceil(m / rows) * -(-n // tile_n)
    act_in = 1 if fp8 else ACTIVATION_BYTES
    operands = weight_bytes * n * k + m * (act_in * k + ACTIVATION_BYTES * n)
    byte_rate = device.mem_bandwidth * physics.gemm_memory
    best = np.full_like(m, np.inf)
    for split in SPLIT_K:
        if split > 1 and k / split < MIN_SPLIT_DEPTH:
            break
        waves = np.ceil(tiles * split / device.sm_count)
        compute = waves * (2.0 * rows * tile_n * -(-k // split) / rate_sm + physics.gemm_tile_s)
        partials = PARTIAL_SUM_BYTES * m * n * split if split > 1 else 0.0
        best = np.minimum(best, np.maximum(compute, (operands + partials) / byte_rate))
    return best + physics.gemm_kernel_s


def row_kernel_seconds(rows, row_bytes: int, device: DeviceSpec, physics: KernelPhysics):
    """A row-wise elementwise kernel (one thread block per token) over `rows` tokens of `row_bytes` each."""
    stream = rows * row_bytes / (device.mem_bandwidth * physics.elementwise_memory)
    one_row_per_sm = np.ceil(np.asarray(rows, dtype=np.float64) / device.sm_count) * row_bytes / physics.row_bandwidth
    return physics.row_kernel_s + np.maximum(stream, one_row_per_sm)


def flat_kernel_seconds(nbytes, device: DeviceSpec, physics: KernelPhysics):
    """An elementwise kernel spread over the whole GPU, moving `nbytes`."""
    return physics.flat_kernel_s + nbytes / (device.mem_bandwidth * physics.elementwise_memory)


def layer_kernels(m, shard: Shard, device: DeviceSpec, physics: KernelPhysics,
                  parallel: Parallel = Parallel()) -> dict:
    """Seconds of each of one decoder layer's non-attention kernels (`LAYER_KERNELS`) on one GPU of
    the tensor-parallel group, for m tokens (int or array)."""
    h, b, inter, q, kv = shard.model.hidden, ACTIVATION_BYTES, shard.intermediate, shard.q_dim, shard.kv_dim
    fp8 = parallel.weight_dtype == "fp8"

    def gemm(n: int, k: int):
        return gemm_seconds(m, n, k, device, physics, parallel.weight_bytes, fp8)

    def row(row_bytes: int):
        return row_kernel_seconds(m, row_bytes, device, physics)

    return {
        "input_norm": row(3 * h * b),  # reads the row twice (sum of squares, scaling), writes it
        "qkv": gemm(q + 2 * kv, h),
        "rope": row(2 * (q + kv) * b),  # reads and rewrites q and k in place
        "o": gemm(h, q),
        "post_norm": row(3 * h * b),
        "gate_up": gemm(2 * inter, h),
        "act": row(3 * inter * b),  # reads gate and up, writes their product
        "down": gemm(h, inter),
        "residual": flat_kernel_seconds(3 * np.asarray(m) * h * b, device, physics),  # reads two rows, writes one
    }


def all_reduce_seconds(nbytes, tp: int, device: DeviceSpec):
    """An all-reduce of `nbytes` over `tp` GPUs (0 on one GPU)."""
    if tp == 1:
        return 0.0
    return device.link_latency_s + 2 * (tp - 1) / tp * nbytes / device.link_bandwidth


def gather_seconds(nbytes, tp: int, device: DeviceSpec):
    """Gathering `nbytes` (in all) from `tp` GPUs onto one (0 on one GPU)."""
    if tp == 1:
        return 0.0
    return device.link_latency_s + (tp - 1) / tp * nbytes / device.link_bandwidth
