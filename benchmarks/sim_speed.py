"""Time the simulator as a user meets it (the issue's bar: `lorabench run --workload zipf --n-loras
1024 --requests 100000 --no-progress`, every strategy, in <= 20 s wall on the 2-core machine).

    python benchmarks/sim_speed.py [--requests 10000,100000] [--code DIR] [--label after]
                                   [--json results/sim_speed/cpu.json]

For each request count it times
- the command itself (wall seconds, peak memory: the resident set of its whole process tree), and
- each strategy served alone in one process (Experiment.serve, nothing written): simulated requests
  per second of wall time, the figure that says how fast the simulator is, apart from parallelism.
`--code DIR` times another checkout (its `lorabench` on PYTHONPATH), e.g. a worktree of an older
commit, for before/after figures from one machine. Each result is appended to the JSON file with
the machine, date, load average, commit and command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVE_ALONE = """
import json, sys, time
from lorabench.experiments.runner import Experiment, RunConfig
config = RunConfig(workload="zipf", n_loras=1024, requests=int(sys.argv[1]))
exp = Experiment.build(config)
seconds = {}
for name in config.strategies:
    start = time.perf_counter()
    exp.serve(name)
    seconds[name] = time.perf_counter() - start
print(json.dumps(seconds))
"""


def tree_rss_kib(pid: int) -> int:
    """Resident memory of a process and its descendants (Linux /proc; 0 elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(status.split("VmRSS:")[1].split()[0])
        except (OSError, IndexError, ValueError):
            pass
        stack.extend(children.get(p, []))
    return total


def time_command(command: list[str], env: dict, cwd: str) -> tuple[float, float]:
    """(wall seconds, peak resident MiB of the process tree, sampled every 50 ms)."""
    start, peak = time.perf_counter(), 0
    proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:
        peak = max(peak, tree_rss_kib(proc.pid))
        time.sleep(0.05)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{proc.stderr.read()}")
    return wall, peak / 1024


def commit_of(code: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", default="10000,100000", help="comma-separated request counts")
    parser.add_argument("--code", type=Path, help="time this checkout's lorabench instead of the installed one")
    parser.add_argument("--label", default="", help="a name for this measurement (e.g. before, after)")
    parser.add_argument("--json", type=Path, help="append the results to this JSON list")
    args = parser.parse_args()
    env = dict(os.environ)
    code = args.code.resolve() if args.code else Path(__file__).resolve().parents[1]
    if args.code:
        env["PYTHONPATH"] = str(code)
    results = []
    for n in (int(x) for x in args.requests.split(",")):
        # run from an empty folder: `python -m` and `-c` put the working directory first on the path
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, "-m", "lorabench", "run", "--workload", "zipf", "--n-loras", "1024",
                       "--requests", str(n), "--no-progress", "--out", str(Path(tmp) / "run")]
            wall, peak_mib = time_command(command, env, tmp)
            alone = json.loads(subprocess.run([sys.executable, "-c", SERVE_ALONE, str(n)], env=env, cwd=tmp,
                                              check=True, capture_output=True, text=True).stdout)
        result = {
            "label": args.label, "requests": n, "n_loras": 1024, "workload": "zipf",
            "command_wall_s": round(wall, 2), "command_peak_rss_mib": round(peak_mib),
            "serve_alone_s": {k: round(v, 2) for k, v in alone.items()},
            "simulated_requests_per_s": {k: round(n / v) for k, v in alone.items()},
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "load_average_1min": round(os.getloadavg()[0], 2),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit_of(code), "command": " ".join(["lorabench"] + command[3:-2]),
        }
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.json:
        old = json.loads(args.json.read_text()) if args.json.exists() else []
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(old + results, indent=1) + "\n")


if __name__ == "__main__":
    main()
