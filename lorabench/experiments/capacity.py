"""`lorabench capacity`: per strategy and number of adapters, the highest request rate that meets the SLOs.

For each strategy (single-LoRA included: the baseline), each number of adapters and each number of
replicas (`--replicas 1,2,4,8`: GPUs behind the router, sim/cluster.py), a search
(`rate_search.find_capacity`: bracketing from the start rate, then bisection) finds the highest
arrival rate at which p99 TTFT and p99 TPOT stay within the SLOs (or, with a goodput target, the
fraction of requests meeting both SLOs stays at or above it). Every rate is served on the same
seeded request stream, only scaled in time: a request's adapter and lengths do not depend on the
rate (see `Workload.generate`). Rates the strategy cannot serve count as failing.

A capacity folder holds:

    config.json        the run config (without n_loras, replicas, rate and strategies) and the search settings
    capacity.csv       one row per (n_loras, replicas, strategy): max_rate and the metrics there, what
                       bound it, the evaluations it took; rewritten after every finished search
    evaluations.csv    every rate each finished search tried, in order, passed or not and why
    evaluations/<strategy>/<n_loras>[x<replicas>]/rate-<rate>.json
                       one simulation each (strategy served alone at that rate), written atomically
    charts/capacity.png, .svg   the highest rate against the number of adapters, one line per strategy

One evaluation is a pure function of (run config, strategy, n_loras, replicas, rate), so the folder caches
them: rerunning the same command replays every search from the cache and continues where it
stopped. Search settings (--rate, --rate-tol, --max-rate, --goodput-target) may change between runs,
reusing every cached rate the new searches visit; a different run config (the SLO flags included) in
the same folder is refused, as for `sweep`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from tqdm.auto import tqdm

from lorabench.errors import LorabenchError
from lorabench.experiments.points import Backend, add_backend_arguments, backend_from_args, local_backend
from lorabench.experiments.rate_search import CapacityResult, Evaluation, Objective, find_capacity
from lorabench.experiments.sweep import DEFAULT_N_LORAS, _FlagsExcept, check_same_sweep, config_dict, parse_counts, parse_n_loras
from lorabench.outputs.results import remove_temporaries_under, write_csv_atomic, write_text_atomic, writer_lock
from lorabench.outputs.tables import CAPACITY_COLUMNS, format_number, read_capacity, why_nothing_ran

if TYPE_CHECKING:  # the simulator is imported only when a search runs, so `lorabench plot` starts fast
    from lorabench.experiments.runner import RunConfig

RATE_ARRIVALS = ("poisson", "gamma", "constant")  # arrival kinds whose times scale with the rate
DEFAULT_RATE_TOL = 0.02
CEILING_FACTOR = 1024  # without --max-rate, the search goes up to start x this (and down to start / this)

EVALUATION_COLUMNS = (
    "strategy", "n_loras", "replicas", "iteration", "rate", "passed", "failed", "request_throughput", "output_throughput",
    "ttft_p99_ms", "tpot_p99_ms", "goodput_fraction",
)
REPORTED_METRICS = ("request_throughput", "output_throughput", "ttft_p99_ms", "tpot_p99_ms", "goodput_fraction")


@dataclass(frozen=True)
class SearchSettings:
    """How every search of one capacity run looks for the highest rate."""

    objectives: tuple[Objective, ...]
    start_rate: float  # req/s
    rel_tol: float = DEFAULT_RATE_TOL
    max_rate: float | None = None  # req/s; None: start_rate x CEILING_FACTOR

    def __post_init__(self) -> None:
        if not 0 < self.rel_tol < 1:
            raise LorabenchError(f"--rate-tol {self.rel_tol}: must be a fraction of the rate in (0, 1), e.g. 0.02")
        if not self.start_rate > 0:
            raise LorabenchError(f"--rate {self.start_rate}: must be > 0 requests per second")
        if self.max_rate is not None and not self.max_rate >= self.start_rate:
            raise LorabenchError(f"--max-rate {self.max_rate}: must be >= the start rate ({self.start_rate:g} req/s, "
                                 "--rate or the workload's)")

    @property
    def ceiling(self) -> float:
        return self.max_rate if self.max_rate is not None else self.start_rate * CEILING_FACTOR

    @property
    def floor(self) -> float:
        return self.start_rate / CEILING_FACTOR

    def to_dict(self) -> dict:
        return {"objectives": [str(o) for o in self.objectives], "start_rate": self.start_rate,
                "rel_tol": self.rel_tol, "max_rate": self.max_rate}


def objectives_for(config: RunConfig, goodput_target: float | None) -> tuple[Objective, ...]:
    """p99 TTFT and p99 TPOT within the run's SLOs, or the fraction of requests meeting both at least
    `goodput_target`."""
    if goodput_target is None:
        return (Objective("ttft_p99_ms", config.ttft_slo_ms), Objective("tpot_p99_ms", config.tpot_slo_ms))
    if not 0 < goodput_target <= 1:
        raise LorabenchError(f"--goodput-target {goodput_target}: must be a fraction of requests in (0, 1]")
    return (Objective("goodput_fraction", goodput_target, ">="),)


def start_rate(base: RunConfig) -> float:
    """The rate the searches start from: --rate, else the workload's. Refuses workloads whose arrival
    times do not depend on a rate (offline, trace)."""
    workload = base.load_workload()
    if workload.arrival.kind not in RATE_ARRIVALS:
        raise LorabenchError(
            f"--workload {base.workload}: arrivals of kind {workload.arrival.kind!r} do not depend on a rate, so "
            f"there is no rate to search; choose a workload with {', '.join(RATE_ARRIVALS)} arrivals"
        )
    return float(base.rate if base.rate is not None else workload.arrival.rate)


# --- one evaluation: a strategy served alone at one rate ----------------------------------------


def simulate(config: RunConfig, strategy: str) -> dict[str, Any]:
    """Serve `strategy` alone on the config's request stream; its summary metrics (those of its row
    in `run_experiment`'s summary) plus `goodput_fraction`, and `status` ("ok" or why it cannot)."""
    from lorabench.experiments.runner import Experiment, StrategyUnavailable
    from lorabench.sim.metrics import SLO, summarize

    exp = Experiment.build(config)
    try:
        result = exp.serve(strategy)
    except StrategyUnavailable as why:
        return {"status": str(why)}
    metrics = summarize(result, SLO(config.ttft_slo_ms, config.tpot_slo_ms))
    # goodput and request_throughput are both counts over the same makespan
    metrics["goodput_fraction"] = metrics["goodput"] / metrics["request_throughput"]
    metrics = {k: v.item() if hasattr(v, "item") else v for k, v in metrics.items()}  # numpy -> JSON
    return {"status": "ok", **metrics, "device": result.device or exp.device.name}


