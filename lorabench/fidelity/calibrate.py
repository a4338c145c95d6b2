"""`lorabench calibrate`: fit the vllm-v1 engine's terms to measured serving runs.

What is fitted, and how:

1. Memory and the client, from the runs' own columns without simulating (traits.py): the engine's
   reserved memory (`sampler_bytes_per_logit`) and the client's limit of open requests.
2. Time. The device's matmul rate (`bf16_flops`: what the GEMMs of large steps reach), the LoRA
   kernels' share of the bandwidth (`costmodel.Efficiency.lora_memory`: reading each distinct
   adapter's weights every step), the per-lora grid's cost per unused slot (`lora_empty_slot_s`)
   and the engine's host terms (`EngineModel`: per step, per request, per distinct adapter, per
   waiting request walked, and each request's ingress) minimize the squared log errors of output
   throughput, mean and median TPOT, median TTFT (weight 0.5; unsaturated runs only) and mean
   running requests over the runs. Each pass replays every run at the current terms (cached, on
   `--jobs` processes or Ray tasks), then fits the terms on a surrogate that keeps each replay's
   batches (surrogate.py) with scipy.optimize.least_squares; the next pass replays at the new
   terms. The batches move less at each pass; three passes are the default.

The replays of the fit's passes are shorter than the runs (`--window`, 1,200 s): long enough for
steady state, except where a saturated run's queue takes longer to build (a client with
thousands of waiting requests lets vLLM's whole-queue scan fill batches that a short queue cannot):
such a run is replayed for twice the time its queue took to fill, as its measured throughput says,
up to its whole duration. A saturated run's TTFT grows with its queue over the whole hour, which a
shorter replay does not see, so it is predicted, not fitted.

The device's bandwidth stays the preset's assumption: at small batches the weights' read time and
the host time per step are both a constant per step, and these runs cannot tell them apart (a fit
that frees it drives it past any HBM's). Deterministic for a seed: the replays' streams come from it
and the fit has no randomness.

With `--cv K`, K-fold cross-validation follows: each fold fits on the other runs from the same start
(their first pass is the full fit's, from the cache) and predicts its own runs by replaying them;
with the ideal engine's replays of the same runs beside them, the report
(<out>.cv.md, <out>.cv.csv) gives the errors per metric, saturated and unsaturated.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

from lorabench import __version__
from lorabench.errors import LorabenchError
from lorabench.experiments.points import add_backend_arguments, backend_from_args
from lorabench.fidelity.batch import TALLY, Server, simulate_runs
from lorabench.fidelity.real_runs import RealRun, read_real, saturated
from lorabench.fidelity.replay import ReplaySettings
from lorabench.fidelity.surrogate import FIT_TERMS, log_errors, terms_of
from lorabench.fidelity.traits import fit_memory, replay_settings
from lorabench.outputs.results import write_json_atomic
from lorabench.presets import DEVICES, MODEL_HELP, device_preset, model_preset
from lorabench.sim.costmodel import Efficiency
from lorabench.sim.engine_model import VLLM_V1, EngineFile

# (metric, weight) the fit minimizes the squared log errors of
OBJECTIVE = (("output_throughput", 1.0), ("tpot_mean_ms", 1.0), ("tpot_median_ms", 1.0), ("ttft_median_ms", 0.5),
             ("mean_num_running", 1.0))
OBJECTIVE_SATURATED = tuple((m, w) for m, w in OBJECTIVE if m != "ttft_median_ms")
FIT_WINDOW_S = 1200.0  # replayed per run in the fit's passes (steady state; module docstring)
FITTED = tuple(name for _, name, _ in FIT_TERMS if name != "mem_bandwidth")  # module docstring, 3.
# Where the time terms start (the device's: its preset's)
START = dict(lora_memory=Efficiency().lora_memory, lora_empty_slot_s=Efficiency().lora_empty_slot_s, step_s=2e-3,
             request_s=2e-5, adapter_s=1e-4, waiting_scan_s=5e-7, ingress_s=5e-3)
# A matmul runs no faster than the device's dense bf16 peak (the presets' datasheet figures are
# 0.7 of it): the fitted rate stays below it.
PEAK_OVER_PRESET = 1 / 0.7


# --- the time terms -------------------------------------------------------------------------------

def fitted_parts(terms: np.ndarray) -> dict[str, dict[str, float]]:
    """The terms as {"device": {...}, "efficiency": {...}, "engine": {...}}."""
    parts: dict[str, dict[str, float]] = {"device": {}, "efficiency": {}, "engine": {}}
    for (part, name, _), value in zip(FIT_TERMS, terms):
        parts[part][name] = float(value)
    return parts


def server_at(base: Server, terms: np.ndarray) -> Server:
    parts = fitted_parts(terms)
    return Server(base.model, dataclasses.replace(base.device, **parts["device"]),
                  dataclasses.replace(base.efficiency, **parts["efficiency"]),
                  dataclasses.replace(base.engine, **parts["engine"]))


def residuals(traces, runs: list[RealRun], terms: np.ndarray) -> np.ndarray:
    """Weighted log errors of every run; a saturated run's TTFT is left out (its queue grows over the
    whole hour, which a shorter replay does not see: it is predicted, not fitted)."""
    out = []
    for trace, run in zip(traces, runs):
        objective = OBJECTIVE_SATURATED if saturated(run) else OBJECTIVE
        out += log_errors(trace.predict(terms), run.measured, objective)
    return np.array(out)


def fit_terms(traces, runs: list[RealRun], start: np.ndarray, free: np.ndarray, start_peak: float) -> np.ndarray:
    """The terms that minimize the surrogate's errors over `runs` (those where `free` is True; the
    others stay as in `start`); the matmul rate at most `start_peak`."""
    scale = np.array([s for _, _, s in FIT_TERMS])[free]

    def terms(x):
        out = start.copy()
        out[free] = x * scale
        return out

    ceilings = {"bf16_flops": start_peak, "lora_memory": 1.0}  # no faster than the device's peak
    upper = np.array([ceilings.get(name, np.inf) for _, name, _ in FIT_TERMS])[free] / scale
    x0 = np.minimum(start[free] / scale, upper * (1 - 1e-9))
    result = least_squares(lambda x: residuals(traces, runs, terms(x)), x0, bounds=(0, upper), loss="soft_l1",
                           f_scale=0.3, x_scale=1.0, max_nfev=400)
    return terms(result.x)


def fit_windows(runs: list[RealRun], settings: ReplaySettings) -> list[ReplaySettings]:
    """Each run's replay in the fit: `settings.window_s`, or twice the time a saturated run's queue
    took to reach the client's limit (from its measured throughput), up to its whole duration."""
    out = []
    for run in runs:
        window = min(settings.window_s or run.duration_s, run.duration_s)
        served, limit = run.measured.get("request_throughput", 0.0), settings.client_max_inflight
        if saturated(run) and run.offered_rate > served:
            fill = (limit if limit is not None else math.inf) / (run.offered_rate - served)
            window = min(run.duration_s, max(window, 2 * fill))
        out.append(dataclasses.replace(settings, window_s=window))
    return out


