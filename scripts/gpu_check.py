"""The one device check of lorabench: on an H100 or an H200 within 8 minutes of device time, the
most important results first; without CUDA, the same steps as a rehearsal (tiny preset, small counts,
kernels under Triton's interpreter).

    scripts/gpu_check.sh [--out DIR] [--only STEP|PHASE,...] [--deadline-s S] [--list]

(the shell script makes lorabench importable, then runs this file). Phases, and their steps in order:

1 correctness  every Triton kernel against the float64 reference at the benchmark's shapes, compiled,
               bf16 and fp16, and the decoder's fast paths against fp32 (`correctness`); the kernel
               tests compiled (`kernel-tests`)
2 kernels      the bench-kernels grid with its baselines timed in the same process (`kernel-grid`),
               then its bars for this card (`check-targets`)
3 fidelity     `lorabench profile` of mistral-7b (`profile`), `lorabench validate` on zipf at 1,024,
               64 and 1 adapters (`validate-N`), a profile of llama-3.1-8b
4 run          one measured `lorabench run --workload zipf --n-loras 1024` (`run`)

Every step has a time budget (BUDGETS_S). A step may run until the end of its budget on the schedule
(time earlier steps left unused carries over) and half its budget more, taken from the later, less
important steps, but never past the deadline; then it is stopped (SIGINT, then SIGKILL), keeping
what it wrote. A step that cannot get half its budget before the deadline is skipped, and says so.
After every step its phase folder is packed into OUT/phaseN-NAME.tar.gz and OUT/summary.json and
OUT/summary.md are rewritten, so a run cut off from outside still returns what it finished. OUT gets
at most 8 files and no folders (the device tool returns 8 files, 2 folders deep). Every result file
carries the device, date, versions (torch, triton, CUDA, driver) and the exact command: CSVs as
columns, JSON as a "provenance" object, run folders as a provenance.json inside.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import pandas as pd

from lorabench.outputs.results import write_csv_atomic, write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
PHASES = {1: "correctness", 2: "kernels", 3: "fidelity", 4: "run"}
# Seconds per step: (GPU, CPU rehearsal). GPU figures are estimates for an H100 or an H200 (nothing
# of lorabench has run on one yet; README, "One GPU check", says how they were made); CPU figures
# are 3-5x what each step took on the 2-core development machine.
BUDGETS_S = {
    "correctness": (50, 30),
    "kernel-tests": (45, 20),
    "kernel-grid": (60, 20),
    "check-targets": (10, 10),
    "profile": (45, 30),
    "validate-1024": (55, 20),
    "validate-64": (50, 20),
    "validate-1": (45, 20),
    "profile-llama-3.1-8b": (45, 0),
    "run": (50, 20),
}
SETUP_S = (15, 10)  # making lorabench importable and asking the machine what it is
# The budgets and the setup: 470 s on a GPU (packed and done within 8 minutes).
DEADLINE_S = tuple(sum(b[i] for b in BUDGETS_S.values()) + SETUP_S[i] for i in (0, 1))
OVERRUN = 0.5  # a step may take this fraction of its budget more from the steps after it
STOP_GRACE_S = 10  # between SIGINT and SIGKILL of a step past its budget
KERNEL_TEST_FILES = ("tests/test_kernels_single.py", "tests/test_kernels_per_lora.py", "tests/test_kernels_paged.py",
                     "tests/test_kernels_compressed.py", "tests/test_kernels_static.py")
VALIDATE_N = (1024, 64, 1)
# zipf's longest output (826 tokens in the first 20 requests of seed 0) makes ~850 decode steps per
# strategy whatever the count: ~8 s on an H100 as modeled; more requests cost little more.
GPU_REQUESTS = {"validate": 60, "run": 100}
REHEARSAL_WORKLOAD = ROOT / "scripts" / "rehearsal-zipf.toml"


@dataclass(frozen=True)
class Step:
    name: str
    phase: int
    budget_s: float
    argv: tuple[str, ...]
    outputs: tuple[Path, ...]  # files and run folders it writes, stamped with provenance afterwards
    env: tuple[tuple[str, str], ...] = ()
    needs: tuple[Path, ...] = ()  # files earlier steps must have written
    flags_if_exists: tuple[tuple[str, Path], ...] = ()  # (flag, file): passed when the file exists
    gpu_only: bool = False
    tables: Callable[["Check", "Step", str], None] | None = None  # turns its raw outputs into tables


class Check:
    """One run of the plan: the schedule, the log, the packed phases and the summary."""

    def __init__(self, env: dict, out: Path, work: Path, deadline_s: float, started: float, command: str):
        self.env, self.out, self.work, self.command = env, out, work, command
        self.gpu = env["card"] != "cpu"
        self.deadline = started + deadline_s
        self.deadline_s, self.started = deadline_s, started
        self.records: list[dict] = []
        out.mkdir(parents=True, exist_ok=True)
        self.log_file = open(out / "gpu_check.log", "a", buffering=1)

    def log(self, text: str) -> None:
        line = f"[{time.time() - self.started:6.1f} s] {text}"
        print(line, flush=True)
        self.log_file.write(line + "\n")

    def phase_dir(self, phase: int) -> Path:
        return self.work / f"phase{phase}-{PHASES[phase]}"

    # -- running -------------------------------------------------------------------------------

    def run(self, steps: list[Step]) -> int:
        schedule_end = time.time()
        for step in steps:
            schedule_end += step.budget_s
            record = dict(step=step.name, phase=step.phase, budget_s=step.budget_s)
            left = self.deadline - time.time()
            missing = [str(p.relative_to(self.work)) for p in step.needs if not p.exists()]
            if step.gpu_only and not self.gpu:
                record.update(status="skipped", note="GPU only")
            elif missing:
                record.update(status="skipped", note=f"needs {', '.join(missing)}, which an earlier step did not write")
            elif left < 0.5 * step.budget_s:
                record.update(status="skipped", note=f"past the deadline: {max(left, 0):.0f} s left of "
                                                     f"{self.deadline_s:.0f} s, budget {step.budget_s:.0f} s")
            else:
                limit = min(schedule_end + OVERRUN * step.budget_s, self.deadline) - time.time()
                record.update(self.execute(step, limit))
                self.after(step, record)
            if record["status"] == "skipped":
                self.log(f"{step.name}: skipped ({record['note']})")
            self.records.append(record)
            self.pack(step.phase)
            self.write_summary()
        failed = [r["step"] for r in self.records if r["status"] not in ("ok", "skipped") or
                  (r["status"] == "skipped" and r["note"] != "GPU only")]
        self.log("done: " + ("every step ok" if not failed else f"not ok: {', '.join(failed)}")
                 + f"; results in {self.out}")
        self.log_file.close()
        print("\n" + (self.out / "summary.md").read_text())
        return 1 if failed else 0

    def argv(self, step: Step) -> list[str]:
        extra = [arg for flag, path in step.flags_if_exists if path.exists() for arg in (flag, str(path))]
        return [*step.argv, *extra]

    def execute(self, step: Step, limit_s: float) -> dict:
        argv = self.argv(step)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "10", **dict(step.env)}
        if self.gpu:
            env.pop("TRITON_INTERPRET", None)
        else:
            env["TRITON_INTERPRET"] = "1"  # the Triton kernels run on the CPU through the interpreter
        command = shlex.join([f"{k}={v}" for k, v in step.env] + argv)
        self.log(f"{step.name} (phase {step.phase}, up to {limit_s:.0f} s): {command}")
        self.phase_dir(step.phase).mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        # Its own process group (not session): stopped as a whole here, and still ended with this
        # check by whoever ends it.
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", preexec_fn=os.setpgrp)
        copier = threading.Thread(target=self._copy_output, args=(proc.stdout,), daemon=True)
        copier.start()
        stopped = False
        try:
            code = proc.wait(timeout=max(limit_s, 1))
        except subprocess.TimeoutExpired:
            stopped = True
            self.log(f"{step.name}: past its budget ({limit_s:.0f} s): stopping it")
            code = stop(proc)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM from whoever ends this check
            stop(proc)
            raise
        copier.join(timeout=5)
        seconds = time.time() - t0
        status = "stopped at its budget" if stopped else "ok" if code == 0 else f"failed (exit {code})"
        self.log(f"{step.name}: {status} in {seconds:.1f} s")
        return dict(status=status, seconds=round(seconds, 1), exit_code=code, command=command)

    def _copy_output(self, stream) -> None:
        for line in stream:
            sys.stdout.write(line)
            sys.stdout.flush()
            self.log_file.write(line)

    # -- results ---------------------------------------------------------------------------------

    def provenance(self, command: str) -> dict:
        return dict(device=self.env["device"], date=self.env["date"], versions=self.env["versions"], command=command,
                    check=self.command)

    def after(self, step: Step, record: dict) -> None:
        """Turn the step's raw outputs into tables, and stamp what it wrote."""
        if step.tables is not None:
            step.tables(self, step, record["command"])
        stamp = self.provenance(record["command"])
        for path in step.outputs:
            stamp_file(path, stamp)
        record["files"] = [str(p.relative_to(self.work)) for p in step.outputs if p.exists()]

    def validate_table(self, step: Step, command: str) -> None:
        """validate.csv gains this step's rows: per strategy, measured and modeled and their error."""
        from lorabench.fidelity.validate import fidelity

        folder, table_path = step.outputs[0].parent, step.outputs[-1]
        measured, modeled = folder / "measured" / "summary.csv", folder / "modeled" / "summary.csv"
        if not (measured.is_file() and modeled.is_file()):
            return
        a, b = pd.read_csv(measured), pd.read_csv(modeled)
        table = fidelity(a, b)
        table.insert(0, "n_loras", a["n_loras"].values)
        table["vs_single_measured"] = a["throughput_vs_single"].values
        table["vs_single_modeled"] = b["throughput_vs_single"].values
        table["device_measured"] = a["device"].values
        table = table.assign(**{k: v for k, v in self.provenance(command).items() if k != "check"})
        if table_path.is_file():
            table = pd.concat([pd.read_csv(table_path), table], ignore_index=True)
        write_csv_atomic(table_path, table)

    def pack(self, phase: int) -> None:
        """OUT/phaseN-NAME.tar.gz from the phase folder, replaced atomically."""
        folder = self.phase_dir(phase)
        if not folder.is_dir():
            return
        final = self.out / f"{folder.name}.tar.gz"
        partial = self.out / f".{folder.name}.tar.gz.partial"
        with tarfile.open(partial, "w:gz") as tar:
            tar.add(folder, arcname=folder.name)
        os.replace(partial, final)

    def write_summary(self) -> None:
        data = dict(check=self.command, environment=self.env, deadline_s=self.deadline_s,
                    elapsed_s=round(time.time() - self.started, 1), steps=self.records)
        write_json_atomic(self.out / "summary.json", data)
        write_text_atomic(self.out / "summary.md", summary_markdown(self, data))


