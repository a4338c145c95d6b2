"""Point backends: local worker processes give what in-process runs give; errors reach the caller."""

from __future__ import annotations

import math

import pytest

from lorabench.errors import LorabenchError
from lorabench.points import InProcess, LocalProcesses, local_backend


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
