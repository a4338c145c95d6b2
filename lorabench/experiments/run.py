"""`lorabench run`: serve one workload with every strategy and compare each with single-LoRA serving."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import textwrap
from pathlib import Path

import pandas as pd

from lorabench.errors import LorabenchError
from lorabench.experiments.runner import EXECUTORS, KV_POLICIES, Experiment, RunConfig, run_experiment
from lorabench.outputs.results import default_run_dir
from lorabench.outputs.tables import format_number, why_nothing_ran
from lorabench.parallel import KV_CACHE_DTYPES, WEIGHT_DTYPES
from lorabench.presets import DEVICES, MODEL_HELP
from lorabench.sim.cluster import ROUTERS
from lorabench.sim.engine_model import ENGINES
from lorabench.sim.memory import EVICTION_POLICIES
from lorabench.strategies import parse_strategies
from lorabench.workload import builtin_workloads

# Columns of the printed table: (summary column, header)
TABLE = (
    ("strategy", "strategy"), ("status", "status"), ("output_throughput", "tok/s"),
    ("throughput_vs_single", "vs single"), ("request_throughput", "req/s"), ("ttft_p50_ms", "TTFT p50 ms"),
    ("ttft_p99_ms", "TTFT p99 ms"), ("tpot_p50_ms", "TPOT p50 ms"), ("tpot_p99_ms", "TPOT p99 ms"),
    ("goodput", "goodput req/s"), ("gpu_memory_peak_gib", "GPU GiB"), ("memory_adapters_gib", "adapters GiB"),
    ("adapter_loads", "loads"), ("adapter_hit_rate", "hit rate"), ("mean_batch_size", "batch"),
    ("mean_distinct_adapters", "distinct"),
)


def rank_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a rank or a comma list like 8,16,32,64, got {text!r}") from None


def trace_window(text: str) -> tuple[float, float]:
    try:
        start, end = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START,END in seconds like 600,1200, got {text!r}") from None
    return start, end


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", default="zipf",
                   help=f"shipped workload ({', '.join(builtin_workloads())}) or a .toml path (default: %(default)s)")
    p.add_argument("--n-loras", type=int, help="number of adapters (overrides the workload)")
    p.add_argument("--strategy", default="all", help="all, or a comma list of single,per-lora,paged,compressed "
                   "(single always runs: it is the baseline) (default: %(default)s)")
    p.add_argument("--model", default="mistral-7b", help=f"base model: {MODEL_HELP} (default: %(default)s)")
    p.add_argument("--device", default="h200", choices=sorted(DEVICES),
                   help="GPU whose memory the server plans with and whose figures the cost model uses "
                   "(default: %(default)s)")
    p.add_argument("--executor", choices=sorted(EXECUTORS),
                   help="measured (the real decoder and kernels, timed; the default when CUDA is present) or modeled "
                   "(a cost model of --device; the default elsewhere)")
    p.add_argument("--adapters", help="measured: a PEFT adapter collection folder (default: random weights)")
    p.add_argument("--compressed", help="measured: a collection from `lorabench compress` for the compressed strategy")
    p.add_argument("--torch-device", help="measured: torch device to run on (default: cuda if present, else cpu)")
    p.add_argument("--eager", action="store_true", help="measured: no CUDA graphs for decode steps")
    p.add_argument("--profile", help="profile JSON replacing device figures and cost-model efficiencies (default: "
                   "results/profiles/<device>-<model>.json when it exists, else <device>-vidur.json: the kernel "
                   "physics fitted to Vidur's measurements, shipped for h100 and a100)")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel GPUs per replica (modeled only): weights, KV heads and adapters sharded as "
                   "vLLM does, two all-reduces per layer; GPUs in all = replicas x tp (default: %(default)s)")
    p.add_argument("--weight-dtype", default="bf16", choices=WEIGHT_DTYPES,
                   help="base weights (modeled only; LoRA stays bf16): fp8 halves their bytes and runs the GEMMs at the "
                   "device's FP8 rate (Hopper, Ada, Blackwell) (default: %(default)s)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="KV cache (modeled only): auto = the model's bf16, fp8 halves its bytes (default: %(default)s)")
    p.add_argument("--engine", default="ideal", choices=ENGINES,
                   help="what the serving engine adds to the kernels and how it schedules: ideal (no host time, "
                   "no reserved memory) or vllm-v1 (vLLM 0.8.5's V1 engine with fitted terms) (default: %(default)s)")
    p.add_argument("--engine-profile", metavar="FILE",
                   help="--engine vllm-v1: a fitted engine JSON from `lorabench calibrate` (default: the shipped "
                   "results/engines/vllm-0.8.5-h100-64gb.json)")
    p.add_argument("--requests", type=int, help="number of requests (overrides the workload)")
    p.add_argument("--rate", type=float, help="arrival rate, requests/s (overrides the workload)")
    p.add_argument("--duration", type=float, help="stop arrivals after this many seconds (default: the workload's)")
    p.add_argument("--seed", type=int, help="random seed, an integer >= 0 (overrides the workload)")
    p.add_argument("--alpha", type=float, help="popularity exponent (zipf alpha / slora-power alpha)")
    p.add_argument("--rank", type=rank_list,
                   help="adapter rank, or a comma list to draw from (e.g. 8,16,32,64)")
    p.add_argument("--time-scale", type=float,
                   help="trace replay: replay seconds per trace second (0.5 replays twice as fast)")
    p.add_argument("--trace-window", type=trace_window, metavar="START,END",
                   help="trace replay: only the rows from START to END seconds of the trace's clock")
    p.add_argument("--max-num-seqs", type=int, default=256,
                   help="most requests running in one batch, as vLLM's flag (default: %(default)s)")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192,
                   help="most tokens one step processes, as vLLM's flag (default: %(default)s)")
    p.add_argument("--chunked-prefill", action="store_true",
                   help="split long prompts into chunks that share steps with decodes (default: whole prompts)")
    p.add_argument("--kv-policy", default="reserve", choices=KV_POLICIES,
                   help="reserve: requests wait for KV memory; preempt: allocate as they grow, preempt the newest "
                   "(default: %(default)s)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of the device's memory the server may use, in (0, 1], as vLLM's flag; the base "
                   "weights come out of it, the rest holds adapters and KV cache (default: %(default)s)")
    p.add_argument("--max-loras", type=int, help="per-lora GPU adapter slots (default: matched memory with compressed)")
    p.add_argument("--max-cpu-loras", type=int, help="per-lora host-memory adapter cache (default: all)")
    p.add_argument("--replicas", type=int, default=1,
                   help="identical GPUs behind a router, each with its own scheduler, KV cache and adapter memory "
                   "(default: %(default)s)")
    p.add_argument("--router", default="round-robin", choices=ROUTERS,
                   help="which replica a request goes to (with --replicas): round-robin, least-loaded (fewest "
                   "outstanding tokens), power-of-two (the less loaded of two at random), affinity (an adapter's "
                   "home replica by consistent hashing, spilling to the least loaded when it is busy) "
                   "(default: %(default)s)")
    p.add_argument("--affinity-slack", type=float, default=0.25,
                   help="affinity router: spill when the home replica's load would exceed (1 + slack) x the mean "
                   "(default: %(default)s)")
    p.add_argument("--eviction", default="lru", choices=EVICTION_POLICIES,
                   help="which unused adapter leaves the GPU first when room is needed (per-lora, paged): least "
                   "recently used, first loaded, or least frequently used (default: %(default)s)")
    p.add_argument("--pin-hot", type=int, default=0, metavar="K",
                   help="the K adapters with the most requests stay on the GPU from the start and are never evicted "
                   "(default: %(default)s)")
    p.add_argument("--packed-adapters", action="store_true",
                   help="adapters in one contiguous host buffer each: one copy per load instead of one per tensor")
    p.add_argument("--ttft-slo-ms", type=float, default=2000.0,
                   help="goodput objective: time to first token at most this many ms (default: %(default)g)")
    p.add_argument("--tpot-slo-ms", type=float, default=100.0,
                   help="goodput objective: time per output token after the first at most this many ms "
                   "(default: %(default)g)")
    p.add_argument("--save-detailed", action=argparse.BooleanOptionalAction, default=None,
                   help="per-request arrays (ttfts, itls, ...) in bench/<strategy>.json, as vllm bench serve "
                   "--save-detailed (default: only when a strategy's inter-token latencies are at most 100,000)")
    p.add_argument("--jobs", type=int, help="strategies served in parallel processes (default: one per CPU core, "
                   "up to the number of strategies; a measured run serves them one after another)")
    p.add_argument("--out", type=Path, help="run folder (default results/<timestamp>-<workload>-<n>)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (there are none anyway when stderr is not a terminal)")


# RunConfig fields that are flags of the same name (ranks: --rank), for its error messages
FLAG_FIELDS = ("n_loras", "max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization", "max_loras",
               "max_cpu_loras", "ttft_slo_ms", "tpot_slo_ms", "requests", "rate", "duration", "alpha", "ranks",
               "time_scale", "trace_window", "pin_hot", "replicas", "affinity_slack", "seed", "tp",
               "engine_profile")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    try:
        return _config_from_args(args)
    except LorabenchError as err:
        # RunConfig names fields; on the command line they are flags.
        msg = str(err)
        for field in FLAG_FIELDS:
            if msg.startswith(field + " "):
                flag = "--rank" if field == "ranks" else "--" + field.replace("_", "-")
                msg = flag + msg[len(field):]
                break
        raise LorabenchError(msg) from None


def _config_from_args(args: argparse.Namespace) -> RunConfig:
    return RunConfig(
        workload=args.workload, n_loras=args.n_loras, rate=args.rate, requests=args.requests,
        duration=args.duration, seed=args.seed, alpha=args.alpha, ranks=args.rank,
        strategies=parse_strategies(args.strategy), model=args.model, device=args.device,
        executor=args.executor or default_executor(),
        profile=args.profile or (found_profile(args) if args.engine == "ideal" else None),
        adapters=args.adapters, compressed=args.compressed, torch_device=args.torch_device,
        cuda_graphs=not args.eager, gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, chunked_prefill=args.chunked_prefill,
        kv_policy=args.kv_policy, max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras,
        packed_adapters=args.packed_adapters, replicas=args.replicas, router=args.router,
        affinity_slack=args.affinity_slack, eviction=args.eviction, pin_hot=args.pin_hot,
        time_scale=args.time_scale, trace_window=args.trace_window,
        ttft_slo_ms=args.ttft_slo_ms, tpot_slo_ms=args.tpot_slo_ms, save_detailed=args.save_detailed,
        tp=args.tp, weight_dtype=args.weight_dtype, kv_cache_dtype=args.kv_cache_dtype,
        engine=args.engine, engine_profile=args.engine_profile,
    )


def found_profile(args: argparse.Namespace) -> str | None:
    """Without --profile, the measured profile of the run's device and model, else the device's
    Vidur-fitted kernel physics, if either exists (`costmodel.default_profile`)."""
    from lorabench.sim.costmodel import default_profile

    found = default_profile(args.device, args.model)
    return None if found is None else str(found)


# Device files of a GPU torch could use (NVIDIA, ROCm, WSL2); without one, importing torch (seconds,
# and 200 MB) only to hear that CUDA is absent is skipped.
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


def default_executor() -> str:
    """measured where CUDA is present, modeled elsewhere."""
    if sys.platform == "darwin" or (sys.platform.startswith("linux") and not any(map(os.path.exists, GPU_DEVICE_FILES))):
        return "modeled"
    try:
        import torch
    except ImportError:  # installed without the gpu extra: the modeled path is all there is
        return "modeled"

    return "measured" if torch.cuda.is_available() else "modeled"


def default_jobs(config: RunConfig) -> int:
    """One process per strategy up to the CPU cores (modeled); a measured run times one strategy at a time."""
    return min(len(config.strategies), os.cpu_count() or 1) if config.executor == "modeled" else 1


def main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    exp = Experiment.build(config)  # every refusal of the setup before anything is printed or written
    workload = exp.workload
    out = args.out or default_run_dir(config.workload, workload.n_loras)
    if out.exists():
        raise LorabenchError(f"--out {out}: already exists; choose a new folder")
    print(f"lorabench run: workload {workload.name} ({workload.source}), {workload.n_loras} adapters, "
          f"{where_it_runs(config)}")
    if args.jobs is not None and args.jobs < 1:
        raise LorabenchError(f"--jobs {args.jobs}: must be >= 1")
    jobs = args.jobs or default_jobs(config)
    summary = run_experiment(config, out_dir=out, progress=not args.no_progress, jobs=jobs, exp=exp)
    if not (summary["status"] == "ok").any():
        shutil.rmtree(out, ignore_errors=True)  # a folder of empty tables is no result
        raise LorabenchError(f"no strategy could run ({config.model} on {config.device}): {why_nothing_ran(summary)}")
    print()
    print(format_table(summary))
    print()
    print(explain(summary, exp, out))
    return 0


def where_it_runs(config: RunConfig) -> str:
    """'mistral-7b on h200, executor modeled', or for a measured run where its steps are timed."""
    if config.executor == "modeled":
        return f"{config.model} on {config.device}, executor modeled"
    from lorabench.sim.measured import torch_device

    return (f"{config.model}, executor measured on {torch_device(config)} (memory planned as on one "
            f"{config.device}: --device)")


CLUSTER_TABLE = (("load_imbalance", "imbalance"), ("replica_hit_rate_min", "replica hit min"))


def format_table(summary: pd.DataFrame) -> str:
    """The table, then once per reason the strategies that could not run (the table says "not run")."""
    shown = TABLE + tuple(c for c in CLUSTER_TABLE if c[0] in summary)  # a cluster: how evenly it was loaded
    table = summary[[c for c, _ in shown]].rename(columns=dict(shown))
    failed = summary[summary["status"] != "ok"]
    table["status"] = ["ok" if s == "ok" else "not run" for s in summary["status"]]
    lines = [table.to_string(index=False, float_format=format_number)]
    for reason, group in failed.groupby("status", sort=False):
        lines.append(f"{', '.join(group['strategy'])} not run: {reason}")
    return "\n".join(lines)


# Below this share of the budget, holding every adapter in a per-lora slot is what a deployment would do.
CHEAP_SHARE = 0.05


def starved_per_lora_hint(plan, config: RunConfig, n_loras: int) -> list[str]:
    """A note when matched memory left per-lora fewer slots than adapters that would all fit cheaply."""
    if config.max_loras or not plan.slots or plan.slots >= n_loras:
        return []
    every = n_loras * plan.adapter_capacity // plan.slots
    if every > CHEAP_SHARE * plan.budget:
        return []
    return [f"Note: matched memory leaves per-lora {plan.slots} slot(s) for {n_loras} adapters, so it runs at most "
            f"{plan.slots} adapter(s) per batch; all {n_loras} would take {every / 2**30:.2f} GiB "
            f"({every / plan.budget:.1%} of the budget). --max-loras {n_loras} gives per-lora every adapter, as a "
            "deployment with this few adapters would."]


def engine_note(exp: Experiment) -> list[str]:
    """What the vllm-v1 engine added, when it ran."""
    engine = exp.engine.engine
    if not engine.v1:
        return []
    reserved = engine.reserved_bytes(exp.model, exp.config.max_num_batched_tokens, exp.config.max_num_seqs)
    return [f"Engine vllm-v1 ({exp.engine.source}): vLLM V1's whole-queue admission and preemption rule, "
            f"{reserved / 2**30:.2f} GiB kept for activations and the sampler, LoRA slots of "
            f"{engine.lora_slot_bytes(exp.model, int(exp.ranks.max())) / 2**20:.0f} MiB (every linear layer), and "
            f"per step {engine.step_s * 1e3:.2f} ms + {engine.request_s * 1e6:.1f} us per request + "
            f"{engine.adapter_s * 1e3:.2f} ms per distinct adapter + {engine.waiting_scan_s * 1e6:.2f} us per "
            f"waiting request walked of host time."
            + ("" if exp.engine.fit.get("device") in (None, exp.config.device) else
               f" Its kernel figures were fitted on {exp.engine.fit['device']} and are not used on "
               f"{exp.config.device} (the device preset's are); its host terms are.")]


def explain(summary: pd.DataFrame, exp: Experiment, out: Path) -> str:
    """What the table shows, in words a newcomer can follow."""
    first, config = summary.iloc[0], exp.config
    plan = exp.plan(exp.strategy("per-lora"))
    ad = exp.workload.adapters
    kind = ("MEASURED step times" if config.executor != "modeled" else
            f"MODELED figures (a cost model of the device with profile {config.profile}, not a measurement)"
            if config.profile else "MODELED figures (a roofline cost model of the device, not a measurement)")
    memory = f"the {exp.device.memory_bytes / 2**30:.0f} GiB of one {config.device}"
    elsewhere = config.executor == "measured" and not str(first["device"]).startswith(config.device)
    written = [name for name in ("summary.csv", "requests/", "steps/", "replicas/") if (out / name.rstrip("/")).exists()]
    if (out / "bench").is_dir():
        written.append("bench/ as vllm bench serve writes results")
    slots = "as --max-loras set" if config.max_loras else "as many as fit in the memory the compressed adapters take"
    gpus = (f"one {first['device']}" if config.replicas == 1 else
            f"{config.replicas} x {first['device']} behind a {config.router} router (GPU figures are per replica; "
            f"replicas/<strategy>.csv has each one's load and hit rate, `lorabench plot {out} --kind replicas` "
            f"charts them)")
    if config.tp > 1:
        gpus = (f"{gpus.replace('one ', '', 1) if config.replicas == 1 else gpus}, each replica {config.tp} GPUs in "
                f"tensor parallel ({config.replicas * config.tp} GPUs in all; memory figures are per GPU)")
    if not config.parallel.default:
        gpus += f", {config.weight_dtype} weights, KV cache {config.kv_cache_dtype}"
    paragraphs = [
        f"{kind}: {first['model']} on {gpus}, {int(first['requests'])} requests of workload "
        f"{first['workload']} over {int(first['n_loras'])} adapters, the same stream for every strategy.",
        f"Every strategy had the same GPU budget for adapters + KV cache: {plan.budget / 2**30:.1f} GiB"
        f"{' per GPU' if config.tp > 1 else ''} "
        f"({config.gpu_memory_utilization:g} x {memory} - {plan.weights / 2**30:.1f} GiB of weights"
        f"{' - what the engine keeps' if exp.engine.engine.v1 else ''})."
        + (f" (Memory is planned as on --device {config.device}; the steps ran on {str(first['device']).split()[0]}.)"
           if elsewhere else "")
        + (f" per-lora got {plan.slots} adapter slots (= distinct adapters per batch), {slots}; compressed shares "
           f"rank-{ad.compressed_rank} bases over {ad.clusters} cluster(s)." if plan.status == "ok" else ""),
        "tok/s: output tokens per second; vs single: that over the single-LoRA baseline (every request on one "
        "adapter); TTFT: time to first token; TPOT: time per output token after the first; goodput: requests/s "
        f"meeting TTFT <= {config.ttft_slo_ms:g} ms and TPOT <= {config.tpot_slo_ms:g} ms; loads: host->GPU "
        "adapter copies; hit rate: requests that found their adapter on the GPU (no copy made for them); batch, "
        "distinct: mean requests and distinct adapters per step.",
        *starved_per_lora_hint(plan, config, int(first["n_loras"])),
        *engine_note(exp),
        "Below saturation every strategy finishes the same work and differs in latency; --workload offline "
        "measures peak throughput.",
        f"Results: {out}/ ({', '.join(written + ['config.json'])})",
    ]
    return "\n".join(textwrap.fill(p, width=100) for p in paragraphs)