def fit(runs: list[RealRun], base: Server, settings: ReplaySettings, passes: int, backend, cache: Path | None,
        progress: bool, label: str = "", free: tuple[str, ...] | None = None) -> tuple[np.ndarray, list[dict]]:
    """The time terms after `passes` rounds of replay + surrogate fit, and what each pass saw. `free`:
    the names of the terms to fit (default FITTED), from START (the device's from `base`); the others
    keep `base`'s values."""
    mask = np.array([name in (free or FITTED) for _, name, _ in FIT_TERMS])
    terms = np.where(mask, [START.get(name, np.nan) for _, name, _ in FIT_TERMS],
                     terms_of(base.device, base.engine, base.efficiency))
    terms = np.where(np.isnan(terms), terms_of(base.device, base.engine, base.efficiency), terms)
    windows = fit_windows(runs, settings)
    history = []
    for k in range(passes):
        traces = simulate_runs(runs, server_at(base, terms), windows, backend, cache, traced=True,
                               desc=f"{label}pass {k + 1}/{passes}", progress=progress)
        before = float(np.sqrt(np.mean(residuals(traces, runs, terms) ** 2)))
        terms = fit_terms(traces, runs, terms, mask, base.device.bf16_flops * PEAK_OVER_PRESET)
        after = float(np.sqrt(np.mean(residuals(traces, runs, terms) ** 2)))
        history.append({"pass": k + 1, "rms_log_error_replayed": before, "rms_log_error_surrogate": after})
    return terms, history


