"""Points as Ray tasks: a sweep or capacity grid spread over a Ray cluster (or a local Ray instance).

`RayTasks` is a `points.Backend`: each point is one Ray task (one CPU), results come back as tasks
finish. Build it through `points.ray_backend` (or `backend_from_args`, for `--backend ray`), which
says clearly when Ray is not installed; this module imports Ray at once, so only they import it.

The point functions write their results themselves (a sweep point's folder, a capacity search's
cached evaluations), so every node must see the output folder at the same path: with a multi-node
cluster, a filesystem they all share. Before the first point runs, one probe per node checks that
it sees the folder and can import lorabench, so a cluster that cannot do the work is refused with
one clear message instead of losing results on a node's own disk.
"""

from __future__ import annotations

import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import ray
from ray.exceptions import RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from lorabench.errors import LorabenchError

P = TypeVar("P")
R = TypeVar("R")


@dataclass(frozen=True)
class RayTasks:
    """Every point a Ray task; as many run at once as the cluster has free CPUs.

    `address`: a running cluster (`ray start --head` prints it; "auto" finds one started on this
    machine); None starts a local Ray instance with this machine's cores, unless RAY_ADDRESS is set
    (as inside `ray job submit`). A Ray session already open in this process is used as it is.
    `folder`: where the points read and write; checked to be visible from every node.
    With `on_progress`, a point's ticks are counted on its node and reported when it finishes.
    """

    address: str | None = None
    folder: Path | None = None

    def map_unordered(self, fn: Callable[..., R], points: Sequence[P],
                      on_progress: Callable[[P, int], None] | None = None) -> Iterator[tuple[P, R]]:
        if not points:
            return
        connect(self.address)
        if self.folder is not None:
            check_nodes(Path(self.folder).absolute())
        task = ray.remote(num_cpus=1)(_call)
        pending = {task.remote(fn, point, on_progress is not None): point for point in points}
        try:
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                point = pending.pop(ref)
                result, ticks = _result(ref)
                if on_progress is not None and ticks:
                    on_progress(point, ticks)
                yield point, result
        finally:
            # on an error, Ctrl-C or a caller that stops early: tasks not started never start, running
            # ones are interrupted (their unfinished folders are redone on resume); waiting for them
            # would hold the caller on a large cluster, and they die with this driver anyway
            for ref in pending:
                ray.cancel(ref)


class _CountedTicks:
    """A worker's `ticks`: counts the point's units of work, reported when the point finishes."""

    def __init__(self):
        self.n = 0

    def update(self, n: int = 1) -> None:
        self.n += n


def _call(fn: Callable[..., R], point, with_ticks: bool) -> tuple[R, int]:
    if not with_ticks:
        return fn(point), 0
    ticks = _CountedTicks()
    return fn(point, ticks), ticks.n


def _result(ref):
    try:
        return ray.get(ref)
    except RayTaskError as err:
        # a refusal on the input's own terms reads as it would locally, without the remote traceback
        if isinstance(getattr(err, "cause", None), LorabenchError):
            raise err.cause from None
        raise


def connect(address: str | None) -> None:
    """Join the cluster at `address`, or start a local instance; nothing if Ray is already initialized."""
    if ray.is_initialized():
        return
    try:
        if address is None:
            ray.init(include_dashboard=False)
        else:
            ray.init(address=address)
    except (ConnectionError, ValueError, RuntimeError) as err:
        if address is None:
            raise LorabenchError(f"--backend ray: cannot start a local Ray instance: {err}") from None
        # Ray >= 2.59 clusters may require a token, which a driver off the head node must be given
        hint = (" (is the cluster up at that address? A cluster with token authentication also needs "
                "RAY_AUTH_MODE=token and its token here: see Ray's token authentication docs)"
                if isinstance(err, ConnectionError) else "")
        raise LorabenchError(f"--ray-address {address}: cannot join a Ray cluster: {err}{hint}") from None


@contextmanager
def _token(folder: Path) -> Iterator[Path]:
    """A file with a fresh name in `folder`, for the probes to look for; removed afterwards."""
    path = folder / f".ray-probe-{uuid.uuid4().hex}"
    path.touch()
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def check_nodes(folder: Path) -> None:
    """Refuse a cluster with a node that has CPUs (where points may run) but does not see `folder`
    or cannot import lorabench."""

    def probe(token: str) -> tuple[bool, bool]:
        # runs on the node; defined here so it is shipped by value and needs no lorabench there
        import importlib.util
        import os

        return os.path.exists(token), importlib.util.find_spec("lorabench") is not None

    probe_task = ray.remote(num_cpus=0)(probe)
    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    with _token(folder) as token:
        refs = [probe_task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(token)) for n in nodes]
        answers = ray.get(refs)
    for node, (sees_folder, has_lorabench) in zip(nodes, answers):
        where = f"Ray node {node['NodeManagerAddress']}"
        if not has_lorabench:
            raise LorabenchError(f"{where} cannot import lorabench: install it on every node, the same version "
                                 "(pip install -e '.[ray]' from the same checkout)")
        if not sees_folder:
            raise LorabenchError(f"--out {folder}: not visible from {where}; the points write there, so every node "
                                 "must see it at the same path (a shared filesystem, e.g. NFS)")