def stamp_file(path: Path, stamp: dict) -> None:
    """Device, date, versions and command into a result: CSV columns (those it lacks), a JSON
    "provenance" object, or a provenance.json inside a run folder."""
    if path.is_dir():
        write_json_atomic(path / "provenance.json", stamp)
    elif path.suffix == ".csv" and path.is_file() and path.stat().st_size:
        table = pd.read_csv(path)
        missing = {k: v for k, v in stamp.items() if k not in table.columns and k != "check"}
        if missing:
            write_csv_atomic(path, table.assign(**missing))
    elif path.suffix == ".json" and path.is_file():
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "provenance" not in data:
            data["provenance"] = stamp
            write_json_atomic(path, data)


def stop(proc: subprocess.Popen) -> int:
    """SIGINT to a step's process group (pytest's workers too; bench-kernels keeps the grid points it
    finished), SIGKILL if it is still there STOP_GRACE_S later; its exit code."""
    signal_group(proc.pid, signal.SIGINT)
    try:
        return proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        signal_group(proc.pid, signal.SIGKILL)
        return proc.wait()


def signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:  # it ended meanwhile
        pass


def junit_table(check: Check, step: Step, command: str) -> None:
    """pytest's JUnit XML (the step's first output) as one row per test: test, outcome, seconds,
    message (its second)."""
    xml_path, csv_path = step.outputs[:2]
    if not xml_path.is_file():
        return
    rows = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                outcome, message = kind, (found.get("message") or "")[:300]
        rows.append(dict(test=f"{case.get('classname')}::{case.get('name')}", outcome=outcome,
                         seconds=float(case.get("time") or 0), message=message))
    write_csv_atomic(csv_path, pd.DataFrame(rows, columns=["test", "outcome", "seconds", "message"]))


