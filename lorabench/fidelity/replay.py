"""Replay one measured run in the simulator: the same server settings, the same offered load, the
same measurement window, and the figures the real client and server reported.

The workload: each adapter its own Poisson stream at its rate (as the runs' client sent them), over
`window` seconds; prompt and output lengths drawn from lognormal distributions cut to the client's
filter (prompts of 4-1024 tokens, outputs of at least 4, prompt + output <= 2048, as the runs'
ShareGPT sampler kept them), with medians solved so that the kept lengths have the run's mean input
and output tokens, both of log-space sigma `LENGTH_SIGMA` = 1 (ShareGPT itself is not available
offline; its lengths are heavy-tailed, with a standard deviation about their mean, as a lognormal of
sigma 1 cut to the filter has).

The server: lorabench's per-lora strategy (vLLM's multi-LoRA) under the given engine, the model and
device given, its settings from the run. The client: requests still running when the window closes
are cancelled and not counted (the runs' client did the same), and with `client_max_inflight` the
client refuses new requests while that many are open.

Measured like the runs: throughputs are completed work over the window; TTFT and TPOT over the
completed requests; mean running and waiting requests are time averages over the window.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from lorabench.fidelity.real_runs import RealRun, is_saturated
from lorabench.presets import DEFAULT_TARGET_MODULES, DeviceSpec, ModelShape
from lorabench.fidelity.surrogate import KernelSplit
from lorabench.sim.costmodel import Efficiency, LoraSetup, ModeledExecutor
from lorabench.sim.engine import Replica
from lorabench.sim.engine_model import EngineExecutor, EngineModel
from lorabench.sim.memory import kv_bytes_per_token, plan_memory
from lorabench.sim.scheduler import SchedulerConfig
from lorabench.strategies import build_strategy
from lorabench.workload import Requests

LENGTH_SIGMA = 1.0
PROMPT_RANGE = (4, 1024)
MIN_OUTPUT = 4
MAX_TOTAL = 2048


@dataclass(frozen=True)
class ReplaySettings:
    """How a run is replayed: `window_s` of arrivals (None: the run's duration), the seed, and the
    client's limit of open requests (None: none)."""

    window_s: float | None = None
    seed: int = 0
    client_max_inflight: int | None = None


@functools.lru_cache(maxsize=256)
def length_medians(mean_input: float, mean_output: float) -> tuple[float, float]:
    """Lognormal medians (prompt, output) whose draws, cut to the client's filter, have these means."""
    z = np.random.default_rng(12345).standard_normal((2, 200_000))
    log_p, log_o = math.log(mean_input), math.log(mean_output)
    for _ in range(60):
        prompt, output = _lengths(z, log_p, log_o)
        dp, do = math.log(mean_input / prompt.mean()), math.log(mean_output / output.mean())
        log_p, log_o = log_p + dp, log_o + do
        if abs(dp) < 1e-5 and abs(do) < 1e-5:
            break
    return math.exp(log_p), math.exp(log_o)


def _lengths(z: np.ndarray, log_p: float, log_o: float) -> tuple[np.ndarray, np.ndarray]:
    prompt = np.rint(np.exp(log_p + LENGTH_SIGMA * z[0])).astype(np.int64)
    output = np.rint(np.exp(log_o + LENGTH_SIGMA * z[1])).astype(np.int64)
    keep = ((prompt >= PROMPT_RANGE[0]) & (prompt <= PROMPT_RANGE[1]) & (output >= MIN_OUTPUT)
            & (prompt + output <= MAX_TOTAL))
    return prompt[keep], output[keep]


def requests_of(run: RealRun, window_s: float, seed: int) -> Requests:
    """The run's offered load over `window_s` seconds: a Poisson stream per adapter, lengths as the
    module docstring says."""
    rng = np.random.default_rng(seed)
    rates = np.asarray(run.adapter_rates)
    counts = rng.poisson(rates * window_s)
    times = rng.uniform(0.0, window_s, counts.sum())  # given its count, a Poisson stream's times are uniform
    adapters = np.repeat(np.arange(run.n_adapters), counts)
    order = np.argsort(times, kind="stable")
    n = len(order)
    log_p, log_o = map(math.log, length_medians(run.mean_input_tokens, run.mean_output_tokens))
    prompt, output = np.empty(0, np.int64), np.empty(0, np.int64)
    while len(prompt) < n:  # draw, keep what passes the filter, until there are enough
        more_p, more_o = _lengths(rng.standard_normal((2, int(1.3 * (n - len(prompt))) + 64)), log_p, log_o)
        prompt, output = np.concatenate([prompt, more_p]), np.concatenate([output, more_o])
    return Requests(times[order], adapters[order], prompt[:n], output[:n])


class _Replica(Replica):
    """A replica whose vllm-v1 scheduler hears what each step waited for adapter copies (its trace)."""

    def _sync_loads(self) -> float:
        stall = super()._sync_loads()
        self.sched.step_stall_s = stall
        return stall


def replica_for(run: RealRun, requests: Requests, model: ModelShape, device: DeviceSpec, efficiency: Efficiency,
                engine: EngineModel, client_max_inflight: int | None, traced: bool = False) -> Replica:
    """The simulated server of `run`: per-lora under `engine` (vllm-v1 or ideal). `traced` (vllm-v1):
    its scheduler records every step row, with its kernels' compute- and memory-bound parts."""
    ranks = run.ranks()
    # The runs' adapters' modules are not recorded: vllm-v1 copies them onto every layer it wraps;
    # the ideal engine takes lorabench's default (q, k, v, o), as a run of today's lorabench would.
    modules = engine.lora_modules("per-lora", DEFAULT_TARGET_MODULES)
    strategy = engine.sized_strategy(build_strategy("per-lora", model, ranks, modules, 64, 1), model, ranks)
    reserved = engine.reserved_bytes(model, run.max_num_batched_tokens, run.max_num_seqs)
    plan = plan_memory(strategy, model.params * 2, device.memory_bytes, run.gpu_memory_utilization, run.n_adapters,
                       run.max_loras, 0, reserved)
    if plan.status != "ok":
        raise ValueError(f"{run.name}: {plan.status}")
    lora = LoraSetup("per-lora", ranks, modules, resident_slots=plan.slots)
    kernels = KernelSplit(model, device, lora, efficiency) if traced else ModeledExecutor(model, device, lora, efficiency)
    executor = EngineExecutor(kernels, engine) if engine.v1 else kernels
    config = SchedulerConfig(max_num_seqs=run.max_num_seqs, max_num_batched_tokens=run.max_num_batched_tokens,
                             chunked_prefill=True, kv_policy="preempt", vllm_v1=engine.v1,
                             client_max_inflight=client_max_inflight if engine.v1 else None, ingress_s=engine.ingress_s)
    replica = _Replica(requests, strategy, plan, executor, config, kv_bytes_per_token(model.layers, model.kv_dim),
                       run.max_cpu_loras)
    if traced:
        replica.sched.record_steps()
        replica.sched.kernel_split = kernels.split
    return replica


def replay(run: RealRun, model: ModelShape, device: DeviceSpec, efficiency: Efficiency, engine: EngineModel,
           settings: ReplaySettings = ReplaySettings(), traced: bool = False):
    """Predicted figures of `run` (real_runs.METRICS, successful_requests, mean_num_waiting,
    saturated), measured as the run's client and server measured them. With `traced` (vllm-v1
    only), also the replica and its requests, for a surrogate (surrogate.RunTrace)."""
    window = settings.window_s or run.duration_s
    requests = requests_of(run, window, settings.seed)
    replica = replica_for(run, requests, model, device, efficiency, engine, settings.client_max_inflight, traced)
    replica.start()
    replica.env.run(until=window)
    metrics = window_metrics(replica, requests, window, run)
    return (metrics, replica, requests) if traced else metrics


def window_metrics(replica: Replica, requests: Requests, window: float, run: RealRun) -> dict[str, float]:
    s = replica.sched
    done = np.isfinite(s.finish_s)
    output = requests.output_tokens[done]
    ttft = (s.first_token_s[done] - requests.arrival_s[done]) * 1e3
    multi = output > 1
    tpot = (s.finish_s[done][multi] - s.first_token_s[done][multi]) / (output[multi] - 1) * 1e3
    if hasattr(s, "finish_window"):
        s.finish_window(window)
        running, waiting = s.running_area / window, s.waiting_area / window
    else:  # the ideal engine's scheduler keeps no integrals: running from the steps, waiting unknown
        steps = replica.rows
        running = float(np.dot(steps["batch_size"], steps["duration_s"])) / window
        waiting = math.nan
    completed = int(done.sum())

    def stat(values, fn):
        return float(fn(values)) if len(values) else math.nan

    scale = run.duration_s / window  # a shorter window's counts, as over the run's duration
    out = {
        "output_throughput": float(output.sum()) / window,
        "request_throughput": completed / window,
        "ttft_mean_ms": stat(ttft, np.mean), "ttft_median_ms": stat(ttft, np.median),
        "tpot_mean_ms": stat(tpot, np.mean), "tpot_median_ms": stat(tpot, np.median),
        "tpot_p99_ms": stat(tpot, lambda v: np.percentile(v, 99)),
        "mean_num_running": running, "mean_num_waiting": waiting, "successful_requests": completed * scale,
    }
    out["saturated"] = is_saturated(completed * scale, run.offered_rate, run.duration_s, waiting)
    return out