def evaluation_path(out: Path, strategy: str, n_loras: int, replicas: int, rate: float) -> Path:
    where = str(n_loras) if replicas == 1 else f"{n_loras}x{replicas}"
    return out / "evaluations" / strategy / where / f"rate-{rate!r}.json"


def cached_evaluation(out: Path, config: RunConfig, strategy: str, rate: float) -> dict[str, Any]:
    """`simulate` at `rate`, read from the folder's cache when the same config made it there."""
    config = dataclasses.replace(config, rate=rate)
    path = evaluation_path(out, strategy, config.n_loras, config.replicas, rate)
    wanted = {"strategy": strategy, "config": config_dict(config)}
    try:
        record = json.loads(path.read_text())
        if {k: record[k] for k in wanted} == wanted:
            return record["metrics"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not there yet (or unreadable): simulate it
    metrics = simulate(config, strategy)
    record = {**wanted, "n_loras": config.n_loras, "rate": rate, "metrics": metrics}
    write_text_atomic(path, json.dumps(record, indent=1) + "\n")
    return metrics


# --- one search: a strategy at one number of adapters ------------------------------------------


@dataclass(frozen=True)
class SearchTask:
    """Everything one search needs (picklable: it may run in a worker process)."""

    out: Path
    config: RunConfig  # n_loras and replicas set; the rate is what the search varies
    strategy: str
    settings: SearchSettings


@dataclass(frozen=True)
class SearchOutcome:
    row: dict[str, Any]  # its capacity.csv row
    evaluations: list[dict[str, Any]]  # its evaluations.csv rows


def run_search(task: SearchTask) -> SearchOutcome:
    """Search one strategy's highest rate at one number of adapters (replaying cached evaluations)."""
    from lorabench.experiments.runner import Experiment

    cfg, s = task.config, task.settings
    row = {"strategy": task.strategy, "n_loras": cfg.n_loras, "replicas": cfg.replicas, "objectives": "; ".join(map(str, s.objectives)),
           "device": cfg.device, "model": cfg.model, "workload": Path(cfg.workload).stem,
           "executor": cfg.executor}
    # refusals that no rate changes (adapters that do not fit, a prompt longer than a batch) need no search
    try:
        exp = Experiment.build(dataclasses.replace(cfg, rate=s.start_rate))
        plan_status = exp.plan(exp.strategy(task.strategy)).status
    except LorabenchError as err:
        plan_status = str(err)
    else:
        row.update(model=exp.model.name, workload=exp.workload.name, requests=len(exp.requests))
    if plan_status != "ok":
        return SearchOutcome({**row, "status": f"not searched: {plan_status}", "iterations": 0}, [])

    result = find_capacity(partial(cached_evaluation, task.out, cfg, task.strategy), s.objectives, s.start_rate,
                           rel_tol=s.rel_tol, min_rate=s.floor, max_rate=s.ceiling)
    return SearchOutcome(outcome_row(row, result), [evaluation_row(task, i, e) for i, e in
                                                    enumerate(result.evaluations, 1)])


def outcome_row(row: dict[str, Any], result: CapacityResult) -> dict[str, Any]:
    best = result.best.metrics if result.best is not None else {}
    row = {**row, "status": result.status, "max_rate": result.max_rate_found,
           **{m: best.get(m, math.nan) for m in REPORTED_METRICS},
           "bound_by": result.bound_by,
           "failing_rate": result.failing.rate if result.failing is not None else math.nan,
           "iterations": result.iterations}
    if "device" in best:  # measured runs label the device they ran on
        row["device"] = best["device"]
    return row


def evaluation_row(task: SearchTask, iteration: int, e: Evaluation) -> dict[str, Any]:
    return {"strategy": task.strategy, "n_loras": task.config.n_loras, "replicas": task.config.replicas,
            "iteration": iteration, "rate": e.rate,
            "passed": e.passed, "failed": "; ".join(e.failed), **{m: e.metrics.get(m, math.nan) for m in
                                                                  REPORTED_METRICS}}


# --- the capacity run ---------------------------------------------------------------------------


def capacity_config_dict(base: RunConfig, n_loras: list[int], settings: SearchSettings,
                         replicas: list[int] = (1,)) -> dict:
    run = config_dict(base)
    for searched in ("n_loras", "replicas", "rate", "strategies"):  # each search sets its own
        run.pop(searched, None)
    return {"run": run, "strategies": list(base.strategies), "n_loras": list(n_loras), "replicas": list(replicas),
            "search": settings.to_dict()}


def run_capacity(
    base: RunConfig,
    n_loras: list[int],
    out: Path,
    settings: SearchSettings,
    jobs: int = 1,
    progress: bool = True,
    replicas: list[int] = (1,),
    backend: Backend | None = None,
) -> pd.DataFrame:
    """Run (or resume) every search of `base`'s strategies over `n_loras` x `replicas` into `out`;
    return the capacity table (also written to out/capacity.csv, with evaluations.csv and the chart).
    The searches run on `backend`, by default `local_backend(jobs)`."""
    backend = backend if backend is not None else local_backend(jobs)
    out = Path(out)
    start_rate(base)  # a workload without a rate to search is refused before anything is written
    with writer_lock(out):  # one writer at a time; what a killed one left half-written goes
        return _capacity(base, n_loras, out, settings, progress, replicas, backend)


def _capacity(base: RunConfig, n_loras: list[int], out: Path, settings: SearchSettings, progress: bool,
              replicas: list[int], backend: Backend) -> pd.DataFrame:
    wanted = capacity_config_dict(base, n_loras, settings, replicas)
    check_same_sweep(out, wanted, kind="capacity search")
    out.mkdir(parents=True, exist_ok=True)
    remove_temporaries_under(out)
    write_text_atomic(out / "config.json", json.dumps(wanted, indent=2) + "\n")

    # an absolute folder: a Ray worker's working directory is not this one
    tasks = [SearchTask(out.absolute(), dataclasses.replace(base, n_loras=n, replicas=g, rate=None, strategies=(s,)),
                        s, settings) for n in n_loras for g in replicas for s in base.strategies]
    order = {(t.config.n_loras, t.config.replicas, t.strategy): i for i, t in enumerate(tasks)}
    done: dict[int, SearchOutcome] = {}
    # disable=None: tqdm draws bars only on a terminal, so a log gets no cursor codes
    bar = tqdm(total=len(tasks), desc="capacity searches", unit="search", disable=not progress or None)
    try:
        for task, outcome in backend.map_unordered(run_search, tasks):
            done[order[task.config.n_loras, task.config.replicas, task.strategy]] = outcome
            write_tables(out, [done[i] for i in sorted(done)])
            found = outcome.row.get("max_rate", math.nan)
            bar.set_postfix_str(f"{task.strategy} N={task.config.n_loras} G={task.config.replicas}: "
                                f"{'-' if math.isnan(found) else f'{found:.3g}'} req/s")
            bar.update()
    finally:
        bar.close()
    table = read_capacity(out)
    if (table["status"] == "ok").any():  # no empty chart when no search found a rate
        from lorabench.outputs.plots import render

        render(out, "capacity")
    return table


def write_tables(out: Path, outcomes: list[SearchOutcome]) -> None:
    rows = pd.DataFrame([o.row for o in outcomes]).reindex(columns=CAPACITY_COLUMNS)
    evaluations = pd.DataFrame([e for o in outcomes for e in o.evaluations]).reindex(columns=EVALUATION_COLUMNS)
    write_csv_atomic(out / "evaluations.csv", evaluations)
    write_csv_atomic(out / "capacity.csv", rows)


# --- command line -------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lorabench.experiments.run import add_arguments as add_run_arguments

    # every flag of `lorabench run`; --n-loras is a grid, --rate where the search starts, --out a folder;
    # a search writes no bench/ JSON, so --save-detailed would mean nothing
    add_run_arguments(_FlagsExcept(parser, {"--n-loras", "--rate", "--out", "--jobs", "--replicas", "--save-detailed"}))
    parser.set_defaults(save_detailed=None)
    parser.add_argument("--n-loras", default=",".join(map(str, DEFAULT_N_LORAS)),
                        help="comma-separated numbers of adapters, one search per strategy each "
                             "(default: %(default)s)")
    parser.add_argument("--replicas", default="1",
                        help="comma-separated numbers of replicas (GPUs behind --router), one search per strategy "
                             "and number of adapters each (default: %(default)s)")
    parser.add_argument("--rate", type=float, default=None,
                        help="rate the searches start from, req/s (default: the workload's)")
    parser.add_argument("--target-rate", type=float, default=None,
                        help="also print, per strategy and number of adapters, the fewest replicas that sustain "
                             "this rate (req/s)")
    parser.add_argument("--goodput-target", type=float, default=None,
                        help="instead of p99 TTFT <= --ttft-slo-ms and p99 TPOT <= --tpot-slo-ms: at least this "
                             "fraction of requests meets both SLOs (e.g. 0.99)")
    parser.add_argument("--rate-tol", type=float, default=DEFAULT_RATE_TOL,
                        help="stop when the highest passing and lowest failing rates are within this fraction "
                             "(default: %(default)s)")
    parser.add_argument("--max-rate", type=float, default=None,
                        help=f"highest rate tried, req/s (default: {CEILING_FACTOR} x the start rate)")
    add_backend_arguments(parser, "searches")
    parser.add_argument("--out", type=Path, default=None,
                        help="capacity folder (default: results/capacity-<workload>); rerun the same command "
                             "to resume")


def main(args: argparse.Namespace) -> int:
    from lorabench.experiments.run import config_from_args

    n_loras = parse_n_loras(args.n_loras)
    replicas = parse_counts(args.replicas, "--replicas", "replicas")
    args.n_loras, args.replicas = None, 1  # the base config has none: each search sets its own
    base = config_from_args(args)
    settings = SearchSettings(objectives_for(base, args.goodput_target), start_rate(base), args.rate_tol,
                              args.max_rate)
    out = args.out or Path("results") / f"capacity-{Path(base.workload).stem}"
    backend = backend_from_args(args, folder=out)
    table = run_capacity(base, n_loras, out, settings, progress=not args.no_progress, replicas=replicas,
                         backend=backend)
    if not (table["status"] == "ok").any():
        raise LorabenchError(f"no strategy found a rate ({out / 'capacity.csv'}): {why_nothing_ran(table)}")
    shown = ["n_loras", "replicas", "strategy", "status", "max_rate", "output_throughput", "ttft_p99_ms", "tpot_p99_ms",
             "goodput_fraction", "bound_by", "iterations"]
    with pd.option_context("display.width", 200, "display.max_rows", 500, "display.max_colwidth", 40):
        print(table[shown].to_string(index=False, float_format=format_number))
    kind = "MODELED" if base.executor == "modeled" else "MEASURED"
    gpus = base.device if base.tp == 1 else f"{base.tp} x {base.device} per replica (GPUs = replicas x {base.tp})"
    print(f"\n{kind} ({base.executor} executor, {base.model} on {gpus}); max_rate: the highest arrival rate "
          f"(req/s) found meeting {'; '.join(map(str, settings.objectives))} to within {settings.rel_tol:g}.\n"
          f"wrote {out / 'capacity.csv'}, {out / 'evaluations.csv'} and {out / 'charts' / 'capacity.png'}")
    if args.target_rate is not None:
        print(f"\nFewest replicas ({base.router} router) that sustain {args.target_rate:g} req/s:")
        print(fewest_replicas(table, args.target_rate).to_string(index=False))
    return 0


def fewest_replicas(table: pd.DataFrame, target_rate: float) -> pd.DataFrame:
    """Per strategy and number of adapters: the fewest replicas whose max_rate reaches `target_rate`
    ("more than G" when none of those searched does)."""
    rows = []
    for (n, strategy), group in table.groupby(["n_loras", "strategy"], sort=False):
        enough = group[group["max_rate"] >= target_rate]
        most = int(group["replicas"].max())
        fewest = enough.loc[enough["replicas"].idxmin()] if len(enough) else None
        rows.append({"n_loras": n, "strategy": strategy,
                     "replicas": str(int(fewest["replicas"])) if fewest is not None else f"more than {most}",
                     "their max_rate": fewest["max_rate"] if fewest is not None else group["max_rate"].max()})
    return pd.DataFrame(rows)
