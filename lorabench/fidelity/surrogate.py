"""A cheap stand-in for re-simulating a run when only the engine's time terms change.

A simulated run is a sequence of step rows. With the batches held as they were, each row's
duration is linear in the fitted terms' effects: the kernels' compute-bound time scales with 1 /
the device's matmul rate, their memory-bound time with 1 / its bandwidth, the LoRA kernels' share
of it also with 1 / the fraction of it they reach (`KernelSplit` asks the modeled executor for these
parts of every step), the per-lora grid's cost per unused slot (`lora_empty_slot_s`, which the cost
model adds per module and layer) and the engine's host terms (engine_model.EngineModel.host_s) are
counts times terms. So a row's duration is w(p) . phi, with
phi its counts (FEATURES) and w from the terms, and every figure a run reports follows from sums of
rows:

- TPOT of a request: the rows between its first token and its finish, over its tokens - 1;
- TTFT: its simulated TTFT (less the ingress time) times how much the rows between arrival and
  first token stretch, plus the ingress time;
- a saturated run (the simulation says so) completes the same work at the pace of its rows, so its
  throughput scales with the inverse of its busy time, and its running requests stay;
- an unsaturated run keeps its throughput, and its running requests scale with their time in the
  system (Little's law).

What it leaves out: the batches themselves change with the terms (slower steps queue more
requests). `calibrate` therefore alternates: simulate at the current terms, fit on the surrogate,
simulate again at the new terms; a few passes reach a point where both agree.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from lorabench.presets import DeviceSpec
from lorabench.sim.costmodel import Efficiency, ModeledExecutor
from lorabench.sim.engine_model import EngineModel

# The terms the surrogate knows: (part of the engine file, field, a typical size for the optimizer's
# scaling). calibrate fits all but the bandwidth (FIXED).
FIT_TERMS = (
    ("device", "bf16_flops", 5e14),
    ("device", "mem_bandwidth", 2e12),
    ("efficiency", "lora_memory", 0.5),
    ("efficiency", "lora_empty_slot_s", 1e-7),
    ("engine", "step_s", 1e-3),
    ("engine", "request_s", 1e-5),
    ("engine", "adapter_s", 1e-4),
    ("engine", "waiting_scan_s", 1e-6),
    ("engine", "ingress_s", 1e-2),
)
# Per row: the kernels' compute-bound seconds, memory-bound seconds but the LoRA kernels', the LoRA
# kernels' memory-bound seconds, the rest of their time (fixed costs, and eager launches where they
# outlast the kernels) but the unused-slot term, that term's count (slot x module x layer x (1 + m /
# 256)), iterations, and iterations times requests, distinct adapters and waiting requests walked;
# seconds of adapter copies.
FEATURES = ("compute", "memory", "lora", "fixed", "unused_slots", "steps", "requests", "adapters", "scanned", "stall")
SAMPLE = 2000  # requests per run kept for medians and percentiles
INGRESS = [name for _, name, _ in FIT_TERMS].index("ingress_s")


def terms_of(device: DeviceSpec, engine: EngineModel, efficiency: Efficiency) -> np.ndarray:
    parts = {"device": device, "engine": engine, "efficiency": efficiency}
    return np.array([getattr(parts[part], name) for part, name, _ in FIT_TERMS])


def weights(p: np.ndarray, at: np.ndarray) -> np.ndarray:
    """w with row duration = w . phi, for the terms p, phi taken at the terms `at`."""
    flops, bandwidth, lora, slot, step, request, adapter, scan, _ = p
    return np.array([at[0] / flops, at[1] / bandwidth, at[1] * at[2] / (bandwidth * lora), 1.0, slot, step, request,
                     adapter, scan, 1.0])


class KernelSplit:
    """The modeled executor, which also says how much of each duration it returned was compute-bound,
    memory-bound, and of that the LoRA kernels': the same steps timed on a device a little faster at
    matmuls, on one a little faster at memory, and with LoRA kernels a little more efficient, differ
    from the first by those parts' shares (the roofline takes, per kernel, the larger of FLOPs / rate
    and bytes / bandwidth)."""

    EPS = 1e-3

    def __init__(self, model, device: DeviceSpec, lora, efficiency: Efficiency):
        self.name = "modeled"
        self.lora = lora
        self._base = ModeledExecutor(model, device, lora, efficiency)
        self._compute = ModeledExecutor(model, dataclasses.replace(device, bf16_flops=device.bf16_flops * (1 + self.EPS)),
                                        lora, efficiency)
        self._memory = ModeledExecutor(model, dataclasses.replace(device, mem_bandwidth=device.mem_bandwidth * (1 + self.EPS)),
                                       lora, efficiency)
        self._lora = ModeledExecutor(model, device, lora,
                                     dataclasses.replace(efficiency, lora_memory=efficiency.lora_memory * (1 + self.EPS)))
        self._gain = 1 / (1 - 1 / (1 + self.EPS))
        self._parts: list[tuple[float, float, float]] = []  # of each duration returned since the last `step`

    def _split(self, t, tc, tm, tl) -> list[tuple[float, float, float]]:
        g = self._gain
        return [((a - b) * g, (a - c - (a - d)) * g, (a - d) * g) for a, b, c, d in zip(t, tc, tm, tl)]

    def step(self, step) -> float:
        t = self._base.step(step)
        self._parts = self._split([t], [self._compute.step(step)], [self._memory.step(step)], [self._lora.step(step)])
        return t

    def repeat_decode(self, step, count: int) -> list[float]:
        t = self._base.repeat_decode(step, count)
        self._parts += self._split(t, self._compute.repeat_decode(step, count), self._memory.repeat_decode(step, count),
                                   self._lora.repeat_decode(step, count))
        return t

    def split(self, iterations: int) -> tuple[float, float, float]:
        """(compute, memory but LoRA, LoRA memory) seconds of the first `iterations` durations since
        the last `step`: a row."""
        used = self._parts[:iterations]
        return tuple(sum(part[i] for part in used) for i in range(3))

    def load(self, nbytes: int, copies: int = 1) -> float:
        return self._base.load(nbytes, copies)


@dataclass
class RunTrace:
    """What the surrogate keeps of one simulated run (all times in seconds)."""

    terms: np.ndarray  # the terms it was simulated with
    metrics: dict  # the simulated figures (replay.window_metrics)
    busy: np.ndarray  # FEATURES summed over all rows
    tpot_mean: np.ndarray  # mean over completed requests of their TPOT features
    tpot_sample: np.ndarray  # (requests, FEATURES): TPOT features of a sample
    ttft_sample: np.ndarray  # (requests, FEATURES): features of the rows between arrival and first token
    ttft_s: np.ndarray  # the sample's simulated TTFT
    decode_mean: np.ndarray  # mean over completed requests of the features of their decode rows

    @classmethod
    def build(cls, replica, requests, metrics: dict, device: DeviceSpec, engine: EngineModel, efficiency: Efficiency,
              layers: int, lora_modules: int, slots: int, seed: int) -> "RunTrace":
        trace = {k: np.frombuffer(v, dtype=np.float64) for k, v in replica.sched.trace.items()}
        duration = np.frombuffer(replica.rows["duration_s"], dtype=np.float64)
        it, tokens = trace["iterations"], trace["tokens"]
        unused = it * layers * lora_modules * np.maximum(slots + 1 - trace["distinct"], 0) * (1 + tokens / 256)
        host = it * (engine.step_s + engine.request_s * trace["batch_size"] + engine.adapter_s * trace["distinct"]
                     + engine.waiting_scan_s * trace["scanned"])
        fixed = (duration - trace["stall_s"] - host - trace["compute_s"] - trace["memory_s"] - trace["lora_s"]
                 - efficiency.step_scale * efficiency.lora_empty_slot_s * unused)
        phi = np.column_stack([trace["compute_s"], trace["memory_s"], trace["lora_s"], fixed,
                               efficiency.step_scale * unused, it,
                               it * trace["batch_size"], it * trace["distinct"], it * trace["scanned"], trace["stall_s"]])
        cum = np.vstack([np.zeros(len(FEATURES)), np.cumsum(phi, axis=0)])
        end = trace["end_s"]
        s = replica.sched
        done = np.isfinite(s.finish_s)
        first, finish = s.first_token_s[done], s.finish_s[done]
        arrival, out = requests.arrival_s[done], requests.output_tokens[done]
        i_arrive = np.searchsorted(end, arrival, side="right")
        i_first = np.searchsorted(end, first, side="right")
        i_finish = np.searchsorted(end, finish, side="right")
        decode = cum[i_finish] - cum[i_first]
        multi = out > 1
        tpot = decode[multi] / (out[multi] - 1)[:, None]
        ttft_rows = cum[i_first] - cum[i_arrive]
        rng = np.random.default_rng(seed)
        pick_t = rng.choice(len(tpot), min(SAMPLE, len(tpot)), replace=False) if len(tpot) else np.zeros(0, int)
        pick_f = rng.choice(len(first), min(SAMPLE, len(first)), replace=False) if len(first) else np.zeros(0, int)
        zeros = np.zeros(len(FEATURES))
        return cls(
            terms=terms_of(device, engine, efficiency), metrics=dict(metrics), busy=phi.sum(axis=0),
            tpot_mean=tpot.mean(axis=0) if len(tpot) else zeros, tpot_sample=tpot[pick_t],
            ttft_sample=ttft_rows[pick_f], ttft_s=(first - arrival)[pick_f],
            decode_mean=decode.mean(axis=0) if len(decode) else zeros,
        )

    def predict(self, p: np.ndarray) -> dict[str, float]:
        """The run's figures at terms p, its batches held as simulated (an unsaturated run's grown or
        shrunk with its requests' time in the system)."""
        w, w0 = weights(p, self.terms), weights(self.terms, self.terms)
        m = self.metrics
        out = dict(m)
        if m["saturated"]:
            pace = (self.busy @ w0) / max(self.busy @ w, 1e-12)
            for k in ("output_throughput", "request_throughput", "successful_requests"):
                out[k] = m[k] * pace
        else:  # Little's law: g times the time in the system, g times the requests in each batch
            in_system = self._in_system(w0, w0, self.terms[INGRESS])
            g = 1.0
            for _ in range(12):
                w_g = w * (1 + (g - 1) * PER_REQUEST)
                g = min(self._in_system(w_g, w0, p[INGRESS]) / in_system, MAX_GROWTH) if in_system > 0 else 1.0
            w = w * (1 + (g - 1) * PER_REQUEST)
            out["mean_num_running"] = m["mean_num_running"] * g
        tpot = self.tpot_sample @ w * 1e3
        out["tpot_mean_ms"] = float(self.tpot_mean @ w * 1e3)
        if len(tpot):
            out["tpot_median_ms"] = float(np.median(tpot))
            out["tpot_p99_ms"] = float(np.percentile(tpot, 99))
        ttft = self._ttft(w, w0, p[INGRESS]) * 1e3
        if len(ttft):
            out["ttft_mean_ms"], out["ttft_median_ms"] = float(ttft.mean()), float(np.median(ttft))
        return out

    def _ttft(self, w: np.ndarray, w0: np.ndarray, ingress: float) -> np.ndarray:
        """The sample's TTFT (s), stretched as the rows between arrival and first token are, with
        `ingress` for the trace's ingress time."""
        before = self.ttft_sample @ w0
        stretch = np.where(before > 0, (self.ttft_sample @ w) / np.where(before > 0, before, 1.0), 1.0)
        return (self.ttft_s - self.terms[INGRESS]) * stretch + ingress

    def _in_system(self, w: np.ndarray, w0: np.ndarray, ingress: float) -> float:
        """Mean seconds a request spends in the system at weights w: TTFT, then its decode rows."""
        ttft = self._ttft(w, w0, ingress)
        return (ttft.mean() if len(ttft) else 0.0) + float(self.decode_mean @ w)


# The features that grow with the number of requests in a batch: each request's host time and its
# decode token's share of the compute-bound kernels. (The memory-bound ones read the weights once
# whatever the batch; their KV reads grow too, which this leaves to the next replay.)
PER_REQUEST = np.array([name in ("compute", "requests") for name in FEATURES], dtype=np.float64)
MAX_GROWTH = 10.0  # beyond this the run would saturate: the next replay says so


def log_errors(predicted: dict, measured: dict, metrics: tuple[tuple[str, float], ...]) -> list[float]:
    """Weighted log(pred / real) of each (metric, weight) the run measured (a prediction of nothing
    counts as a thousandth of the real figure), so a run gives the same number of errors whatever
    the terms."""
    out = []
    for name, weight in metrics:
        r = measured.get(name, math.nan)
        if not (math.isfinite(r) and r > 0):
            continue
        p = predicted.get(name, math.nan)
        out.append(weight * math.log(max(p, 1e-3 * r) / r if math.isfinite(p) else 1e-3))
    return out
