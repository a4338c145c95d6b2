"""Measured serving runs of a real engine, read into one form: what the server ran with, what the
client offered, and what it measured.

Two inputs:

- a runs CSV in the columns of tests/data/vllm-runs (results/engines/data/README.md): one row per
  run; settings `n_adapters`, `adapter_ranks` (space-separated, assigned round-robin),
  `max_lora_rank`, `max_loras`, `max_num_seqs`, `gpu_memory_utilization`, `adapter_rates` and
  `adapter_rate_counts` (space-separated: so many adapters get each rate), `duration_s`,
  `mean_input_tokens`, `mean_output_tokens`, and optionally `max_cpu_loras`,
  `max_num_batched_tokens` (default 2048); measured columns as `vllm bench serve` names them
  (`output_throughput`, `ttft_median_ms`, ...) plus the server's `mean_num_running`,
  `mean_num_waiting`; any may be missing or empty;
- a `vllm bench serve --save-result` JSON with a TOML of the server settings it ran with beside it
  (the JSON's name with .toml, or settings.toml in its folder): `n_adapters`, `max_loras`,
  `max_lora_rank`, and optionally `adapter_ranks` (a list), `max_num_seqs` (256),
  `max_num_batched_tokens` (2048), `gpu_memory_utilization` (0.9), `max_cpu_loras`. The client
  sent a Poisson stream at the JSON's `request_rate`, each request to an adapter drawn uniformly
  (as `--lora-modules` does); mean lengths come from its token totals.

A bad row or file is one error naming the file, the row (CSV line) and the field.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorabench.errors import LorabenchError
from lorabench.outputs.compare import read_result
from lorabench.outputs.results import read_table

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# What validate predicts and compares, in `vllm bench serve`'s names (and the server's metric).
METRICS = ("output_throughput", "request_throughput", "ttft_mean_ms", "ttft_median_ms", "tpot_mean_ms",
           "tpot_median_ms", "tpot_p99_ms", "mean_num_running")
# Measured columns read besides METRICS: saturation needs the first two, calibrate's memory fit the last
EXTRA = ("successful_requests", "mean_num_waiting", "mean_kv_usage")
SETTINGS = ("n_adapters", "adapter_ranks", "max_lora_rank", "max_loras", "max_num_seqs", "gpu_memory_utilization",
            "adapter_rates", "adapter_rate_counts", "duration_s", "mean_input_tokens", "mean_output_tokens")
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048  # what the shipped runs' servers logged (V1's default for online serving)


@dataclass(frozen=True)
class RealRun:
    """One measured run: the server's settings, the offered load, and the measurements."""

    name: str
    n_adapters: int
    adapter_ranks: tuple[int, ...]  # ranks given to adapters 0, 1, 2, ... round-robin
    max_lora_rank: int
    max_loras: int
    max_num_seqs: int
    max_num_batched_tokens: int
    gpu_memory_utilization: float
    adapter_rates: tuple[float, ...]  # requests/s of each adapter (length n_adapters)
    duration_s: float
    mean_input_tokens: float
    mean_output_tokens: float
    max_cpu_loras: int | None = None
    measured: dict = field(default_factory=dict)  # METRICS and EXTRA that were measured (finite)

    @property
    def offered_rate(self) -> float:
        return float(sum(self.adapter_rates))

    def ranks(self) -> np.ndarray:
        """Rank of every adapter."""
        return np.array([self.adapter_ranks[i % len(self.adapter_ranks)] for i in range(self.n_adapters)],
                        dtype=np.int64)


def is_saturated(completed: float, offered_rate: float, duration_s: float, mean_waiting: float) -> bool:
    """Saturated: it completed clearly fewer requests than offered (under 95%), or its waiting queue
    held over a minute of arrivals on average (it kept growing)."""
    offered = offered_rate * duration_s
    late = completed < 0.95 * offered
    queued = math.isfinite(mean_waiting) and mean_waiting > 60.0 * offered_rate
    return bool(late or queued)


