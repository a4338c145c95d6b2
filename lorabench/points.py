"""Where independent points run: in this process, or in a pool of local processes.

A sweep point and a capacity search are pure functions of their inputs, so a batch of them is a map
of one function over a list of points. A backend does that map and yields `(point, result)` as each
point finishes (in any order); the caller writes results as they come, so an interrupted batch keeps
what finished. The function and the points must be picklable (a module-level function, or a
functools.partial of one), since a backend may run them in other processes or on other machines.

    backend = local_backend(jobs)
    for point, result in backend.map_unordered(fn, points):
        ...
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Callable, Iterator, Protocol, Sequence, TypeVar

from lorabench.errors import LorabenchError

P = TypeVar("P")
R = TypeVar("R")


class Backend(Protocol):
    """Runs `fn` on every point; yields (point, fn(point)) as each finishes. An exception in `fn`
    propagates to the caller; points not yet started are then dropped."""

    def map_unordered(self, fn: Callable[[P], R], points: Sequence[P]) -> Iterator[tuple[P, R]]: ...


class InProcess:
    """One point after another, in this process (in order)."""

    def map_unordered(self, fn: Callable[[P], R], points: Sequence[P]) -> Iterator[tuple[P, R]]:
        for point in points:
            yield point, fn(point)


@dataclass(frozen=True)
class LocalProcesses:
    """Up to `jobs` points at once, each in a worker process of this machine."""

    jobs: int

    def map_unordered(self, fn: Callable[[P], R], points: Sequence[P]) -> Iterator[tuple[P, R]]:
        if len(points) <= 1:  # a worker would only add its start-up time (importing torch)
            yield from InProcess().map_unordered(fn, points)
            return
        # spawn, not fork: the parent may hold torch/OpenMP threads that do not survive a fork
        pool = ProcessPoolExecutor(max_workers=min(self.jobs, len(points)), mp_context=get_context("spawn"))
        try:
            futures = {pool.submit(fn, point): point for point in points}
            for future in as_completed(futures):
                yield futures[future], future.result()
        finally:
            # on an error or Ctrl-C, the points that have not started are not started; the caller
            # waits only for those already running
            pool.shutdown(wait=True, cancel_futures=True)


def local_backend(jobs: int) -> Backend:
    """The backend for `--jobs N` on this machine: in-process for 1, else N worker processes."""
    if jobs < 1:
        raise LorabenchError(f"--jobs {jobs}: must be >= 1")
    return InProcess() if jobs == 1 else LocalProcesses(jobs)
