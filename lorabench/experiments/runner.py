"""One experiment: a workload served by every chosen strategy on the same request stream.

`run_experiment(RunConfig(...), out_dir)` is a pure function of its config (and seed): it returns the
summary (one row per strategy, the single-LoRA baseline first) and, given `out_dir`, writes there
atomically: config.json, summary.csv, requests/<strategy>.csv, steps/<strategy>.csv and
bench/<strategy>.json (`vllm bench serve`-compatible, bench_json.py).

Executors plug in by name: `EXECUTORS[name]` is a module with
`make_executor(config, model, device, lora: LoraSetup) -> Executor`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import simpy
from tqdm.auto import tqdm

from lorabench import __version__
from lorabench.errors import LorabenchError
from lorabench.experiments.points import InProcess, local_backend
from lorabench.outputs.bench_json import write_bench_result
from lorabench.outputs.results import atomic_dir, write_csv, write_json
from lorabench.parallel import KV_CACHE_DTYPES, WEIGHT_DTYPES, Parallel, check_fits, shard
from lorabench.presets import DeviceSpec, ModelShape, device_preset, model_preset
from lorabench.sim.cluster import ROUTERS, Cluster, Router
from lorabench.sim.costmodel import Efficiency, LoraSetup, apply_profile, load_profile
from lorabench.sim.engine import Replica, RunResult, SimulationStuck
from lorabench.sim.engine_model import ENGINES, EngineExecutor, EngineFile, resolve_engine
from lorabench.sim.executor import Executor
from lorabench.sim.memory import EVICTION_POLICIES, MemoryPlan, kv_bytes_per_token, plan_memory
from lorabench.sim.metrics import (
    CLUSTER_COLUMNS, REPLICA_COLUMNS, REQUEST_COLUMNS, SLO, STEP_COLUMNS, SUMMARY_COLUMNS, replicas_frame,
    requests_frame, steps_frame, summarize,
)
from lorabench.sim.scheduler import SchedulerConfig
from lorabench.strategies import STRATEGIES, Strategy, build_strategy
from lorabench.workload import Requests, Workload, load_workload

EXECUTORS = {"modeled": "lorabench.sim.costmodel", "measured": "lorabench.sim.measured"}
KV_POLICIES = ("reserve", "preempt")


@dataclass(frozen=True)
class RunConfig:
    """Everything a run depends on. None = the workload file's value."""

    workload: str = "zipf"  # shipped name or path to a .toml
    n_loras: int | None = None
    rate: float | None = None
    requests: int | None = None
    duration: float | None = None
    seed: int | None = None
    alpha: float | None = None
    ranks: tuple[int, ...] | None = None  # adapter rank(s), overriding [adapters] ranks
    time_scale: float | None = None  # trace replay: replay seconds per trace second ([trace] time_scale)
    trace_window: tuple[float, float] | None = None  # trace replay: [start, end) in trace seconds ([trace] window)
    strategies: tuple[str, ...] = STRATEGIES  # the single baseline is always run (first)
    model: str = "mistral-7b"
    device: str = "h200"
    executor: str = "modeled"  # or "measured"
    profile: str | None = None  # JSON replacing device figures / cost-model efficiencies
    adapters: str | None = None  # measured: a PEFT adapter collection (else random weights of the ranks)
    compressed: str | None = None  # measured: a collection from `lorabench compress` for the compressed strategy
    torch_device: str | None = None  # measured: where it runs (None: cuda when present, else cpu)
    cuda_graphs: bool = True  # measured: replay decode steps as CUDA graphs (on CUDA)
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    chunked_prefill: bool = False
    block_size: int = 16  # KV-cache block, tokens
    kv_policy: str = "reserve"  # "reserve" (wait for memory) or "preempt" (grow, preempt newest)
    max_loras: int | None = None  # per-lora GPU slots = distinct adapters per batch (None: matched memory)
    max_cpu_loras: int | None = None  # host-memory adapter cache (None: all adapters in host memory)
    storage_bandwidth: float = 2e9  # bytes/s reading an adapter missing from the host cache
    packed_adapters: bool = False  # one host buffer per adapter: a load is one copy, not one per tensor
    replicas: int = 1  # identical GPUs, each a replica with its own scheduler and memory (sim/cluster.py)
    router: str = "round-robin"  # which replica a request goes to: round-robin, least-loaded, power-of-two, affinity
    affinity_slack: float = 0.25  # affinity: spill when the home replica's load would exceed (1 + slack) x mean
    eviction: str = "lru"  # which unused adapter leaves the GPU first: lru, fifo or lfu (sim/memory.py)
    pin_hot: int = 0  # the K adapters with the most requests stay on the GPU from the start, never evicted
    ttft_slo_ms: float = 2000.0
    tpot_slo_ms: float = 100.0
    save_detailed: bool | None = None  # bench/*.json per-request arrays: None = only for small runs (bench_json.py)
    tp: int = 1  # tensor-parallel GPUs per replica (lorabench/parallel.py); GPUs in all = replicas x tp
    weight_dtype: str = "bf16"  # base weights: bf16 or fp8
    kv_cache_dtype: str = "auto"  # KV cache: auto (the model's bf16) or fp8
    engine: str = "ideal"  # what the serving engine adds and decides: ideal, or vllm-v1 (sim/engine_model.py)
    engine_profile: str | None = None  # vllm-v1: a fitted engine JSON (None: the shipped results/engines/ one)

    def __post_init__(self) -> None:
        strategies = tuple(self.strategies)
        unknown = [s for s in strategies if s not in STRATEGIES]
        if unknown:
            raise LorabenchError(f"strategies: unknown {', '.join(unknown)}; choose among {', '.join(STRATEGIES)}")
        object.__setattr__(self, "strategies", ("single",) + tuple(s for s in STRATEGIES[1:] if s in strategies))
        if self.ranks is not None:
            object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
        if self.trace_window is not None:
            object.__setattr__(self, "trace_window", tuple(float(t) for t in self.trace_window))
        checks = [
            ("n_loras", self.n_loras is None or self.n_loras >= 1, ">= 1"),
            ("rate", self.rate is None or 0 < self.rate < math.inf, "a finite number > 0 of requests per second"),
            ("seed", self.seed is None or self.seed >= 0, "an integer >= 0"),
            ("requests", self.requests is None or self.requests >= 1, ">= 1"),
            ("duration", self.duration is None or self.duration > 0, "> 0 seconds"),
            ("alpha", self.alpha is None or 0 <= self.alpha < math.inf, "a finite number >= 0"),
            ("time_scale", self.time_scale is None or 0 < self.time_scale < float("inf"), "> 0"),
            ("trace_window", self.trace_window is None or (len(self.trace_window) == 2
                                                           and 0 <= self.trace_window[0] < self.trace_window[1]),
             "START,END seconds with 0 <= START < END"),
            ("ranks", self.ranks is None or (len(self.ranks) > 0 and min(self.ranks) >= 1), "positive integers"),
            ("gpu_memory_utilization", 0 < self.gpu_memory_utilization <= 1, "in (0, 1]"),
            ("max_num_seqs", self.max_num_seqs >= 1, ">= 1"),
            ("max_num_batched_tokens", self.max_num_batched_tokens >= self.max_num_seqs, ">= max_num_seqs"),
            ("block_size", self.block_size >= 1, ">= 1"),
            ("kv_policy", self.kv_policy in KV_POLICIES, f"one of {', '.join(KV_POLICIES)}"),
            ("max_loras", self.max_loras is None or self.max_loras >= 1, ">= 1"),
            ("max_cpu_loras", self.max_cpu_loras is None or self.max_cpu_loras >= 1, ">= 1"),
            ("storage_bandwidth", self.storage_bandwidth > 0, "> 0"),
            ("replicas", self.replicas >= 1, ">= 1"),
            ("router", self.router in ROUTERS, f"one of {', '.join(ROUTERS)}"),
            ("affinity_slack", self.affinity_slack >= 0, ">= 0"),
            ("eviction", self.eviction in EVICTION_POLICIES, f"one of {', '.join(EVICTION_POLICIES)}"),
            ("pin_hot", self.pin_hot >= 0, ">= 0"),
            ("executor", self.executor in EXECUTORS, f"one of {', '.join(EXECUTORS)}"),
            ("ttft_slo_ms", self.ttft_slo_ms > 0, "> 0"),
            ("tpot_slo_ms", self.tpot_slo_ms > 0, "> 0"),
            ("tp", self.tp >= 1, ">= 1"),
            ("weight_dtype", self.weight_dtype in WEIGHT_DTYPES, f"one of {', '.join(WEIGHT_DTYPES)}"),
            ("kv_cache_dtype", self.kv_cache_dtype in KV_CACHE_DTYPES, f"one of {', '.join(KV_CACHE_DTYPES)}"),
            ("engine", self.engine in ENGINES, f"one of {', '.join(ENGINES)}"),
            ("engine_profile", self.engine_profile is None or self.engine == "vllm-v1", "given only with engine vllm-v1"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise LorabenchError(f"{name} must be {what}, got {getattr(self, name)!r}")
        if self.executor == "measured" and not self.parallel.default:
            raise LorabenchError("executor measured runs one GPU in bf16: --tp, --weight-dtype fp8 and --kv-cache-dtype "
                                 "fp8 are modeled only (--executor modeled)")
        if self.engine == "vllm-v1" and not self.parallel.default:
            # its memory reservation and LoRA slots are sized for one unsharded bf16 GPU, as it was fitted
            raise LorabenchError("engine vllm-v1 was fitted on one GPU in bf16: --tp, --weight-dtype fp8 and "
                                 "--kv-cache-dtype fp8 run with --engine ideal")

    @property
    def parallel(self) -> Parallel:
        return Parallel(self.tp, self.weight_dtype, self.kv_cache_dtype)

    def load_workload(self) -> Workload:
        return load_workload(self.workload, n_loras=self.n_loras, requests=self.requests, duration=self.duration,
                             seed=self.seed, rate=self.rate, alpha=self.alpha, ranks=self.ranks,
                             time_scale=self.time_scale, trace_window=self.trace_window)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise LorabenchError(f"{source}: unknown field(s) {', '.join(unknown)}")
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | Path) -> "RunConfig":
        """Reload a run's config.json (or a JSON object of RunConfig fields)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise LorabenchError(f"{path}: cannot read a run config ({err})") from None
        return cls.from_dict(data.get("config", data), source=str(path))


def _executor_factory(name: str):
    try:
        return importlib.import_module(EXECUTORS[name]).make_executor
    except ModuleNotFoundError as err:
        if err.name == EXECUTORS[name]:
            raise LorabenchError(f"executor {name!r} is not available in this installation") from None
        raise


def kernel_profile(config: RunConfig, engine: EngineFile) -> str | None:
    """Where the modeled executor's device figures and kernel factors come from: --profile, or a
    vllm-v1 engine file that was fitted on this device (its figures were fitted with its terms)."""
    if engine.engine.v1 and engine.fit.get("device") == config.device and (engine.device or engine.efficiency):
        if config.profile is not None:
            raise LorabenchError(f"--profile {config.profile}: engine file {engine.source} holds the {config.device} "
                                 "figures it was fitted with; give one of the two")
        return engine.source
    return config.profile


def _resolve_device(config: RunConfig, profile: str | None) -> DeviceSpec:
    """The device preset, with a profile's device figures applied."""
    device = device_preset(config.device)
    if profile is not None:
        device, _ = apply_profile(load_profile(profile), device, Efficiency())
    return device


def check_context(requests: Requests, model: ModelShape, workload: Workload) -> None:
    """Refuse requests longer than the model's context (prompt + output tokens > max_context): a server
    rejects them, so serving them would give figures no deployment of this model can reach."""
    if not len(requests):
        raise LorabenchError(f"workload {workload.source}: no requests to serve (check requests, duration and the "
                             "trace window)")
    total = requests.prompt_tokens + requests.output_tokens
    over = np.flatnonzero(total > model.max_context)
    if over.size:
        i = int(over[np.argmax(total[over])])
        raise LorabenchError(
            f"workload {workload.source}: {over.size} of {len(requests)} requests exceed the {model.max_context:,}-token "
            f"context of model {model.name}; the longest, request {i}, has {requests.prompt_tokens[i]:,} prompt + "
            f"{requests.output_tokens[i]:,} output tokens (lower the workload's [prompt]/[output] lengths, or choose a "
            "model with a longer context)"
        )


def check_parallel(config: RunConfig, engine: EngineFile | None = None) -> tuple[ModelShape, DeviceSpec]:
    """The run's model and device, after one clear error if the model cannot be split `tp` ways,
    the device lacks what the formats or the link need, or the weights alone fill each GPU."""
    engine = engine or resolve_engine(config.engine, config.engine_profile)
    model, device = model_preset(config.model), _resolve_device(config, kernel_profile(config, engine))
    shard(model, config.tp)
    config.parallel.check_device(device)
    check_fits(model, config.parallel, device, config.gpu_memory_utilization)
    return model, device


class StrategyUnavailable(RuntimeError):
    """The strategy cannot serve this experiment (its message is the summary's status)."""


@dataclass(frozen=True)
class Experiment:
    """What every strategy of one run shares: the request stream, model, device, adapters."""

    config: RunConfig
    workload: Workload
    requests: Requests
    model: ModelShape
    device: DeviceSpec
    ranks: np.ndarray  # rank of every adapter
    clusters: np.ndarray  # cluster of every adapter (compressed)
    engine: EngineFile  # the serving engine's terms (ideal: none)

    @classmethod
    def build(cls, config: RunConfig) -> "Experiment":
        workload = config.load_workload()
        requests = workload.generate()
        engine = resolve_engine(config.engine, config.engine_profile)
        longest = int(requests.prompt_tokens.max()) if len(requests) else 0
        if not (config.chunked_prefill or engine.engine.v1) and longest > config.max_num_batched_tokens:
            raise LorabenchError(
                f"max_num_batched_tokens ({config.max_num_batched_tokens}) is below the longest prompt of workload "
                f"{workload.source} ({longest} tokens): raise it or enable chunked prefill"
            )
        model, device = check_parallel(config, engine)
        check_context(requests, model, workload)
        return cls(config, workload, requests, model, device, workload.adapter_ranks(), workload.adapter_clusters(),
                   engine)

    def strategy(self, name: str) -> Strategy:
        ad = self.workload.adapters
        built = build_strategy(name, self.model, self.ranks, ad.target_modules, ad.compressed_rank, ad.clusters,
                               packed=self.config.packed_adapters, tp=self.config.tp)
        return self.engine.engine.sized_strategy(built, self.model, self.ranks)

    def plan(self, strategy: Strategy) -> MemoryPlan:
        """The strategy's share of the fair budget of one GPU (of the replica's tp); per-lora slots
        default to the compressed strategy's adapter memory (matched memory, as the paper compared)."""
        compressed = self.strategy("compressed")
        cfg = self.config
        matched = compressed.shared_bytes + compressed.total_adapter_bytes
        weights = shard(self.model, cfg.tp).weight_bytes(cfg.parallel.weight_bytes)
        reserved = self.engine.engine.reserved_bytes(self.model, cfg.max_num_batched_tokens, cfg.max_num_seqs)
        return plan_memory(strategy, weights, self.device.memory_bytes, cfg.gpu_memory_utilization,
                           self.workload.n_loras, cfg.max_loras, matched, reserved)

    def pinned(self, strategy: Strategy, plan: MemoryPlan) -> tuple[int, ...]:
        """The adapters `pin_hot` keeps on the GPU: those with the most requests in the stream (ties:
        the lower id). Raises StrategyUnavailable when they leave no room for the others."""
        k = self.config.pin_hot
        if k == 0 or plan.preload:  # single and compressed hold every adapter they serve from the start
            return ()
        counts = np.bincount(self.requests.adapter, minlength=self.workload.n_loras)
        hot = tuple(int(a) for a in np.argsort(-counts, kind="stable")[:k])
        if plan.max_distinct is not None and k >= plan.slots:
            raise StrategyUnavailable(f"pin_hot {k} leaves no GPU slot for the other adapters ({plan.slots} slots)")
        if strategy.adapter_bytes[list(hot)].sum() > plan.adapter_capacity // 2:
            raise StrategyUnavailable(f"pin_hot {k}: the pinned adapters take over half the adapter memory")
        return hot

    def serve(self, name: str, executor: Executor | None = None, progress=None) -> RunResult:
        """Run strategy `name` on the request stream (with `replicas` > 1: on that many identical
        replicas behind the router). `executor` replaces the configured one (shared by the replicas,
        so it must keep no state between steps). Raises StrategyUnavailable when the strategy cannot
        serve (its memory does not fit, or a request never can)."""
        cfg, ad = self.config, self.workload.adapters
        strategy = self.strategy(name)
        plan = self.plan(strategy)
        if plan.status != "ok":
            raise StrategyUnavailable(plan.status)
        engine = self.engine.engine
        lora = LoraSetup(name, self.ranks, engine.lora_modules(name, ad.target_modules), ad.compressed_rank,
                         self.clusters, plan.slots)
        kernels = dataclasses.replace(cfg, profile=kernel_profile(cfg, self.engine))

        def replica(**where) -> Replica:
            sched = SchedulerConfig(
                max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
                chunked_prefill=cfg.chunked_prefill or engine.v1, block_size=cfg.block_size,
                kv_policy="preempt" if engine.v1 else cfg.kv_policy, vllm_v1=engine.v1, ingress_s=engine.ingress_s,
            )
            runs = executor or _executor_factory(cfg.executor)(kernels, self.model, self.device, lora)
            if engine.v1:
                runs = EngineExecutor(runs, engine)
            return Replica(self.requests if not where else Requests.empty(), strategy, plan, runs, sched,
                           kv_bytes_per_token(self.model.layers, shard(self.model, cfg.tp).kv_dim, cfg.parallel.kv_bytes),
                           cfg.max_cpu_loras,
                           cfg.storage_bandwidth, progress=progress, eviction=cfg.eviction,
                           pinned=self.pinned(strategy, plan), **where)

        try:
            if cfg.replicas == 1:
                served = replica()
                result = served.run()
            else:
                env = simpy.Environment()
                replicas = [replica(env=env, capacity=len(self.requests)) for _ in range(cfg.replicas)]
                router = Router(cfg.router, cfg.replicas, self.workload.seed, cfg.affinity_slack)
                served = replicas[0]
                result = Cluster(self.requests, replicas, router, env).run()
        except SimulationStuck as err:
            raise StrategyUnavailable(f"cannot serve: {err}") from None
        result.device = getattr(served.executor, "device_label", None)
        return result


def run_experiment(config: RunConfig, out_dir: str | Path | None = None, progress: bool = True,
                   jobs: int = 1, exp: Experiment | None = None) -> pd.DataFrame:
    """Serve the workload with every strategy of `config`; return the summary (one row per strategy).

    With `out_dir`, also writes the run folder there atomically (it must not exist yet). `jobs` > 1
    serves the strategies in that many worker processes (modeled runs only: a measured run times
    its steps on one device, one strategy after another); the results are the same. `exp`: the
    experiment of `config` when the caller has built it already."""
    if out_dir is not None and Path(out_dir).exists():
        raise LorabenchError(f"out_dir {out_dir}: already exists; choose a new folder")
    exp = exp if exp is not None else Experiment.build(config)
    created = datetime.now(timezone.utc)
    backend = local_backend(jobs) if config.executor == "modeled" else InProcess()
    with atomic_dir(out_dir) if out_dir is not None else contextlib.nullcontext() as tmp:
        # disable=None: tqdm draws bars only on a terminal, so a log gets no cursor codes
        bars = {name: tqdm(total=len(exp.requests), desc=f"{name:>10}", unit="req", position=i,
                           disable=not progress or None) for i, name in enumerate(config.strategies)}

        def advance(name: str, n: int) -> None:
            bar = bars[name]
            bar.update(min(n, bar.total - bar.n))  # ticks may come late from another process

        rows = {}
        try:
            serve = functools.partial(_serve_strategy, exp, tmp, created)
            for name, row in backend.map_unordered(serve, config.strategies, on_progress=advance):
                rows[name] = row
                advance(name, bars[name].total)
        finally:
            for bar in bars.values():
                bar.close()
        summary = _summary_frame([rows[name] for name in config.strategies], exp)
        if tmp is not None:
            _write_config(tmp, exp, created)
            write_csv(tmp / "summary.csv", summary)
    return summary


def _serve_strategy(exp: Experiment, folder: Path | None, created: datetime, name: str, ticks) -> dict:
    """Serve strategy `name`; write its records into `folder` (if any); return its summary row."""
    row = {"strategy": name, "status": "ok"}
    try:
        result = exp.serve(name, progress=ticks)
    except StrategyUnavailable as why:
        row["status"] = str(why)
        cluster = ("replica",) if exp.config.replicas > 1 else ()
        frames = pd.DataFrame(columns=REQUEST_COLUMNS + cluster), pd.DataFrame(columns=STEP_COLUMNS + cluster)
        replicas = pd.DataFrame(columns=REPLICA_COLUMNS)
    else:
        row.update(summarize(result, SLO(exp.config.ttft_slo_ms, exp.config.tpot_slo_ms)))
        row["device"] = result.device
        frames = requests_frame(result), steps_frame(result)
        replicas = replicas_frame(result) if result.replica_stats is not None else None
    if folder is not None:
        write_csv(folder / "requests" / f"{name}.csv", frames[0])
        write_csv(folder / "steps" / f"{name}.csv", frames[1])
        if exp.config.replicas > 1:
            write_csv(folder / "replicas" / f"{name}.csv", replicas)
        if row["status"] == "ok":
            summary = _summary_frame([row], exp).set_index("strategy", drop=False).iloc[0]
            write_bench_result(folder, summary, *frames, exp.config, exp.workload, exp.model, created)
    return row


def _summary_frame(rows: list[dict], exp: Experiment) -> pd.DataFrame:
    config, workload, device = exp.config, exp.workload, exp.device
    df = pd.DataFrame(rows)
    columns = SUMMARY_COLUMNS + (CLUSTER_COLUMNS if config.replicas > 1 else ())
    for col in columns:
        if col not in df:
            df[col] = np.nan
    df["n_loras"] = workload.n_loras
    df["device"] = [d if isinstance(d, str) else device.name for d in df["device"]]  # measured: its own label
    df["model"], df["workload"] = exp.model.name, workload.name
    df["executor"], df["requests"] = config.executor, len(exp.requests)
    base = df.loc[df["strategy"] == "single", "output_throughput"]
    df["throughput_vs_single"] = df["output_throughput"] / float(base.iloc[0]) if len(base) else np.nan
    return df[list(columns)]


def _write_config(folder: Path, exp: Experiment, created: datetime) -> None:
    write_json(folder / "config.json", {
        "config": exp.config.to_dict(),
        "workload": exp.workload.to_dict(),
        "model": dataclasses.asdict(exp.model),
        "device": dataclasses.asdict(exp.device),
        "lorabench_version": __version__,
        "created_utc": created.isoformat(timespec="seconds"),
    })
