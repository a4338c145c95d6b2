"""Where independent points run: in this process, in a pool of local processes, or as Ray tasks.

A sweep point and a capacity search are pure functions of their inputs, so a batch of them is a map
of one function over a list of points. A backend does that map and yields `(point, result)` as each
point finishes (in any order); the caller writes results as they come, so an interrupted batch keeps
what finished. The function and the points must be picklable (a module-level function, or a
functools.partial of one), since a backend may run them in other processes or on other machines.

    backend = local_backend(jobs)
    for point, result in backend.map_unordered(fn, points):
        ...

With `on_progress`, `fn(point, ticks)` is called instead, `ticks.update(n)` saying that n more units
of the point's work are done (tqdm's method name, so a bar or a ticker serves alike), and
`on_progress(point, n)` runs in the caller's process as they arrive: progress bars for work done
in other processes.

Local workers never outlive the caller: if it stops by an exception (Ctrl-C, SIGTERM through the
command line's handler, an error), the running workers are terminated before it goes on; if it dies
at once (kill -9), each worker notices within a fraction of a second (the kernel's parent-death signal
on Linux, and a thread watching the parent's pid everywhere) and exits, so nothing keeps writing
into the caller's output folder.

`sweep` and `capacity` choose with `--backend local|ray` (`add_backend_arguments`,
`backend_from_args`); the Ray backend lives in `ray_backend.py`, imported only when asked for, so
lorabench runs without Ray installed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import queue
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence, TypeVar

from lorabench.errors import LorabenchError

P = TypeVar("P")
R = TypeVar("R")


Progress = Callable[[P, int], None]


class Backend(Protocol):
    """Runs `fn` on every point; yields (point, fn(point)) as each finishes. An exception in `fn`
    propagates to the caller; points not yet started are then dropped."""

    def map_unordered(self, fn: Callable[..., R], points: Sequence[P],
                      on_progress: Progress | None = None) -> Iterator[tuple[P, R]]: ...


class _Ticks:
    """`update(n)` calls `on_progress(point, n)` (in this process)."""

    def __init__(self, on_progress: Progress, point):
        self.on_progress, self.point = on_progress, point

    def update(self, n: int = 1) -> None:
        self.on_progress(self.point, n)


class InProcess:
    """One point after another, in this process (in order)."""

    def map_unordered(self, fn: Callable[..., R], points: Sequence[P],
                      on_progress: Progress | None = None) -> Iterator[tuple[P, R]]:
        for point in points:
            yield point, (fn(point) if on_progress is None else fn(point, _Ticks(on_progress, point)))


@dataclass(frozen=True)
class LocalProcesses:
    """Up to `jobs` points at once, each in a worker process of this machine."""

    jobs: int

    def map_unordered(self, fn: Callable[..., R], points: Sequence[P],
                      on_progress: Progress | None = None) -> Iterator[tuple[P, R]]:
        if len(points) <= 1:  # a worker would only add its start-up time
            yield from InProcess().map_unordered(fn, points, on_progress)
            return
        # spawn, not fork: the parent may hold torch/OpenMP threads that do not survive a fork
        context = get_context("spawn")
        ticks = context.Queue() if on_progress is not None else None
        finished = False
        with _signals_deferred():  # the pool starts its workers in the first submit
            pool = ProcessPoolExecutor(max_workers=min(self.jobs, len(points)), mp_context=context,
                                       initializer=_init_worker, initargs=(ticks, os.getpid()))
            futures = {pool.submit(_call, fn, i, point, ticks is not None): point for i, point in enumerate(points)}
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.2 if ticks else None, return_when=FIRST_COMPLETED)
                if ticks is not None:
                    _drain(ticks, points, on_progress)
                for future in done:
                    yield futures[future], future.result()
            if ticks is not None:  # what the last workers sent as they finished
                _drain(ticks, points, on_progress)
            finished = True
        finally:
            if not finished:  # an error, Ctrl-C or SIGTERM: stop the points that are running too
                _terminate_workers(pool)
            pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _signals_deferred():
    """Ctrl-C and SIGTERM wait until the block is over, then act as they would have. Raised inside a
    worker's start, their exception would leave a half-started worker that holds the pool's queue
    and that no one stops, and the pool's shutdown would wait for it forever."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:
            handler = previous[caught[0]]
            if callable(handler):
                handler(caught[0], None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(caught[0])


def _terminate_workers(pool: ProcessPoolExecutor) -> None:
    # ProcessPoolExecutor has no public way to stop running work before Python 3.14 (terminate_workers)
    workers = list((getattr(pool, "_processes", None) or {}).values())
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.join(timeout=5)


_ticks_queue = None  # in a worker: where its points' progress goes
_parent_pid = None  # in a worker: the process that started it
PARENT_POLL_S = 0.2


def _init_worker(ticks, parent_pid: int) -> None:
    global _ticks_queue, _parent_pid
    _ticks_queue, _parent_pid = ticks, parent_pid
    _die_with_parent()
    threading.Thread(target=_watch_parent, name="lorabench-parent-watch", daemon=True).start()


def _die_with_parent() -> None:
    """On Linux, ask the kernel to kill this process the moment its parent dies."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # the watching thread still notices
    if os.getppid() != _parent_pid:  # it died before that took effect
        os._exit(1)


def _watch_parent() -> None:
    """Exit when the parent is gone (a dead parent's children are adopted by another process)."""
    while os.getppid() == _parent_pid:
        time.sleep(PARENT_POLL_S)
    os._exit(1)


class _QueuedTicks:
    """A worker's `ticks`: progress of point `index`, sent to the caller at most every 0.1 s."""

    def __init__(self, index: int):
        self.index, self.unsent, self.sent_at = index, 0, time.monotonic()

    def update(self, n: int = 1) -> None:
        self.unsent += n
        if time.monotonic() - self.sent_at > 0.1:
            self.flush()

    def flush(self) -> None:
        if self.unsent:
            _ticks_queue.put((self.index, self.unsent))
            self.unsent, self.sent_at = 0, time.monotonic()


def _call(fn: Callable[..., R], index: int, point, with_ticks: bool) -> R:
    if os.getppid() != _parent_pid:  # a point queued before the parent died: not for anyone now
        os._exit(1)
    if not with_ticks:
        return fn(point)
    ticks = _QueuedTicks(index)
    try:
        return fn(point, ticks)
    finally:
        ticks.flush()


def _drain(ticks, points: Sequence[P], on_progress: Progress) -> None:
    while True:
        try:
            index, n = ticks.get_nowait()
        except queue.Empty:
            return
        on_progress(points[index], n)


def local_backend(jobs: int) -> Backend:
    """The backend for `--jobs N` on this machine: in-process for 1, else N worker processes."""
    if jobs < 1:
        raise LorabenchError(f"--jobs {jobs}: must be >= 1")
    return InProcess() if jobs == 1 else LocalProcesses(jobs)


# --- choosing a backend on the command line -----------------------------------------------------

BACKENDS = ("local", "ray")


def add_backend_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """--jobs, --backend and --ray-address; `what` names the points in help texts ("points", "searches")."""
    parser.add_argument("--jobs", type=int, default=None,
                        help=f"{what} run in parallel local processes (default: 1; --backend local only)")
    parser.add_argument("--backend", choices=BACKENDS, default="local",
                        help=f"where {what} run: local processes, or Ray tasks on a Ray cluster (needs the ray "
                             "extra: pip install -e '.[ray]') (default: %(default)s)")
    parser.add_argument("--ray-address", default=None, metavar="ADDR",
                        help="with --backend ray: the Ray cluster to join (host:port from `ray start --head`, or "
                             "auto); default: RAY_ADDRESS if set, else a local Ray instance on this machine's cores")


def backend_from_args(args: argparse.Namespace, folder: Path | None = None) -> Backend:
    """The backend the flags of `add_backend_arguments` ask for. `folder`: where the points write (a
    Ray cluster's nodes must all see it)."""
    if args.backend == "local":
        if args.ray_address is not None:
            raise LorabenchError(f"--ray-address {args.ray_address}: only with --backend ray")
        return local_backend(args.jobs if args.jobs is not None else 1)
    if args.jobs is not None:
        raise LorabenchError(f"--jobs {args.jobs}: local processes only; with --backend ray, as many points run "
                             "at once as the Ray cluster has CPUs")
    return ray_backend(args.ray_address, folder)


def ray_backend(address: str | None = None, folder: Path | None = None) -> Backend:
    """Points as Ray tasks (see ray_backend.RayTasks), or one clear error when Ray is not installed."""
    try:
        import ray  # noqa: F401  (only to know that it is there)
    except ImportError:
        raise LorabenchError("--backend ray: Ray is not installed; pip install -e '.[ray]'") from None
    from lorabench.experiments.ray_backend import RayTasks

    return RayTasks(address, folder)
