"""`lorabench sweep`: one experiment per number of adapters, every strategy on the same stream.

A sweep folder holds:

    config.json          the base run config (without n_loras) and the grid of n_loras
    sweep.csv            one row per (point, strategy), the columns of summary.csv; rewritten after
                         every finished point, so a running or interrupted sweep can be charted
    points/<n>/          one `run_experiment` folder per point, plus point.json (written last:
                         the point's config and status; a folder without it is unfinished)

Each point is a pure function of its config, so a point whose point.json matches the config asked
for is skipped: an interrupted sweep resumes where it stopped. A point the simulator refuses (a
LorabenchError, e.g. a memory budget that cannot hold the model) is recorded with the reason in the
status column of its rows, never dropped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pandas as pd
from tqdm.auto import tqdm

from lorabench.errors import LorabenchError
from lorabench.experiments.points import Backend, add_backend_arguments, backend_from_args, local_backend
from lorabench.outputs.results import remove_temporaries_under, write_csv_atomic, write_text_atomic, writer_lock
from lorabench.outputs.tables import format_number, point_dir, why_nothing_ran

if TYPE_CHECKING:  # the simulator is imported only when a sweep runs, so `lorabench plot` starts fast
    from lorabench.experiments.runner import RunConfig

DEFAULT_N_LORAS = (1, 4, 16, 64, 256, 1024, 4096)



# --- the grid -----------------------------------------------------------------------------------


def parse_n_loras(text: str) -> list[int]:
    """'1,4,16' -> [1, 4, 16] (sorted, unique); every value an integer >= 1."""
    return parse_counts(text, "--n-loras", "adapters")


def parse_counts(text: str, flag: str, what: str) -> list[int]:
    """A flag's comma-separated counts, sorted and unique, each an integer >= 1."""
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise LorabenchError(f"{flag} {text!r}: expected comma-separated integers, e.g. 1,4,16") from None
    if not values or values[0] < 1:
        raise LorabenchError(f"{flag} {text!r}: every number of {what} must be >= 1")
    return values


def config_dict(config: RunConfig) -> dict:
    """A RunConfig as plain JSON values (tuples become lists), for storing and comparing."""
    return json.loads(json.dumps(config.to_dict(), default=str))


def sweep_config_dict(base: RunConfig, n_loras: list[int]) -> dict:
    run = config_dict(base)
    run.pop("n_loras", None)
    return {"run": run, "n_loras": list(n_loras)}


def same_run_config(stored: dict, wanted: dict) -> bool:
    """Whether a stored run config is the one wanted. A field the stored one lacks (written before the
    field existed) counts as its default, so sweeps made by earlier versions still resume."""
    from lorabench.experiments.runner import RunConfig

    defaults = config_dict(RunConfig())
    filled = {**{k: defaults[k] for k in wanted if k not in stored and k in defaults}, **stored}
    return filled == wanted


