"""`lorabench validate --real RUNS --engine ENGINE`: an engine's predictions against measured runs.

Each run is replayed (replay.py) on the engine (a fitted engine JSON, `vllm-v1` for the shipped one,
or `ideal`), the model and the device given, over its whole duration (or `--window`), with the
client's limit its columns imply (traits.py; the ideal engine models no client limit). Written to
DIR: validation.csv (one row per run: for every metric `<metric>_real`, `<metric>_pred`,
`<metric>_err` = pred / real - 1, and `saturated_real`, `saturated_pred`), errors.csv (mean absolute
percentage error per metric, saturated and unsaturated runs apart) and validation.png (predicted
against real). Replays are cached in DIR/.replays, so a rerun or an interrupted one resumes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lorabench.errors import LorabenchError
from lorabench.experiments.points import backend_from_args
from lorabench.fidelity.batch import Server, simulate_runs
from lorabench.fidelity.real_runs import read_real
from lorabench.fidelity.report import charts, error_summary, format_summary, validation_table
from lorabench.fidelity.traits import replay_settings
from lorabench.outputs.results import write_csv_atomic
from lorabench.presets import device_preset, model_preset
from lorabench.sim.costmodel import Efficiency, apply_profile
from lorabench.sim.engine_model import EngineFile, EngineModel, resolve_engine


def server_of(engine: str, model: str, device: str) -> tuple[Server, EngineFile]:
    """The server an engine argument names: `ideal`, `vllm-v1` (the shipped file) or an engine JSON."""
    shape, spec = model_preset(model), device_preset(device)
    if engine == "ideal":
        return Server(shape, spec, Efficiency(), EngineModel()), resolve_engine("ideal", None)
    loaded = resolve_engine("vllm-v1", None if engine == "vllm-v1" else engine)
    fitted_device = loaded.fit.get("device")
    if fitted_device is not None and fitted_device != device:
        raise LorabenchError(f"--engine {loaded.source}: fitted on {fitted_device}, not on --device {device}")
    spec, efficiency = apply_profile(loaded.as_profile(), spec, Efficiency())
    return Server(shape, spec, efficiency, loaded.engine), loaded


def main(args: argparse.Namespace) -> int:
    if args.engine is None:
        raise LorabenchError("--real: give --engine (an engine JSON from `lorabench calibrate`, vllm-v1 for the "
                             "shipped one, or ideal)")
    if args.model is None or args.device is None:
        raise LorabenchError("--real: give --model and --device (the model and GPU the runs served)")
    if args.out is None:
        raise LorabenchError("--real: give --out DIR")
    if args.window is not None and args.window <= 0:
        raise LorabenchError(f"--window {args.window}: must be > 0 seconds")
    runs = read_real(args.real)
    server, engine = server_of(args.engine, args.model, args.device)
    settings = replay_settings(runs, args.window, args.seed or 0, args.client_max_inflight if server.engine.v1 else "none")
    client = settings.client_max_inflight
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backend = backend_from_args(args, folder=out)
    predicted = simulate_runs(runs, server, settings, backend, out / ".replays", desc="replays",
                              progress=not args.no_progress)
    table = validation_table(runs, predicted)
    summary = error_summary(table)
    write_csv_atomic(out / "validation.csv", table)
    write_csv_atomic(out / "errors.csv", summary)
    charts(table, out)
    label = engine.source if server.engine.v1 else "ideal"
    print(f"engine {label}: mean absolute percentage error per metric ({len(runs)} runs, "
          f"{args.model} on {args.device}, client limit {client}):")
    print(format_summary(summary))
    print(f"wrote {out}/validation.csv, errors.csv, validation.png")
    return 0
