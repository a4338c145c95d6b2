"""`--backend ray`: points as Ray tasks on a local Ray instance give what local processes give, resume
the same folders, and fail clearly. Needs the ray extra; skipped without it."""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]'): "
                                        "the Ray backend is not tested")

import lorabench.experiments.ray_backend as ray_backend  # noqa: E402  (needs ray)
from lorabench.cli import main as cli_main  # noqa: E402
from lorabench.errors import LorabenchError  # noqa: E402
from lorabench.experiments.capacity import SearchSettings, objectives_for, run_capacity  # noqa: E402
from lorabench.experiments.points import InProcess, LocalProcesses  # noqa: E402
from lorabench.experiments.ray_backend import RayTasks  # noqa: E402
from lorabench.experiments.runner import RunConfig  # noqa: E402
from lorabench.experiments.sweep import parse_n_loras, run_sweep  # noqa: E402

SWEEP_FLAGS = ["--workload", "zipf", "--requests", "60", "--seed", "3", "--model", "tiny", "--no-progress"]
# files that record when they were written; everything else in a folder is a function of the config
TIMESTAMPS = {"config.json": "created_utc", "bench": "date"}


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray instance for the module (it takes seconds to start); RayTasks joins it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def sweep_config(**overrides) -> RunConfig:
    return RunConfig(**{**dict(workload="zipf", requests=60, seed=3, model="tiny"), **overrides})


def folder_contents(folder) -> dict[str, object]:
    """Every file of a result folder: its bytes, or for the files that record a time, the JSON without it."""
    contents = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = str(path.relative_to(folder))
        stamp = TIMESTAMPS.get(path.name) or TIMESTAMPS.get(path.parent.name)
        if stamp and path.suffix == ".json":
            record = json.loads(path.read_text())
            record.pop(stamp, None)  # a sweep's own config.json has none
            contents[key] = record
        else:
            contents[key] = path.read_bytes()
    return contents


# --- the backend on its own ---------------------------------------------------------------------


def test_ray_tasks_give_every_point_and_its_result():
    rng = np.random.default_rng()
    points = [int(p) for p in rng.integers(0, 30, size=7)]
    results = list(RayTasks().map_unordered(math.factorial, points))
    assert sorted(results) == sorted((p, math.factorial(p)) for p in points)


def test_progress_of_each_point_arrives_when_it_finishes():
    def ticking(n, ticks):  # a local function: shipped to the workers by value
        for _ in range(n):
            ticks.update()
        return n * n

    points = [3, 0, 5, 2]
    ticks: dict[int, int] = {}
    results = dict(RayTasks().map_unordered(ticking, points,
                                            on_progress=lambda p, n: ticks.__setitem__(p, ticks.get(p, 0) + n)))
    assert results == {p: p * p for p in points}
    assert ticks == {p: p for p in points if p}  # what the same function reports in this process
    local: dict[int, int] = {}
    list(InProcess().map_unordered(ticking, points, on_progress=lambda p, n: local.__setitem__(p, local.get(p, 0) + n)))
    assert ticks == local


def test_an_error_in_a_point_reaches_the_caller():
    with pytest.raises(ValueError, match="negative"):
        list(RayTasks().map_unordered(math.factorial, [3, -1, 4]))
    # a LorabenchError arrives as itself: the CLI prints its message alone, no remote traceback
    with pytest.raises(LorabenchError) as caught:
        list(RayTasks().map_unordered(parse_n_loras, ["1,2", "4,x"]))
    assert type(caught.value) is LorabenchError
    assert str(caught.value).startswith("--n-loras '4,x'")


def test_a_folder_a_node_cannot_see_is_refused(tmp_path, monkeypatch):
    # the node is this machine, so make the probe look for a file that is not there
    unseen = tmp_path / "elsewhere" / "probe"
    monkeypatch.setattr(ray_backend, "_token", lambda folder: contextlib.nullcontext(unseen))
    with pytest.raises(LorabenchError, match=r"--out .*not visible from Ray node .*shared filesystem"):
        list(RayTasks(folder=tmp_path).map_unordered(math.factorial, [3]))


