"""`lorabench validate`: the modeled executor's fidelity against the measured one.

Both serve the same request stream (same workload, seed and config); the modeled one uses the
profile of the device the measured one runs on (`--profile FILE`, else the one found for this
device and model; measured first, with `lorabench profile`'s grid, when there is none). Printed per
strategy: the relative error (modeled / measured - 1) of output_throughput, mean TTFT and mean TPOT.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pandas as pd

from lorabench.errors import LorabenchError
from lorabench.experiments.runner import RunConfig, run_experiment
from lorabench.outputs.results import default_run_dir, write_json_atomic
from lorabench.presets import device_name
from lorabench.sim.costmodel import find_profile
from lorabench.sim.engine_model import ENGINES

METRICS = (("output_throughput", "tok/s"), ("ttft_mean_ms", "TTFT mean ms"), ("tpot_mean_ms", "TPOT mean ms"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    from lorabench.experiments.points import add_backend_arguments
    from lorabench.experiments.run import add_arguments as run_arguments
    from lorabench.experiments.sweep import _FlagsExcept

    # the flags of `lorabench run` but --executor (validate runs both) and --jobs (below: for --real's replays)
    run_arguments(_FlagsExcept(p, {"--executor", "--jobs"}))
    p.set_defaults(model=None, device=None, executor="measured")  # measured vs modeled: the defaults below; --real: required
    engine = next(a for a in p._actions if a.dest == "engine")
    engine.choices, engine.default = None, None
    engine.help = ("with --real: the engine to validate: a fitted engine JSON (`lorabench calibrate`), vllm-v1 "
                   "(the shipped one) or ideal; without: ideal or vllm-v1, as for `lorabench run`")
    p.add_argument("--real", nargs="+", metavar="FILE",
                   help="validate an engine against measured serving runs instead: a runs .csv and/or `vllm bench "
                   "serve` .json files (each with its settings .toml); writes --out DIR/validation.csv, errors.csv, "
                   "validation.png")
    p.add_argument("--window", type=float, help="--real: seconds of arrivals replayed per run (default: its duration)")
    p.add_argument("--client-max-inflight", default="auto",
                   help="--real: requests the runs' client kept open at most: a number, none, or auto (default)")
    add_backend_arguments(p, "replays")
    jobs = next(a for a in p._actions if a.dest == "jobs")
    jobs.help = "--real: " + jobs.help


def fidelity(measured: pd.DataFrame, modeled: pd.DataFrame) -> pd.DataFrame:
    """Per strategy: each metric measured, modeled, and the relative error modeled / measured - 1."""
    a, b = measured.set_index("strategy"), modeled.set_index("strategy")
    rows = []
    for strategy in a.index:
        row = {"strategy": strategy, "status": a.at[strategy, "status"]}
        for col, label in METRICS:
            m, p = float(a.at[strategy, col]), float(b.at[strategy, col])
            row[f"{label} measured"], row[f"{label} modeled"] = m, p
            row[f"{label} error"] = p / m - 1 if m else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def validate(config: RunConfig, out: Path, progress: bool = True) -> pd.DataFrame:
    """Run `config` measured and modeled (writing out/measured and out/modeled); return fidelity()."""
    from lorabench.sim.measured import torch_device

    device = torch_device(config)
    name = device_name(device)
    profile = config.profile or find_profile(name, config.model)
    if profile is None:
        profile = Path("results/profiles") / f"{name}-{config.model}.json"
        print(f"no profile for {name} and {config.model}: measuring one first -> {profile}")
        from lorabench.fidelity.profile import run_profile

        workload = config.load_workload()
        data = run_profile(config.model, list(config.strategies), sorted(set(workload.adapters.ranks)),
                           workload.n_loras, tuple(workload.adapters.target_modules), workload.adapters.compressed_rank,
                           "full" if device.type == "cuda" else "quick", 3, str(device),
                           cuda_graphs=not getattr(config, "eager", False), progress=progress)
        write_json_atomic(profile, data)
    # Both runs take the profile's device figures, so both plan the same memory and batches.
    measured = run_experiment(dataclasses.replace(config, executor="measured", profile=str(profile)), out / "measured",
                              progress)
    modeled = run_experiment(dataclasses.replace(config, executor="modeled", profile=str(profile)), out / "modeled", progress)
    table = fidelity(measured, modeled)
    table.attrs["profile"] = str(profile)
    return table


def format_table(table: pd.DataFrame) -> str:
    shown = table[["strategy", "status"]].copy()
    for _, label in METRICS:
        for kind in ("measured", "modeled"):
            shown[f"{label} {kind}"] = table[f"{label} {kind}"].map(lambda v: f"{v:,.4g}")
        shown[f"{label} error"] = table[f"{label} error"].map(lambda v: f"{v:+.1%}")
    return shown.to_string(index=False)


def main(args: argparse.Namespace) -> int:
    from lorabench.experiments.run import config_from_args

    if args.real:
        from lorabench.fidelity.validate_real import main as validate_real

        return validate_real(args)
    if args.jobs is not None:
        raise LorabenchError(f"--jobs {args.jobs}: only with --real (measured and modeled run in this process)")
    import torch  # measured runs need it; --real does not

    from lorabench.sim.measured import torch_device

    args.model = args.model or ("mistral-7b" if torch.cuda.is_available() else "tiny")
    args.device = args.device or "h200"
    args.engine = args.engine or "ideal"
    if args.engine not in ENGINES:
        raise LorabenchError(f"--engine {args.engine}: choose one of {', '.join(ENGINES)} (engine files: with --real)")
    config = config_from_args(args)
    workload = config.load_workload()
    out = args.out or default_run_dir(f"validate-{config.workload}", workload.n_loras)
    if out.exists():
        raise LorabenchError(f"--out {out}: already exists")
    if torch_device(config).type == "cpu":
        torch.set_num_threads(1)  # steadier times on a shared CPU
    table = validate(config, out, progress=not args.no_progress)
    print(format_table(table))
    print(f"error = modeled / measured - 1; modeled with profile {table.attrs['profile']}; runs in {out}/measured and {out}/modeled")
    return 0
