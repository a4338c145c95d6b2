"""Point backends: local worker processes give what in-process runs give; errors reach the caller; the
flags that choose a backend (the Ray backend itself: test_ray_backend.py)."""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys

import pytest

from lorabench.cli import main as cli_main
from lorabench.errors import LorabenchError
from lorabench.experiments.points import InProcess, LocalProcesses, add_backend_arguments, backend_from_args, local_backend


def test_local_processes_give_every_point_and_its_result():
    points = [5, 3, 10, 0, 7, 20]
    serial = list(InProcess().map_unordered(math.factorial, points))
    assert serial == [(p, math.factorial(p)) for p in points]  # in order, in this process
    parallel = list(LocalProcesses(2).map_unordered(math.factorial, points))
    assert sorted(parallel) == sorted(serial)


def test_an_error_in_a_point_reaches_the_caller():
    with pytest.raises(ValueError, match="negative"):
        list(LocalProcesses(2).map_unordered(math.factorial, [3, -1, 4]))
    with pytest.raises(ValueError, match="negative"):
        list(InProcess().map_unordered(math.factorial, [-1]))


def test_jobs_choose_the_backend():
    assert isinstance(local_backend(1), InProcess)
    assert local_backend(3) == LocalProcesses(3)
    with pytest.raises(LorabenchError, match="--jobs 0"):
        local_backend(0)


# --- choosing the backend on the command line (no Ray needed) -----------------------------------


def backend_args(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_backend_arguments(parser, "points")
    return parser.parse_args(list(flags))


def test_backend_flags_choose_the_backend():
    assert isinstance(backend_from_args(backend_args()), InProcess)
    assert backend_from_args(backend_args("--jobs", "3")) == LocalProcesses(3)
    assert isinstance(backend_from_args(backend_args("--backend", "local", "--jobs", "1")), InProcess)


@pytest.mark.parametrize("flags, message", [
    (["--backend", "ray", "--jobs", "2"], "--jobs 2: local processes only"),
    (["--ray-address", "10.0.0.1:6379"], "--ray-address 10.0.0.1:6379: only with --backend ray"),
    (["--jobs", "0"], "--jobs 0"),
])
def test_flags_that_do_not_go_together_are_refused(flags, message):
    with pytest.raises(LorabenchError, match=re.escape(message)):
        backend_from_args(backend_args(*flags))


@pytest.mark.parametrize("command", ["sweep", "capacity"])
def test_backend_ray_without_ray_installed_is_one_clear_error(command, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    out = tmp_path / "out"
    assert cli_main([command, "--n-loras", "1", "--model", "tiny", "--backend", "ray", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"lorabench {command}: error: --backend ray: Ray is not installed; pip install -e '.[ray]'\n"
    assert not out.exists()


def test_importing_lorabench_does_not_import_ray():
    code = ("import sys, lorabench.cli, lorabench.experiments.points, lorabench.experiments.sweep, lorabench.experiments.capacity; "
            "print('ray' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