# -- the plan ------------------------------------------------------------------------------------


def plan(env: dict, work: Path) -> list[Step]:
    """Every step in order, for the card `env` names (the rehearsal's small shapes on the CPU)."""
    gpu, py = env["card"] != "cpu", sys.executable
    budget = {name: seconds[0 if gpu else 1] for name, seconds in BUDGETS_S.items()}
    lorabench = (py, "-m", "lorabench")
    d1, d2, d3, d4 = (work / f"phase{n}-{PHASES[n]}" for n in PHASES)
    model = "mistral-7b" if gpu else "tiny"
    profile = d3 / f"profile-{env['card']}-{model}.json"
    device = ("--device", env["preset"]) if gpu and env.get("preset") else ()
    if gpu:
        grid, profile_args = (), ()
        serve = ("--workload", "zipf", "--model", model, *device)
        tests = (*KERNEL_TEST_FILES, *(("-n", "12") if env.get("xdist") else ()))  # compiling in parallel
        requests = GPU_REQUESTS
    else:  # the rehearsal: seconds per step on a CPU
        grid, profile_args = ("--m", "1,16", "--n", "1,8", "--d", "64", "--threads", "1"), ("--grid", "quick", "--repeats", "1", "--n-loras", "4")
        serve = ("--workload", str(REHEARSAL_WORKLOAD), "--model", model)
        tests, requests = KERNEL_TEST_FILES[:1], dict(validate=8, run=8)
    junit = d1 / "kernel-tests.xml"
    kernels_csv, llama = d2 / "kernels.csv", d3 / f"profile-{env['card']}-llama-3.1-8b.json"
    steps = [
        Step("correctness", 1, budget["correctness"], (py, "-m", "lorabench.kernelbench.correctness", "--out", str(d1), "--model", model),
             (d1 / "kernels-vs-float64.csv", d1 / "decoder-vs-fp32.csv")),
        Step("kernel-tests", 1, budget["kernel-tests"], (py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *tests),
             (junit, d1 / "kernel-tests.csv"), env=(("LORABENCH_TRITON_COMPILED", "1"),) if gpu else (),
             tables=junit_table),
        Step("kernel-grid", 2, budget["kernel-grid"], (*lorabench, "bench-kernels", "--out", str(kernels_csv), *grid), (kernels_csv,)),
        Step("check-targets", 2, budget["check-targets"], (*lorabench, "bench-kernels", "--check-targets",
                                                           str(kernels_csv), "--out", str(d2 / "targets.csv")),
             (d2 / "targets.csv",), needs=(kernels_csv,), gpu_only=True),
        Step("profile", 3, budget["profile"], (*lorabench, "profile", "--model", model, *profile_args, "--out", str(profile)), (profile,)),
    ]
    for n in VALIDATE_N:
        folder = d3 / f"validate-{n}"
        steps.append(Step(f"validate-{n}", 3, budget[f"validate-{n}"],
                          (*lorabench, "validate", *serve, "--n-loras", str(n), "--requests", str(requests["validate"]),
                           "--profile", str(profile), "--out", str(folder), "--no-progress"),
                          (folder / "measured", folder / "modeled", d3 / "validate.csv"), needs=(profile,),
                          tables=Check.validate_table))
    steps += [
        Step("profile-llama-3.1-8b", 3, budget["profile-llama-3.1-8b"], (*lorabench, "profile", "--model", "llama-3.1-8b", "--out", str(llama)), (llama,),
             gpu_only=True),
        Step("run", 4, budget["run"], (*lorabench, "run", *serve, "--executor", "measured", "--n-loras", "1024",
                                        "--requests", str(requests["run"]), "--out", str(d4 / "run-zipf-1024"),
                                        "--no-progress"),
             (d4 / "run-zipf-1024",), flags_if_exists=(("--profile", profile),)),
    ]
    assert [s.name for s in steps] == list(BUDGETS_S), "every step has a budget, in order"
    return steps