def saturated(run: RealRun) -> bool | None:
    """Whether the measured run was saturated (None when it lacks the completed count)."""
    m = run.measured
    completed = m.get("successful_requests", m.get("request_throughput", math.nan) * run.duration_s)
    if not math.isfinite(completed):
        return None
    return is_saturated(completed, run.offered_rate, run.duration_s, m.get("mean_num_waiting", math.nan))


# --- the runs CSV -------------------------------------------------------------------------------

def _numbers(text, kind, where: str) -> tuple:
    try:
        values = tuple(kind(x) for x in str(text).split())
    except ValueError:
        raise LorabenchError(f"{where}: expected space-separated {kind.__name__}s, got {text!r}") from None
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise LorabenchError(f"{where}: expected positive {kind.__name__}s, got {text!r}")
    return values


def _positive(row, column: str, kind, where: str, default=None):
    value = row.get(column, default)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        if default is not None:
            return default
        raise LorabenchError(f"{where}: {column} is empty")
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise LorabenchError(f"{where}: {column} must be a positive {kind.__name__}, got {value!r}") from None
    if not math.isfinite(number) or number <= 0 or (kind is int and number != float(value)):
        raise LorabenchError(f"{where}: {column} must be a positive {kind.__name__}, got {value!r}")
    return number


def _measured(row, where: str) -> dict:
    out = {}
    for column in (*METRICS, *EXTRA):
        value = row.get(column)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise LorabenchError(f"{where}: {column} must be a number, got {value!r}") from None
        if not math.isfinite(number) or number < 0:
            raise LorabenchError(f"{where}: {column} must be a non-negative number, got {value!r}")
        out[column] = number
    return out


def read_runs_csv(path: str | Path) -> list[RealRun]:
    path = Path(path)
    frame = read_table(path, SETTINGS, "runs file", dtype=str, keep_default_na=False)
    frame = frame.replace("", np.nan)
    runs = []
    for i, row in enumerate(frame.to_dict("records")):
        where = f"runs file {path}, line {i + 2}"  # line 1 is the header
        n = _positive(row, "n_adapters", int, where)
        rates = _numbers(row["adapter_rates"], float, f"{where}: adapter_rates")
        counts = _numbers(row["adapter_rate_counts"], int, f"{where}: adapter_rate_counts")
        if len(rates) != len(counts) or sum(counts) != n:
            raise LorabenchError(f"{where}: adapter_rate_counts {row['adapter_rate_counts']!r} must give one count "
                                 f"per rate of adapter_rates {row['adapter_rates']!r}, adding up to n_adapters {n}")
        ranks = _numbers(row["adapter_ranks"], int, f"{where}: adapter_ranks")
        max_rank = _positive(row, "max_lora_rank", int, where)
        if max(ranks) > max_rank:
            raise LorabenchError(f"{where}: adapter_ranks {row['adapter_ranks']!r} exceed max_lora_rank {max_rank}")
        utilization = _positive(row, "gpu_memory_utilization", float, where)
        if utilization > 1:
            raise LorabenchError(f"{where}: gpu_memory_utilization must be in (0, 1], got {utilization}")
        runs.append(RealRun(
            name=str(row.get("source") or f"{path.name}:{i + 2}"), n_adapters=n, adapter_ranks=ranks,
            max_lora_rank=max_rank, max_loras=_positive(row, "max_loras", int, where),
            max_num_seqs=_positive(row, "max_num_seqs", int, where),
            max_num_batched_tokens=_positive(row, "max_num_batched_tokens", int, where, DEFAULT_MAX_NUM_BATCHED_TOKENS),
            gpu_memory_utilization=utilization, adapter_rates=_rates_of(rates, counts),
            duration_s=_positive(row, "duration_s", float, where),
            mean_input_tokens=_positive(row, "mean_input_tokens", float, where),
            mean_output_tokens=_positive(row, "mean_output_tokens", float, where),
            max_cpu_loras=_positive(row, "max_cpu_loras", int, where, n), measured=_measured(row, where),
        ))
    return runs