def check_same_sweep(out: Path, wanted: dict, kind: str = "sweep") -> None:
    """Refuse to mix two different sweeps in one folder. Adding points to the grid is allowed.
    `kind` names what the folder holds in messages ("capacity search" for `lorabench capacity`)."""
    path = out / "config.json"
    if not path.exists():
        if out.is_dir() and any(out.iterdir()):
            raise LorabenchError(f"--out {out}: a folder with other files and no {kind} config.json; "
                                 "choose a new folder")
        return
    try:
        stored = json.loads(path.read_text())
        if set(stored) != set(wanted):  # another kind of folder
            raise KeyError(", ".join(sorted(set(wanted) ^ set(stored))))
        stored = stored["run"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LorabenchError(f"{path}: not a {kind} config ({err}); use another --out") from None
    if not same_run_config(stored, wanted["run"]):
        changed = sorted(k for k in set(stored) | set(wanted["run"]) if stored.get(k) != wanted["run"].get(k))
        details = ", ".join(f"{k}: {stored.get(k)!r} -> {wanted['run'].get(k)!r}" for k in changed)
        raise LorabenchError(
            f"{out} holds a {kind} with a different config ({details}); "
            "use another --out, or delete the folder to start over"
        )


# --- one point ----------------------------------------------------------------------------------


def finished_point(out: Path, n: int, wanted: dict) -> bool:
    """True when points/<n>/point.json exists and was made by the same config."""
    path = point_dir(out, n) / "point.json"
    try:
        return same_run_config(json.loads(path.read_text())["config"], wanted)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def failed_rows(config: RunConfig, reason: str) -> pd.DataFrame:
    """Rows for a point the simulator refused: one per strategy, the reason in `status`."""
    from lorabench.sim.metrics import SUMMARY_COLUMNS

    rows = pd.DataFrame({"strategy": list(config.strategies)}).reindex(columns=SUMMARY_COLUMNS)
    rows["n_loras"] = config.n_loras
    rows["status"] = f"point not run: {reason}"
    for col in ("device", "model", "workload", "executor"):
        rows[col] = getattr(config, col)
    return rows


def run_point(out: Path, config: RunConfig) -> pd.DataFrame:
    """Run one point into points/<n>/ (or record why it cannot run) and return its summary.

    Only a LorabenchError (a refusal on the config's own terms) is recorded as a failed point;
    any other exception, Ctrl-C included, propagates and leaves the point unfinished for resume.
    """
    from lorabench.experiments.runner import run_experiment

    folder = point_dir(out, config.n_loras)
    if folder.exists():  # an unfinished attempt (no point.json): start this point over
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        summary = run_experiment(config, out_dir=folder, progress=False)
        status = "ok"
    except LorabenchError as err:
        summary = failed_rows(config, str(err))
        status = f"point not run: {err}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        write_csv_atomic(folder / "summary.csv", summary)
    record = {"n_loras": config.n_loras, "config": config_dict(config), "status": status}
    write_text_atomic(folder / "point.json", json.dumps(record, indent=2) + "\n")
    return summary


# --- the sweep ----------------------------------------------------------------------------------


def run_sweep(
    base: RunConfig,
    n_loras: list[int],
    out: Path,
    jobs: int = 1,
    progress: bool = True,
    on_point: Callable[[int], None] | None = None,
    backend: Backend | None = None,
) -> pd.DataFrame:
    """Run (or resume) the sweep of `base` over `n_loras` into `out`; return the sweep table.

    `base` is a RunConfig; each point is `dataclasses.replace(base, n_loras=n)`. The points run on
    `backend`, by default `local_backend(jobs)`: with `jobs` > 1, in that many worker processes.
    `on_point(n)` is called after each point finishes (the progress bar's hook, and the tests').
    """
    backend = backend if backend is not None else local_backend(jobs)
    out = Path(out)
    base.load_workload()  # a bad workload file is the user's error, not a point that cannot run
    with writer_lock(out):  # one writer at a time; what a killed one left half-written goes
        return _sweep(base, n_loras, out, backend, progress, on_point)


def _sweep(base: RunConfig, n_loras: list[int], out: Path, backend: Backend, progress: bool,
           on_point: Callable[[int], None] | None) -> pd.DataFrame:
    wanted_sweep = sweep_config_dict(base, n_loras)
    check_same_sweep(out, wanted_sweep)
    out.mkdir(parents=True, exist_ok=True)
    remove_temporaries_under(out)
    write_text_atomic(out / "config.json", json.dumps(wanted_sweep, indent=2) + "\n")

    configs = {n: dataclasses.replace(base, n_loras=n) for n in n_loras}
    todo = [n for n in n_loras if not finished_point(out, n, config_dict(configs[n]))]
    done = set(n_loras) - set(todo)
    # disable=None: tqdm draws bars only on a terminal, so a log gets no cursor codes
    bar = tqdm(total=len(n_loras), initial=len(done), desc="sweep points", unit="point", disable=not progress or None)

    def finished(n: int) -> None:
        done.add(n)
        write_csv_atomic(out / "sweep.csv", collect(out, [m for m in n_loras if m in done]))
        bar.set_postfix_str(f"n_loras={n} done")
        bar.update()
        if on_point:
            on_point(n)

    try:
        # an absolute folder: a Ray worker's working directory is not this one
        for config, _ in backend.map_unordered(partial(run_point, out.absolute()), [configs[n] for n in todo]):
            finished(config.n_loras)
    finally:
        bar.close()

    table = collect(out, n_loras)
    if not todo:  # nothing ran, so `finished` wrote nothing: a rerun of a finished sweep
        write_csv_atomic(out / "sweep.csv", table)
    return table


def collect(out: Path, n_loras: list[int]) -> pd.DataFrame:
    """Concatenate the points' summaries in grid order."""
    parts = [pd.read_csv(point_dir(out, n) / "summary.csv") for n in n_loras]
    return pd.concat(parts, ignore_index=True)


# --- command line -------------------------------------------------------------------------------


class _FlagsExcept:
    """A parser stand-in that adds every argument but those named (to borrow `run`'s flags)."""

    def __init__(self, parser: argparse.ArgumentParser, skip: set[str]):
        self.parser, self.skip = parser, skip

    def add_argument(self, *flags, **kwargs):
        if not self.skip & set(flags):
            self.parser.add_argument(*flags, **kwargs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lorabench.experiments.run import add_arguments as add_run_arguments

    # every flag of `lorabench run`, but a sweep's --n-loras is a grid and its --out a sweep folder
    add_run_arguments(_FlagsExcept(parser, {"--n-loras", "--out", "--jobs"}))
    parser.add_argument(
        "--n-loras", default=",".join(map(str, DEFAULT_N_LORAS)),
        help="comma-separated numbers of adapters, one point each (default: %(default)s)",
    )
    add_backend_arguments(parser, "points")
    parser.add_argument("--out", type=Path, default=None,
                        help="sweep folder (default: results/sweep-<workload>); rerun the same command to resume")


def main(args: argparse.Namespace) -> int:
    from lorabench.experiments.run import config_from_args

    n_loras = parse_n_loras(args.n_loras)
    args.n_loras = None  # the base config has none: each point sets its own
    base = config_from_args(args)
    out = args.out or Path("results") / f"sweep-{Path(base.workload).stem}"
    backend = backend_from_args(args, folder=out)
    table = run_sweep(base, n_loras, out, progress=not args.no_progress, backend=backend)
    if not (table["status"] == "ok").any():
        raise LorabenchError(f"no strategy ran at any point ({out / 'sweep.csv'}): {why_nothing_ran(table)}")
    shown = ["n_loras", "strategy", "status", "output_throughput", "throughput_vs_single",
             "ttft_p99_ms", "tpot_p99_ms", "gpu_memory_peak_gib"]
    with pd.option_context("display.width", 160, "display.max_rows", 500, "display.max_colwidth", 40):
        print(table[[c for c in shown if c in table.columns]].to_string(index=False, float_format=format_number))
    tp = "" if base.tp == 1 else f" x {base.tp} in tensor parallel (GPU memory per GPU)"
    print(f"\nwrote {out / 'sweep.csv'} ({table['executor'].iloc[0]} executor, device {table['device'].iloc[0]}{tp}); "
          f"charts: lorabench plot {out}; report: lorabench report {out}")
    return 0