def engine_file(base: Server, terms: np.ndarray, fit_info: dict) -> EngineFile:
    parts = fitted_parts(terms)
    return EngineFile(server_at(base, terms).engine, parts["device"], parts["efficiency"], fit_info)


# --- the command ----------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--real", nargs="+", required=True, metavar="FILE",
                   help="measured runs: a runs .csv (results/engines/data/README.md has its columns) and/or "
                   "`vllm bench serve --save-result` .json files, each with its server settings .toml beside it")
    p.add_argument("--model", required=True, help=f"{MODEL_HELP}: the model the runs served")
    p.add_argument("--device", required=True, choices=sorted(DEVICES), help="the GPU the runs ran on")
    p.add_argument("--out", type=Path, required=True, help="the engine JSON to write")
    p.add_argument("--window", type=float, default=FIT_WINDOW_S,
                   help="seconds of arrivals replayed per run in the fit's passes (default: %(default)s, long enough "
                   "for steady state; the cross-validation replays each run's whole duration)")
    p.add_argument("--passes", type=int, default=3, help="replay + fit rounds (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the replayed request streams (default: %(default)s)")
    p.add_argument("--client-max-inflight", default="auto",
                   help="requests the runs' client kept open at most: a number, none, or auto (read off the runs; "
                   "default)")
    p.add_argument("--cv", type=int, default=0, metavar="K",
                   help="then K-fold cross-validation, with the ideal engine beside it: <out>.cv.md and <out>.cv.csv")
    p.add_argument("--cache", type=Path, help="where replays are kept between runs (default: <out>.cache/)")
    add_backend_arguments(p, "replays")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    if args.passes < 1:
        raise LorabenchError(f"--passes {args.passes}: must be >= 1")
    if args.window <= 0:
        raise LorabenchError(f"--window {args.window}: must be > 0 seconds")
    if args.cv == 1 or args.cv < 0:
        raise LorabenchError(f"--cv {args.cv}: give 2 or more folds (or 0: none)")
    started = time.time()
    runs = read_real(args.real)
    if args.cv and len(runs) < args.cv:
        raise LorabenchError(f"--cv {args.cv}: only {len(runs)} runs")
    model, device = model_preset(args.model), device_preset(args.device)
    engine, memory = fit_memory(runs, VLLM_V1, model, device)
    settings = replay_settings(runs, args.window, args.seed, args.client_max_inflight)
    client = settings.client_max_inflight
    base = Server(model, device, Efficiency(), engine)
    cache = args.cache or args.out.with_name(args.out.name + ".cache")
    if args.jobs is None and args.backend == "local":
        args.jobs = os.cpu_count() or 1
    backend = backend_from_args(args, folder=cache)
    progress = not args.no_progress
    print(f"lorabench calibrate: {len(runs)} runs, {model.name} on {device.name}; memory: "
          + (f"{memory['reserved_gib']:.2f} GiB reserved" if memory["fitted"] else f"defaults ({memory['why']})")
          + f"; client limit {client}")
    terms, history = fit(runs, base, settings, args.passes, backend, cache, progress)
    info = {
        "device": device.name, "model": model.name, "runs": [str(p) for p in args.real], "n_runs": len(runs),
        "window_s": args.window, "seed": args.seed, "passes": args.passes, "client_max_inflight": client,
        "memory": memory, "history": history, "fit_seconds": round(time.time() - started, 1),
        "replays": dict(TALLY),  # simulated here, or found in the cache from an earlier run
        "load_average": os.getloadavg(), "command": "lorabench " + " ".join(sys.argv[1:]),
        "lorabench_version": __version__, "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    fitted = engine_file(base, terms, info)
    write_json_atomic(args.out, fitted.to_json())
    print(format_terms(fitted))
    print(f"wrote {args.out} ({info['fit_seconds']:.0f} s)")
    if args.cv:
        from lorabench.fidelity.report import cross_validate

        cross_validate(runs, base, settings, args, backend, cache, fitted, progress)
    return 0


def format_terms(fitted: EngineFile) -> str:
    rows = [(name, getattr(fitted.engine, name)) for name in ("step_s", "request_s", "adapter_s", "waiting_scan_s",
                                                              "ingress_s", "sampler_bytes_per_logit")]
    rows += [*fitted.device.items(), *fitted.efficiency.items()]
    return "\n".join(f"  {name:24s} {value:.4g}" for name, value in rows)

