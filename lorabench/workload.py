"""Workloads: a TOML file -> a frozen `Workload` -> a request stream (arrival, adapter, lengths).

A workload file has top-level fields and four tables (any field may be omitted to take its default):

    name = "zipf"
    n_loras = 1024          # adapters 0 .. n_loras-1
    requests = 2000         # how many requests (the stream also stops at `duration`, if given)
    duration = 600.0        # optional: no arrivals after this many seconds
    seed = 0
    [arrival]    kind = "poisson" | "gamma" | "constant" | "offline" | "trace"; rate (req/s); burstiness
    [popularity] kind = "zipf" | "uniform" | "slora-power" | "trace"; alpha; shuffle (zipf: hot ids by seed)
    [prompt], [output]  kind = "fixed" | "uniform" | "lognormal" | "trace"; value; lo, hi; median, sigma, min, max
    [adapters]   ranks = [16] or [8, 16, 32, 64] (a mix, drawn per adapter); target_modules;
                 compressed_rank (R, default 64); clusters (K, default grows with n_loras)
    [trace]      path = "trace.csv" (relative to the TOML file): a request trace in lorabench's CSV
                 (arrival_s, adapter, prompt_tokens, output_tokens), Azure's, BurstGPT's or Mooncake's
                 format (lorabench/traces.py), read by every part whose kind is "trace";
                 time_scale (1.0; 0.5 replays twice as fast), window = [start, end] (seconds of the
                 trace's clock), adapter_column (adapters from this column, for [popularity] kind
                 "trace"), skip_empty (drop rows with 0 prompt or output tokens)

Everything random comes from one seed: the same workload and seed give the same requests.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lorabench.errors import LorabenchError
from lorabench.presets import ALL_LINEAR, DEFAULT_TARGET_MODULES

if TYPE_CHECKING:  # traces.py imports pandas, which only a trace replay needs
    from lorabench.traces import TraceRows

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ARRIVAL_KINDS = ("poisson", "gamma", "constant", "offline", "trace")
POPULARITY_KINDS = ("zipf", "uniform", "slora-power", "trace")
LENGTH_KINDS = ("fixed", "uniform", "lognormal", "trace")


def default_clusters(n_loras: int) -> int:
    """Clusters K for joint compression when the file does not say.

    "Compress then Serve" fits one shared basis well up to a few hundred adapters and adds clusters
    past that; we take one cluster per 128 adapters (1 up to 128, 8 at 1,024).
    """
    return max(1, math.ceil(n_loras / 128))


@dataclass(frozen=True)
class Arrival:
    kind: str = "poisson"
    rate: float = 10.0  # requests per second (poisson, gamma, constant)
    burstiness: float = 1.0  # gamma shape: 1 = Poisson, < 1 burstier


@dataclass(frozen=True)
class Popularity:
    kind: str = "zipf"
    alpha: float = 1.0  # zipf exponent; slora-power: numpy's power-distribution parameter (1 = uniform)
    shuffle: bool = True  # zipf: which adapter ids are hot is a seeded permutation


@dataclass(frozen=True)
class Lengths:
    kind: str = "fixed"
    value: int = 128  # fixed
    lo: int = 8  # uniform: integers in [lo, hi)
    hi: int = 512
    median: float = 128.0  # lognormal: median and log-space sigma, then clipped to [min, max]
    sigma: float = 1.0
    min: int = 1
    max: int = 4096


@dataclass(frozen=True)
class Adapters:
    ranks: tuple[int, ...] = (16,)  # one rank for all, or a mix each adapter draws from uniformly
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    compressed_rank: int = 64  # R of the shared bases U, V
    clusters: int = 0  # K; 0 = default_clusters(n_loras)


@dataclass(frozen=True)
class Trace:
    """[trace]: the file to replay and how (lorabench/traces.py says exactly how times are mapped)."""

    path: str
    time_scale: float = 1.0  # replay seconds per trace second: 0.5 replays twice as fast
    window: tuple[float, float] | None = None  # [start, end) in the trace's own seconds
    adapter_column: str | None = None  # take adapters from this column (default: the format's own, if any)
    skip_empty: bool = False  # drop rows with 0 prompt or 0 output tokens

    def load(self) -> TraceRows:
        from lorabench.traces import load_trace

        return load_trace(self.path, self.time_scale, self.window, self.adapter_column, self.skip_empty)


@dataclass(frozen=True)
class Requests:
    """A request stream as parallel arrays, sorted by arrival time; ids are 0 .. n-1 in that order."""

    arrival_s: np.ndarray  # float64
    adapter: np.ndarray  # int64, 0 .. n_loras-1
    prompt_tokens: np.ndarray  # int64, >= 1
    output_tokens: np.ndarray  # int64, >= 1

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def id(self) -> np.ndarray:
        return np.arange(len(self))

    @classmethod
    def empty(cls) -> "Requests":
        return cls(np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))


@dataclass(frozen=True)
class Workload:
    """A resolved workload: every field has its value (file defaults and overrides applied)."""

    name: str
    n_loras: int = 1024
    requests: int = 1000
    duration: float | None = None
    seed: int = 0
    arrival: Arrival = field(default_factory=Arrival)
    popularity: Popularity = field(default_factory=Popularity)
    prompt: Lengths = field(default_factory=Lengths)
    output: Lengths = field(default_factory=Lengths)
    adapters: Adapters = field(default_factory=Adapters)
    trace: Trace | None = None  # the trace to replay (its path resolved)
    source: str = "<built-in>"  # the file it came from, for error messages

    def __post_init__(self) -> None:
        _validate(self)
        if self.adapters.clusters == 0:
            object.__setattr__(
                self, "adapters", dataclasses.replace(self.adapters, clusters=default_clusters(self.n_loras))
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def adapter_ranks(self) -> np.ndarray:
        """Rank of every adapter (int64, n_loras): drawn uniformly from `adapters.ranks`, seeded."""
        ranks = np.asarray(self.adapters.ranks, dtype=np.int64)
        if len(ranks) == 1:
            return np.full(self.n_loras, ranks[0], dtype=np.int64)
        return np.random.default_rng([self.seed, 1]).choice(ranks, size=self.n_loras)

    def adapter_clusters(self) -> np.ndarray:
        """Cluster of every adapter for the compressed strategy: a seeded, balanced assignment."""
        k = self.adapters.clusters
        return np.random.default_rng([self.seed, 2]).permutation(np.arange(self.n_loras) % k)

    def generate(self) -> Requests:
        """The request stream. Independent seeded streams per part, so changing one part (say the
        rate) leaves the adapters and lengths of the requests unchanged."""
        trace = None
        if self.trace is not None:
            if not Path(self.trace.path).is_file():
                raise LorabenchError(f"{self.source}: [trace] path: no such file {self.trace.path}")
            trace = self.trace.load()
        n = self.requests if trace is None else min(self.requests, len(trace))
        seeds = [np.random.default_rng([self.seed, 10 + i]) for i in range(4)]
        arrival = _arrivals(self, n, seeds[0], trace)
        if self.duration is not None:
            n = int(np.searchsorted(arrival, self.duration, side="right"))
            arrival = arrival[:n]
        return Requests(
            arrival_s=arrival,
            adapter=_popularity(self, n, seeds[1], trace),
            prompt_tokens=_lengths(self.prompt, n, seeds[2], trace, "prompt_tokens", self),
            output_tokens=_lengths(self.output, n, seeds[3], trace, "output_tokens", self),
        )


# --- generation -------------------------------------------------------------------------------


def _arrivals(w: Workload, n: int, rng: np.random.Generator, trace: TraceRows | None) -> np.ndarray:
    a = w.arrival
    if a.kind == "trace":
        return trace.arrival_s[:n].astype(np.float64)
    if a.kind == "offline":
        return np.zeros(n)
    if a.kind == "constant":
        gaps = np.full(n, 1.0 / a.rate)
    elif a.kind == "poisson":
        gaps = rng.exponential(1.0 / a.rate, size=n)
    else:  # gamma: shape k, mean 1/rate, coefficient of variation 1/sqrt(k)
        gaps = rng.gamma(a.burstiness, 1.0 / (a.rate * a.burstiness), size=n)
    return np.cumsum(gaps)


def zipf_probabilities(n_loras: int, alpha: float) -> np.ndarray:
    """P(rank k) proportional to 1 / k^alpha, k = 1 .. n_loras (rank 1 the most popular)."""
    weights = np.arange(1, n_loras + 1, dtype=np.float64) ** -alpha
    return weights / weights.sum()


def _popularity(w: Workload, n: int, rng: np.random.Generator, trace: TraceRows | None) -> np.ndarray:
    p = w.popularity
    if p.kind == "trace":
        if trace.adapter is None:
            raise LorabenchError(
                f"{w.source}: [popularity] kind \"trace\" needs adapters, and {trace.path} ({trace.format} format) "
                "names none: draw them by popularity ([popularity] kind zipf, uniform or slora-power) or name a "
                "column with [trace] adapter_column"
            )
        adapters = trace.adapter[:n]
        outside = np.flatnonzero(adapters >= w.n_loras)
        if outside.size:
            i = outside[np.argmin(trace.row[outside])]
            raise LorabenchError(f"{trace.where(i)}: adapter {adapters[i]} is outside 0..{w.n_loras - 1} "
                                 f"(n_loras = {w.n_loras})")
        return adapters
    if p.kind == "uniform":
        return rng.integers(0, w.n_loras, size=n)
    if p.kind == "slora-power":
        # S-LoRA's benchmark draws x ~ numpy power(alpha) in [0, 1) and takes adapter floor(x * N):
        # density alpha x^(alpha-1), so alpha = 1 is uniform and alpha < 1 favours low ids.
        return np.minimum((rng.power(p.alpha, size=n) * w.n_loras).astype(np.int64), w.n_loras - 1)
    ranks = rng.choice(w.n_loras, size=n, p=zipf_probabilities(w.n_loras, p.alpha))
    if not p.shuffle:
        return ranks
    hot_ids = np.random.default_rng([w.seed, 3]).permutation(w.n_loras)
    return hot_ids[ranks]


def _lengths(spec: Lengths, n: int, rng, trace: TraceRows | None, column: str, w: Workload) -> np.ndarray:
    if spec.kind == "trace":
        out = getattr(trace, column)[:n]
        empty = np.flatnonzero(out < 1)
        if empty.size:
            i = empty[np.argmin(trace.row[empty])]
            raise LorabenchError(f"{trace.where(i)}: 0 {column.replace('_', ' ')}; a request needs at least 1 "
                                 "(set [trace] skip_empty = true to drop such rows)")
        return out
    if spec.kind == "fixed":
        return np.full(n, spec.value, dtype=np.int64)
    if spec.kind == "uniform":
        return rng.integers(spec.lo, spec.hi, size=n)
    draws = spec.median * np.exp(spec.sigma * rng.standard_normal(n))
    return np.clip(np.rint(draws), spec.min, spec.max).astype(np.int64)


# --- loading and validation -------------------------------------------------------------------

_TABLES = {"arrival": Arrival, "popularity": Popularity, "prompt": Lengths, "output": Lengths, "adapters": Adapters}
_TOP = {"name", "description", "n_loras", "requests", "duration", "seed", "trace"}


def builtin_workloads() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("lorabench.workloads").iterdir() if p.name.endswith(".toml"))


def workload_path(name_or_path: str) -> Path:
    """A shipped workload by name (`zipf`) or any TOML file by path."""
    if name_or_path.endswith(".toml") or "/" in name_or_path or Path(name_or_path).is_file():
        path = Path(name_or_path)
        if not path.is_file():
            raise LorabenchError(f"workload file {name_or_path} does not exist")
        return path
    shipped = resources.files("lorabench.workloads") / f"{name_or_path}.toml"
    if not shipped.is_file():
        raise LorabenchError(
            f"unknown workload {name_or_path!r}; choose one of {', '.join(builtin_workloads())} or give a .toml path"
        )
    return Path(str(shipped))


def load_workload(name_or_path: str, **overrides) -> Workload:
    """Read a workload and apply command-line overrides.

    Overrides (None = keep the file's value): n_loras, requests, duration, seed (top level),
    rate (arrival), alpha (popularity), ranks (adapters, a tuple), time_scale and trace_window
    ([trace] time_scale and window).
    """
    path = workload_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise LorabenchError(f"{path}: malformed TOML: {err}") from None
    return workload_from_dict(data, source=str(path), **overrides)


def workload_from_dict(data: dict, source: str = "<dict>", **overrides) -> Workload:
    for key, value in data.items():
        if key not in _TOP and key not in _TABLES:
            raise LorabenchError(f"{source}: unknown field {key!r}; expected {', '.join(sorted(_TOP | set(_TABLES)))}")
        if key in _TABLES and not isinstance(value, dict):
            raise LorabenchError(f"{source}: [{key}] must be a table")
    tables = {name: _table(cls, data.get(name, {}), name, source) for name, cls in _TABLES.items()}
    top = {k: data[k] for k in ("n_loras", "requests", "duration", "seed") if k in data}
    for key in ("n_loras", "requests", "seed"):
        if key in top and not _is_int(top[key]):
            raise LorabenchError(f"{source}: field {key} must be an integer, got {top[key]!r}")
    if "duration" in top and not _is_number(top["duration"]):
        raise LorabenchError(f"{source}: field duration must be a number of seconds, got {top['duration']!r}")

    for key in ("n_loras", "requests", "duration", "seed"):
        if overrides.get(key) is not None:
            top[key] = overrides[key]
    if overrides.get("rate") is not None:
        tables["arrival"] = dataclasses.replace(tables["arrival"], rate=float(overrides["rate"]))
    if overrides.get("alpha") is not None:
        tables["popularity"] = dataclasses.replace(tables["popularity"], alpha=float(overrides["alpha"]))
    if overrides.get("ranks") is not None:
        tables["adapters"] = dataclasses.replace(tables["adapters"], ranks=tuple(overrides["ranks"]))
    unknown = set(overrides) - {"n_loras", "requests", "duration", "seed", "rate", "alpha", "ranks", "time_scale",
                                "trace_window"}
    if unknown:
        raise TypeError(f"unknown workload override(s): {', '.join(sorted(unknown))}")
    trace = _trace(data.get("trace"), source, overrides.get("time_scale"), overrides.get("trace_window"))
    return Workload(name=str(data.get("name", Path(source).stem)), trace=trace, source=source, **top, **tables)


def _trace(values, source: str, time_scale: float | None, window: tuple[float, float] | None) -> Trace | None:
    """[trace] with its path resolved against the TOML file, and the command line's time scale and window."""
    if values is None:
        if time_scale is not None or window is not None:
            raise LorabenchError(f"{source}: time_scale and trace_window (--time-scale, --trace-window) apply to a "
                                 "trace replay, and this workload has no [trace]")
        return None
    if not isinstance(values, dict) or not isinstance(values.get("path"), str):
        raise LorabenchError(f"{source}: [trace] must be a table with a string field path")
    fields = {f.name: f for f in dataclasses.fields(Trace)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise LorabenchError(f"{source}: [trace] unknown field(s) {', '.join(unknown)}; expected {', '.join(fields)}")
    path = Path(values["path"])
    if not path.is_absolute() and source not in ("<dict>", "<built-in>"):
        path = Path(source).parent / path
    scale = values.get("time_scale", 1.0) if time_scale is None else time_scale
    if not _is_number(scale) or not (0 < scale < math.inf):
        raise LorabenchError(f"{source}: [trace] time_scale must be a number > 0, got {scale!r}")
    if window is None and "window" in values:
        window = values["window"]
        if (not isinstance(window, list) or len(window) != 2 or not all(_is_number(v) for v in window)):
            raise LorabenchError(f"{source}: [trace] window must be [start, end] in seconds, got {window!r}")
    if window is not None:
        window = (float(window[0]), float(window[1]))
        if not 0 <= window[0] < window[1]:
            raise LorabenchError(f"{source}: [trace] window must satisfy 0 <= start < end, got {list(window)}")
    column = values.get("adapter_column")
    if column is not None and not isinstance(column, str):
        raise LorabenchError(f"{source}: [trace] adapter_column must be a column name, got {column!r}")
    skip = values.get("skip_empty", False)
    if not isinstance(skip, bool):
        raise LorabenchError(f"{source}: [trace] skip_empty must be true or false, got {skip!r}")
    return Trace(str(path), float(scale), window, column, skip)


def _table(cls, values: dict, table: str, source: str):
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise LorabenchError(f"{source}: [{table}] unknown field {key!r}; expected {', '.join(names)}")
        default = names[key].default
        if isinstance(default, tuple):
            if not isinstance(value, list) or not value:
                raise LorabenchError(f"{source}: [{table}] {key} must be a non-empty list")
            value = tuple(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise LorabenchError(f"{source}: [{table}] {key} must be true or false, got {value!r}")
        elif isinstance(default, int) and not _is_int(value):
            raise LorabenchError(f"{source}: [{table}] {key} must be an integer, got {value!r}")
        elif isinstance(default, float) and not _is_number(value):
            raise LorabenchError(f"{source}: [{table}] {key} must be a number, got {value!r}")
        elif isinstance(default, str) and not isinstance(value, str):
            raise LorabenchError(f"{source}: [{table}] {key} must be a string, got {value!r}")
        kwargs[key] = float(value) if isinstance(default, float) else value
    return cls(**kwargs)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _validate(w: Workload) -> None:
    src = w.source

    def bad(where: str, msg: str):
        raise LorabenchError(f"{src}: {where} {msg}")

    if w.n_loras < 1:
        bad("n_loras", f"must be >= 1, got {w.n_loras}")
    if w.requests < 1:
        bad("requests", f"must be >= 1, got {w.requests}")
    if w.duration is not None and not w.duration > 0:
        bad("duration", f"must be > 0 seconds, got {w.duration}")
    if w.seed < 0:
        bad("seed", f"must be an integer >= 0, got {w.seed}")
    a, p, ad = w.arrival, w.popularity, w.adapters
    if a.kind not in ARRIVAL_KINDS:
        bad("[arrival] kind", f"{a.kind!r} is unknown; expected one of {', '.join(ARRIVAL_KINDS)}")
    if a.kind in ("poisson", "gamma", "constant") and not (a.rate > 0 and math.isfinite(a.rate)):
        bad("[arrival] rate", f"must be a positive number of requests per second, got {a.rate}")
    if a.kind == "gamma" and not a.burstiness > 0:
        bad("[arrival] burstiness", f"must be > 0 (1 = Poisson, < 1 burstier), got {a.burstiness}")
    if p.kind not in POPULARITY_KINDS:
        bad("[popularity] kind", f"{p.kind!r} is unknown; expected one of {', '.join(POPULARITY_KINDS)}")
    if p.kind == "zipf" and not p.alpha >= 0:
        bad("[popularity] alpha", f"must be >= 0 for zipf, got {p.alpha}")
    if p.kind == "slora-power" and not p.alpha > 0:
        bad("[popularity] alpha", f"must be > 0 for slora-power, got {p.alpha}")
    for table, spec in (("prompt", w.prompt), ("output", w.output)):
        if spec.kind not in LENGTH_KINDS:
            bad(f"[{table}] kind", f"{spec.kind!r} is unknown; expected one of {', '.join(LENGTH_KINDS)}")
        if spec.kind == "fixed" and spec.value < 1:
            bad(f"[{table}] value", f"must be >= 1 token, got {spec.value}")
        if spec.kind == "uniform" and not 1 <= spec.lo < spec.hi:
            bad(f"[{table}] lo, hi", f"must satisfy 1 <= lo < hi, got lo {spec.lo}, hi {spec.hi}")
        if spec.kind == "lognormal" and not (spec.median > 0 and spec.sigma >= 0 and 1 <= spec.min <= spec.max):
            bad(f"[{table}]", f"lognormal needs median > 0, sigma >= 0 and 1 <= min <= max, got median "
                              f"{spec.median:g}, sigma {spec.sigma:g}, min {spec.min}, max {spec.max}")
    if any(not _is_int(r) or r < 1 for r in ad.ranks):
        bad("[adapters] ranks", f"must be positive integers, got {list(ad.ranks)}")
    unknown = [m for m in ad.target_modules if m not in ALL_LINEAR]
    if unknown:
        bad("[adapters] target_modules", f"unknown module(s) {unknown}; expected among {', '.join(ALL_LINEAR)}")
    if ad.compressed_rank < 1:
        bad("[adapters] compressed_rank", f"must be >= 1, got {ad.compressed_rank}")
    if ad.clusters < 0 or ad.clusters > w.n_loras:
        bad("[adapters] clusters", f"must be between 1 and n_loras ({w.n_loras}), got {ad.clusters}")
    uses_trace = a.kind == "trace" or p.kind == "trace" or "trace" in (w.prompt.kind, w.output.kind)
    if uses_trace and w.trace is None:
        bad("[trace] path", "is required when a kind is 'trace'")
    if w.trace is not None and w.trace.time_scale != 1.0 and a.kind != "trace":
        bad("[trace] time_scale", f"scales the trace's arrivals, and [arrival] kind is {a.kind!r}, not 'trace'")