def wanted_steps(only: str | None) -> set[str] | None:
    """The step names and phase numbers of --only (None: every step), or exit naming the unknown ones."""
    if not only:
        return None
    wanted = {w.strip() for w in only.split(",") if w.strip()}
    unknown = sorted(wanted - set(BUDGETS_S) - {str(p) for p in PHASES})
    if unknown:
        sys.exit(f"gpu_check: --only {only}: unknown {', '.join(unknown)} (steps: {', '.join(BUDGETS_S)}; or phases 1-4)")
    return wanted


def select(steps: list[Step], wanted: set[str] | None) -> list[Step]:
    return [s for s in steps if wanted is None or s.name in wanted or str(s.phase) in wanted]


# -- the summary ---------------------------------------------------------------------------------


def summary_markdown(check: Check, data: dict) -> str:
    """What a reader needs first: the machine, every step's status, and the tables the issue quotes."""
    env = data["environment"]
    lines = [f"# lorabench GPU check: {env['device']} ({env['card']}), {env['date']}", "",
             f"{env['versions']}; command `{data['check']}`; {data['elapsed_s']:.0f} s of {data['deadline_s']:.0f} s.", ""]
    if env.get("note"):
        lines += [f"Note: {env['note']}", ""]
    steps = pd.DataFrame(data["steps"]).reindex(columns=["phase", "step", "status", "seconds", "budget_s", "note"])
    lines += ["```", steps.astype(object).fillna("").to_string(index=False), "```", ""]
    for title, path, columns in (
        ("Kernels against float64", check.phase_dir(1) / "kernels-vs-float64.csv", ["op", "dtype", "shape", "error_vs_tolerance", "ok"]),
        ("Decoder against fp32", check.phase_dir(1) / "decoder-vs-fp32.csv", ["strategy", "step", "mode", "max_rel_err", "ok"]),
        ("Kernel bars", check.phase_dir(2) / "targets.csv", ["target", "strategy", "M", "N", "ours_us", "bar_us", "ratio", "ok"]),
        ("Measured vs modeled (error = modeled / measured - 1)", check.phase_dir(3) / "validate.csv",
         ["n_loras", "strategy", "status", "tok/s measured", "tok/s error", "TTFT mean ms error", "TPOT mean ms error"]),
        ("Measured run, zipf, 1,024 adapters", check.phase_dir(4) / "run-zipf-1024" / "summary.csv",
         ["strategy", "status", "output_throughput", "throughput_vs_single", "tpot_mean_ms", "device"]),
    ):
        if path.is_file():
            table = pd.read_csv(path)
            if title.startswith(("Kernels", "Decoder")):  # failures, or the worst case
                failed = table[~table.ok]
                table = failed if len(failed) else table.nlargest(1, columns[3])
                title += f": {len(failed)} failed" + ("" if len(failed) else ", worst case shown")
            with pd.option_context("display.width", 200, "display.max_rows", 200, "display.float_format", "{:.4g}".format):
                lines += [f"## {title}", "", "```", table.reindex(columns=columns).to_string(index=False), "```", ""]
    tests = check.phase_dir(1) / "kernel-tests.csv"
    if tests.is_file():
        counts = pd.read_csv(tests).outcome.value_counts().to_dict()
        lines += [f"Compiled kernel tests: {counts}", ""]
    return "\n".join(lines)


