"""Profiles: measured step times of the real decoder, and the cost-model calibration fitted to them.

A profile is one JSON file, `results/profiles/<device>-<model>.json`:

    {"device":     {DeviceSpec fields measured here: bf16_flops, mem_bandwidth, host_link_bandwidth,
                    copy_latency_s, memory_bytes},
     "efficiency": {Efficiency fields fitted to the points},
     "points":     [{"strategy", "rank", "tokens", "context_lens", "adapters", "is_prefill", "seconds"}],
     "meta":       {device name, model, dtype, torch version, mode counts, date, command, fit error}}

`lorabench.sim.costmodel.apply_profile` reads the "device" and "efficiency" sections, so a run's
modeled executor with `--profile FILE` (or a profile found by device and model) predicts the times
of this device. The fit: least squares on log(predicted / measured) over every point, the
efficiency fields in log space within bounds, with a robust loss (a few
noisy points must not drag the fit).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorabench.errors import LorabenchError
from lorabench.presets import DeviceSpec, ModelShape, device_name
from lorabench.sim.costmodel import Efficiency, LoraSetup, ModeledExecutor
from lorabench.sim.executor import Step

# Fitted factors, with bounds (fractions of ceilings; fixed costs in seconds): Efficiency fields,
# and the device's fixed cost per kernel (fitted once for all strategies).
FIT_BOUNDS = {
    "gemm_flops": (0.01, 1.0),
    "memory": (0.01, 1.0),
    "attention_memory": (0.005, 1.0),
    "attention_flops": (0.001, 1.0),
    "kernel_s": (1e-7, 1e-2),
    "lora_kernel_s": (1e-7, 1e-2),
    "lora_segment_s": (1e-9, 1e-3),
    "lora_segment_token_s": (1e-12, 1e-5),
    "paged_gather": (0.5, 20.0),
    "step_overhead_s": (1e-6, 1.0),
}
DEVICE_FIT_BOUNDS = {"launch_overhead_s": (1e-7, 1e-2)}


@dataclass(frozen=True)
class ProfilePoint:
    strategy: str
    rank: int
    tokens: list[int]
    context_lens: list[int]
    adapters: list[int]
    is_prefill: list[bool]
    seconds: float

    def step(self) -> Step:
        return make_step(self.strategy, self.tokens, self.context_lens, self.adapters, self.is_prefill)


def make_step(strategy: str, tokens, context_lens, adapters, is_prefill) -> Step:
    adapters = np.asarray(adapters, dtype=np.int64)
    return Step(strategy, np.asarray(tokens, dtype=np.int64), np.asarray(context_lens, dtype=np.int64), adapters,
                np.asarray(is_prefill, dtype=bool), int(len(np.unique(adapters))))


# ---- device ceilings ---------------------------------------------------------------------------

def _median_seconds(fn, device, repeats: int = 5) -> float:
    import torch

    fn()  # warm
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure_device(device, dtype) -> dict:
    """The DeviceSpec figures of this device, measured: matmul rate in the model's dtype, copy
    bandwidth (bytes read + written), pinned host->device bandwidth and per-copy latency, memory."""
    import torch

    cuda = device.type == "cuda"
    n = 8192 if cuda else 384
    a = torch.randn(n, n, device=device).to(dtype)
    flops = 2 * n**3 / _median_seconds(lambda: a @ a, device)
    big = torch.empty((2**30 if cuda else 2**26) // 4, dtype=torch.float32, device=device)
    mem_bw = 2 * big.nbytes / _median_seconds(lambda: big.clone(), device)
    host = torch.empty(big.nbytes // 4 if cuda else 2**24, dtype=torch.uint8, pin_memory=cuda)
    dev = torch.empty(host.numel(), dtype=torch.uint8, device=device)
    link_bw = host.nbytes / _median_seconds(lambda: dev.copy_(host, non_blocking=True), device)
    small = torch.empty(4096, dtype=torch.uint8, pin_memory=cuda)
    small_dev = torch.empty(4096, dtype=torch.uint8, device=device)
    latency = _median_seconds(lambda: [small_dev.copy_(small, non_blocking=True) for _ in range(100)], device) / 100
    memory = torch.cuda.get_device_properties(device).total_memory if cuda else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    del a, big, host, dev
    return dict(bf16_flops=flops, mem_bandwidth=mem_bw, host_link_bandwidth=link_bw, copy_latency_s=latency,
                memory_bytes=int(memory))


# ---- fitting -----------------------------------------------------------------------------------

def _executor(point: ProfilePoint, shape: ModelShape, device: DeviceSpec, eff: Efficiency, modules, compressed_rank,
              slots: int) -> ModeledExecutor:
    n = max(point.adapters) + 1
    lora = LoraSetup(point.strategy, np.full(n, point.rank), tuple(modules), compressed_rank=compressed_rank,
                     clusters=np.zeros(n, dtype=np.int64), resident_slots=min(slots, n))
    return ModeledExecutor(shape, device, lora, eff)


def predict(points, shape, device, eff, modules, compressed_rank, slots) -> np.ndarray:
    return np.array([_executor(p, shape, device, eff, modules, compressed_rank, slots).step(p.step()) for p in points])


def fit_efficiency(points: list[ProfilePoint], shape: ModelShape, device: DeviceSpec, modules, compressed_rank: int,
                   slots: int, start: Efficiency | None = None, fit_device: bool = False,
                   ) -> tuple[Efficiency, DeviceSpec, dict]:
    """The Efficiency fields (and, with fit_device, the device's per-kernel fixed cost) minimizing
    the squared log error of predicted against measured step times. Returns them and error stats."""
    from scipy.optimize import least_squares

    base = start or Efficiency()
    eff_names = [k for k in FIT_BOUNDS if hasattr(base, k) and (k != "paged_gather" or any(p.strategy == "paged" for p in points))]
    dev_names = [k for k in DEVICE_FIT_BOUNDS if fit_device and hasattr(device, k)]
    bounds = {**FIT_BOUNDS, **DEVICE_FIT_BOUNDS}
    names = eff_names + dev_names
    lo = np.log([bounds[k][0] for k in names])
    hi = np.log([bounds[k][1] for k in names])
    start_values = [getattr(base, k) for k in eff_names] + [getattr(device, k) for k in dev_names]
    x0 = np.clip(np.log(np.maximum(start_values, [bounds[k][0] for k in names])), lo + 1e-9, hi - 1e-9)
    measured = np.array([p.seconds for p in points])

    def unpack(x):
        values = dict(zip(names, np.exp(x).tolist()))
        return (dataclasses.replace(base, **{k: values[k] for k in eff_names}),
                dataclasses.replace(device, **{k: values[k] for k in dev_names}))

    def residuals(x):
        eff, dev = unpack(x)
        return np.log(predict(points, shape, dev, eff, modules, compressed_rank, slots) / measured)

    before = residuals(x0)
    result = least_squares(residuals, x0, bounds=(lo, hi), loss="soft_l1", f_scale=0.1, diff_step=1e-3, max_nfev=400)
    after = residuals(result.x)
    stats = dict(
        points=len(points),
        median_abs_error_default=float(np.median(np.abs(np.expm1(before)))),
        median_abs_error_fitted=float(np.median(np.abs(np.expm1(after)))),
        max_abs_error_fitted=float(np.max(np.abs(np.expm1(after)))),
    )
    eff, dev = unpack(result.x)
    return eff, dev, stats


def calibrate(points: list[ProfilePoint], shape: ModelShape, device: DeviceSpec, modules, compressed_rank: int,
              slots: int) -> tuple[DeviceSpec, Efficiency, dict[str, Efficiency], dict]:
    """Two stages: every point together fits the shared factors and the per-kernel fixed cost; then
    each strategy's points refit the efficiency factors from there (its kernels have their own)."""
    measured_device = device
    shared, device, _ = fit_efficiency(points, shape, device, modules, compressed_rank, slots, fit_device=True)
    by_strategy, stats = {}, {}
    for strategy in dict.fromkeys(p.strategy for p in points):
        mine = [p for p in points if p.strategy == strategy]
        by_strategy[strategy], _, stats[strategy] = fit_efficiency(mine, shape, device, modules, compressed_rank, slots,
                                                                   start=shared)
        # against the roofline's own factors on this device's measured ceilings
        default = predict(mine, shape, measured_device, Efficiency(), modules, compressed_rank, slots)
        stats[strategy]["median_abs_error_default"] = float(np.median(np.abs(default / [p.seconds for p in mine] - 1)))
    return device, shared, by_strategy, stats


# ---- files -------------------------------------------------------------------------------------

def load_points(path: Path) -> list[ProfilePoint]:
    try:
        data = json.loads(Path(path).read_text())
        return [ProfilePoint(**p) for p in data["points"]]
    except FileNotFoundError:
        raise LorabenchError(f"profile {path}: no such file") from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise LorabenchError(f"profile {path}: not a lorabench profile ({type(err).__name__}: {err})") from None


def profile_meta(device, model: ModelShape, dtype, **extra) -> dict:
    import torch

    return dict(device=device_name(device), model=model.name, dtype=str(dtype).removeprefix("torch."),
                torch=torch.__version__, machine=platform.machine(),
                date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), **extra)