# --- sweep and capacity on Ray ------------------------------------------------------------------


def test_a_sweep_on_ray_writes_what_local_processes_write(tmp_path, capsys):
    run_sweep(sweep_config(), [1, 4], tmp_path / "serial", progress=False)
    run_sweep(sweep_config(), [1, 4], tmp_path / "jobs2", progress=False, backend=LocalProcesses(2))
    ray_out = tmp_path / "ray"
    assert cli_main(["sweep", *SWEEP_FLAGS, "--n-loras", "1,4", "--backend", "ray", "--out", str(ray_out)]) == 0
    assert "sweep.csv" in capsys.readouterr().out
    serial = folder_contents(tmp_path / "serial")
    assert {"sweep.csv", "points/1/summary.csv", "points/4/summary.csv", "points/4/point.json"} <= set(serial)
    assert folder_contents(ray_out) == serial
    assert folder_contents(tmp_path / "jobs2") == serial


def test_an_interrupted_sweep_resumes_on_ray_without_rerunning_finished_points(tmp_path):
    out = tmp_path / "sweep"
    run_sweep(sweep_config(), [1, 4], out, progress=False, backend=RayTasks(folder=out))
    (out / "points" / "4" / "point.json").unlink()  # point 4 was cut off before it finished
    kept = (out / "points" / "1" / "summary.csv").stat().st_mtime_ns

    ran: list[int] = []
    table = run_sweep(sweep_config(), [1, 4, 8], out, progress=False, on_point=ran.append, backend=RayTasks(folder=out))
    assert sorted(ran) == [4, 8]
    assert (out / "points" / "1" / "summary.csv").stat().st_mtime_ns == kept
    fresh = run_sweep(sweep_config(), [1, 4, 8], tmp_path / "fresh", progress=False)
    pd.testing.assert_frame_equal(table, fresh)
    assert (out / "sweep.csv").read_bytes() == (tmp_path / "fresh" / "sweep.csv").read_bytes()

    ran.clear()  # a finished sweep: rerunning it runs nothing
    run_sweep(sweep_config(), [1, 4, 8], out, progress=False, on_point=ran.append, backend=RayTasks(folder=out))
    assert ran == []


def test_capacity_on_ray_finds_what_local_processes_find(tmp_path):
    config = RunConfig(requests=100, seed=3, strategies=("per-lora",), ttft_slo_ms=300.0, tpot_slo_ms=30.0)
    settings = SearchSettings(objectives_for(config, None), start_rate=40.0, rel_tol=0.05)
    local = run_capacity(config, [1, 64], tmp_path / "local", settings, progress=False)
    on_ray = run_capacity(config, [1, 64], tmp_path / "ray", settings, progress=False,
                          backend=RayTasks(folder=tmp_path / "ray"))
    pd.testing.assert_frame_equal(local, on_ray)
    in_local, in_ray = folder_contents(tmp_path / "local"), folder_contents(tmp_path / "ray")
    assert set(in_local) == set(in_ray) and any(k.startswith("evaluations/") for k in in_local)
    # an SVG chart records when it was drawn; every table and cached evaluation is the same
    assert {k: v for k, v in in_ray.items() if not k.startswith("charts/")} == \
           {k: v for k, v in in_local.items() if not k.startswith("charts/")}


def test_a_bad_ray_address_is_one_clear_error(tmp_path):
    # a process of its own: this one is already connected to the module's Ray instance
    out = tmp_path / "sweep"
    done = subprocess.run([sys.executable, "-m", "lorabench", "sweep", *SWEEP_FLAGS, "--n-loras", "1",
                           "--backend", "ray", "--ray-address", "no-such-address", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "error: --ray-address no-such-address: cannot join a Ray cluster" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (out / "points").exists()