def probe() -> dict:
    """The machine, from a fresh interpreter (the check itself never touches the GPU)."""
    done = subprocess.run([sys.executable, "-m", "lorabench.kernelbench.provenance"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    if done.returncode != 0:
        sys.exit(f"gpu_check: lorabench is not importable here:\n{done.stderr[-2000:]}")
    env = json.loads(done.stdout.strip().splitlines()[-1])
    if env["card"] != "cpu" and env["card"] not in ("h100", "h200"):
        env["note"] = (f"{env['device']} is neither an H100 nor an H200: every step runs, but the budgets were "
                       "sized for those cards and the modeled runs use the h200 preset unless one matches")
    return env


def main(argv: list[str] | None = None) -> int:
    started = float(os.environ.get("LORABENCH_CHECK_STARTED") or time.time())  # set by gpu_check.sh
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="where the packed phases, log and summary go (default: $OUT of the "
                   "device tool, else results/gpu-check-<card>-<date>)")
    p.add_argument("--work", type=Path, help="where the phase folders are written (default: a new temporary folder)")
    p.add_argument("--only", help="comma-separated steps or phase numbers to run (default: all)")
    p.add_argument("--deadline-s", type=float, help=f"seconds from the start for the whole check (default "
                   f"{DEADLINE_S[0]} on a GPU, {DEADLINE_S[1]} on the CPU)")
    p.add_argument("--list", action="store_true", help="print the steps with their budgets and commands; run nothing")
    args = p.parse_args(argv)
    wanted = wanted_steps(args.only)
    env = probe()
    gpu = env["card"] != "cpu"
    if env["missing_modules"]:
        sys.exit(f"gpu_check: missing on this machine: {', '.join(env['missing_modules'])}. Make wheels with "
                 "scripts/gpu_wheels.sh and carry .whl (README, 'One GPU check').")
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else
                       ROOT / "results" / f"gpu-check-{env['card']}-{datetime.now(timezone.utc):%Y%m%d-%H%M}")
    if args.list:
        for s in select(plan(env, args.work or Path("WORK")), wanted):
            print(f"{s.phase} {s.name:22s} {s.budget_s:4d} s  {'(GPU only) ' if s.gpu_only else ''}{shlex.join(s.argv)}")
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="lorabench-gpu-check-"))
    steps = select(plan(env, work), wanted)
    deadline = args.deadline_s or DEADLINE_S[0 if gpu else 1]
    command = shlex.join(["scripts/gpu_check.sh", *(sys.argv[1:] if argv is None else argv)])
    check = Check(env, out, work, deadline, started, command)
    check.log(f"{env['device']} ({env['card']}), {env['versions']}; deadline {deadline:.0f} s; phases in {work}")
    if env.get("note"):
        check.log(f"note: {env['note']}")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the running step, as Ctrl-C does
    try:
        return check.run(steps)
    except KeyboardInterrupt:
        check.log(f"interrupted; the phases finished before are in {out}")
        return 130


if __name__ == "__main__":
    sys.exit(main())