def _rates_of(rates: tuple[float, ...], counts: tuple[int, ...]) -> tuple[float, ...]:
    """Per adapter: the rates dealt round-robin, highest first, while each has adapters left (the
    shipped runs' launcher cycles through its rate list; counts say how many got each)."""
    left = dict(zip(rates, counts))
    order = sorted(left, reverse=True)
    out = []
    while len(out) < sum(counts):
        for rate in order:
            if left[rate]:
                out.append(rate)
                left[rate] -= 1
    return tuple(out)


# --- vllm bench serve JSON + settings TOML ------------------------------------------------------

def settings_toml(json_path: Path) -> Path:
    for candidate in (json_path.with_suffix(".toml"), json_path.parent / "settings.toml"):
        if candidate.is_file():
            return candidate
    raise LorabenchError(f"{json_path}: no server settings beside it; write {json_path.with_suffix('.toml').name} "
                         "(or settings.toml) with n_adapters, max_loras, max_lora_rank and the other settings the "
                         "server ran with (lorabench/fidelity/real_runs.py lists them)")


def read_bench_run(path: str | Path) -> RealRun:
    path = Path(path)
    result = read_result(path)
    toml_path = settings_toml(path)
    try:
        settings = tomllib.loads(toml_path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise LorabenchError(f"settings {toml_path}: not readable TOML ({err})") from None
    where = f"settings {toml_path}"
    known = {"n_adapters", "adapter_ranks", "max_lora_rank", "max_loras", "max_num_seqs", "max_num_batched_tokens",
             "gpu_memory_utilization", "max_cpu_loras"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise LorabenchError(f"{where}: unknown field(s) {', '.join(unknown)}; expected among {', '.join(sorted(known))}")
    n = _positive(settings, "n_adapters", int, where)
    max_rank = _positive(settings, "max_lora_rank", int, where)
    ranks = settings.get("adapter_ranks", [max_rank])
    if not isinstance(ranks, list) or not ranks or any(isinstance(r, bool) or not isinstance(r, int) or not 0 < r <= max_rank
                                                       for r in ranks):
        raise LorabenchError(f"{where}: adapter_ranks must be a list of ranks up to max_lora_rank {max_rank}, got {ranks!r}")
    rate = result.get("request_rate")
    if isinstance(rate, str) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
        raise LorabenchError(f"{path}: request_rate {rate!r}: lorabench replays Poisson arrivals at a finite rate")
    completed = result["completed"]
    measured = {"output_throughput": result["output_throughput"], "request_throughput": result["request_throughput"],
                "successful_requests": completed}
    for stat in ("mean", "median"):
        measured[f"ttft_{stat}_ms"] = result[f"{stat}_ttft_ms"]
    for stat in ("mean", "median", "p99"):
        measured[f"tpot_{stat}_ms"] = result[f"{stat}_tpot_ms"]
    return RealRun(
        name=str(path), n_adapters=n, adapter_ranks=tuple(ranks), max_lora_rank=max_rank,
        max_loras=_positive(settings, "max_loras", int, where), max_num_seqs=_positive(settings, "max_num_seqs", int, where, 256),
        max_num_batched_tokens=_positive(settings, "max_num_batched_tokens", int, where, DEFAULT_MAX_NUM_BATCHED_TOKENS),
        gpu_memory_utilization=_positive(settings, "gpu_memory_utilization", float, where, 0.9),
        adapter_rates=tuple([rate / n] * n), duration_s=float(result["duration"]),
        mean_input_tokens=result["total_input_tokens"] / completed,
        mean_output_tokens=result["total_output_tokens"] / completed,
        max_cpu_loras=_positive(settings, "max_cpu_loras", int, where, n), measured=measured,
    )


def read_real(paths) -> list[RealRun]:
    """Runs from CSV files and `vllm bench serve` JSON files (each with its settings TOML)."""
    runs: list[RealRun] = []
    for p in map(Path, paths):
        if p.suffix == ".csv":
            runs += read_runs_csv(p)
        elif p.suffix == ".json":
            runs.append(read_bench_run(p))
        else:
            raise LorabenchError(f"--real {p}: expected a runs .csv or a vllm bench serve .json")
    return runs
