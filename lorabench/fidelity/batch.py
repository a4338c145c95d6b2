"""Replay many measured runs at once: on a backend (local processes or Ray tasks), with a progress
bar, each result cached on disk under a key of everything it depends on, so a rerun (or a resumed
one) simulates only what it has not simulated before."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from lorabench.experiments.points import Backend
from lorabench.fidelity.real_runs import RealRun
from lorabench.fidelity.replay import ReplaySettings, replay
from lorabench.fidelity.surrogate import RunTrace
from lorabench.outputs.results import write_text_atomic
from lorabench.presets import DeviceSpec, ModelShape
from lorabench.sim.costmodel import Efficiency
from lorabench.sim.engine_model import EngineModel

CACHE_VERSION = 1  # bump when the simulator's results change for the same inputs


@dataclass(frozen=True)
class Server:
    """What a replay runs on: the model, the device figures, the kernel factors and the engine."""

    model: ModelShape
    device: DeviceSpec
    efficiency: Efficiency
    engine: EngineModel


@dataclass(frozen=True)
class Point:
    run: RealRun
    server: Server
    settings: ReplaySettings
    traced: bool
    cache: str | None


def run_seed(run: RealRun, seed: int) -> int:
    """Each run its own stream, the same whichever runs are replayed with it."""
    return (zlib.crc32(run.name.encode()) + seed) % 2**31


def cache_key(point: Point) -> str:
    fields = {"run": dataclasses.asdict(point.run), "model": dataclasses.asdict(point.server.model),
              "device": dataclasses.asdict(point.server.device),
              "efficiency": dataclasses.asdict(point.server.efficiency),
              "engine": dataclasses.asdict(point.server.engine), "settings": dataclasses.asdict(point.settings),
              "traced": point.traced, "version": CACHE_VERSION}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:24]


def simulate(point: Point):
    """One replay: its figures (and with `traced`, its RunTrace), from the cache when there."""
    path = Path(point.cache) / f"{cache_key(point)}.pkl" if point.cache else None
    if path is not None and path.is_file():
        with open(path, "rb") as f:
            return pickle.load(f)
    s, run = point.server, point.run
    settings = dataclasses.replace(point.settings, seed=run_seed(run, point.settings.seed))
    cpu = time.process_time()
    if point.traced:
        metrics, replica, requests = replay(run, s.model, s.device, s.efficiency, s.engine, settings, traced=True)
        result = RunTrace.build(replica, requests, metrics, s.device, s.engine, s.efficiency, s.model.layers,
                                len(replica.executor.inner.lora.target_modules), replica.plan.slots, settings.seed)
    else:
        result = replay(run, s.model, s.device, s.efficiency, s.engine, settings)
    (result.metrics if point.traced else result)["cpu_seconds"] = time.process_time() - cpu
    if path is not None:
        write_text_atomic(path, pickle.dumps(result))
    return result


# Replays simulated and found in the cache by this process so far (calibrate reports them)
TALLY = {"simulated": 0, "cached": 0}


def simulate_runs(runs: list[RealRun], server: Server, settings: ReplaySettings | list[ReplaySettings], backend: Backend,
                  cache: Path | None, traced: bool = False, desc: str = "replays", progress: bool = True) -> list:
    """Replay every run on `server` (with `settings`, or each run with its own); results in the
    order of `runs`."""
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    each = settings if isinstance(settings, list) else [settings] * len(runs)
    points = [Point(run, server, s, traced, None if cache is None else str(cache)) for run, s in zip(runs, each)]
    cached = sum(cache is not None and (cache / f"{cache_key(p)}.pkl").is_file() for p in points)
    TALLY["cached"] += cached
    TALLY["simulated"] += len(points) - cached
    results: list = [None] * len(points)
    index = {id(p): i for i, p in enumerate(points)}
    with tqdm(total=len(points), desc=desc, unit="run", disable=not progress or None) as bar:
        for point, result in backend.map_unordered(simulate, points):
            results[index[id(point)]] = result
            bar.update(1)
    return results
