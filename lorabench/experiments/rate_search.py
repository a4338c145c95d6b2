"""The highest request rate that meets a set of objectives: bracketing, then bisection.

`find_capacity(evaluate, objectives, start)` knows nothing of the simulator: `evaluate(rate)` returns
a mapping of metrics (and optionally a `status`; anything but "ok" fails every objective), and an
`Objective` says which metric must stay at most (`<=`) or at least (`>=`) a limit. The search
assumes what holds at a rate holds at every lower rate (load only makes latency worse):

1. bracketing: from `start`, multiply the rate by `factor` while the objectives hold (or divide
   while they do not) until one rate passes and the next one up fails;
2. bisection: evaluate the geometric mean of the bracket and keep the half that still has a
   passing lower end and a failing upper end, until upper / lower <= 1 + rel_tol.

The answer is the bracket's lower end: a rate that was evaluated and met every objective. With a
bracket of ratio `factor`, bisection takes ceil(log2(ln(factor) / ln(1 + rel_tol))) evaluations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from lorabench.errors import LorabenchError

SENSES = ("<=", ">=")


@dataclass(frozen=True)
class Objective:
    """`metric` must be <= `limit` (sense "<=", e.g. a latency) or >= it (">=", e.g. goodput)."""

    metric: str
    limit: float
    sense: str = "<="

    def __post_init__(self) -> None:
        if self.sense not in SENSES:
            raise LorabenchError(f"objective {self.metric}: sense must be one of {', '.join(SENSES)}, "
                                 f"got {self.sense!r}")

    def holds(self, metrics: Mapping[str, Any]) -> bool:
        """True when the metric is present, a finite number, and within the limit."""
        try:
            value = float(metrics.get(self.metric))
        except (TypeError, ValueError):
            return False
        if not math.isfinite(value):
            return False
        return value <= self.limit if self.sense == "<=" else value >= self.limit

    def __str__(self) -> str:
        return f"{self.metric} {self.sense} {self.limit:g}"


@dataclass(frozen=True)
class Evaluation:
    """One rate tried: its metrics, and what failed there (empty when every objective held)."""

    rate: float
    metrics: Mapping[str, Any]
    failed: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failed


@dataclass(frozen=True)
class CapacityResult:
    """What a search found. `best` is the highest passing evaluation (None: no rate passed), `failing`
    the lowest failing one above it (None: every rate up to max_rate passed)."""

    best: Evaluation | None
    failing: Evaluation | None
    evaluations: tuple[Evaluation, ...]  # in the order they were made
    min_rate: float
    max_rate: float

    @property
    def max_rate_found(self) -> float:
        return self.best.rate if self.best is not None else math.nan

    @property
    def iterations(self) -> int:
        return len(self.evaluations)

    @property
    def bound_by(self) -> str:
        """What stopped the rate from going higher: the failed objectives (or the reason the rate
        could not be served) at the lowest failing rate, or the ceiling when nothing failed up to it."""
        if self.failing is None:
            return f"ceiling {self.max_rate:g} req/s"
        return "; ".join(self.failing.failed)

    @property
    def status(self) -> str:
        if self.best is None:
            return f"no rate down to {self.min_rate:g} req/s meets the objectives"
        return "ok"


def check_failures(metrics: Mapping[str, Any], objectives: tuple[Objective, ...]) -> tuple[str, ...]:
    """What fails at these metrics: the status if the rate could not be served, else the objectives
    that do not hold."""
    status = metrics.get("status", "ok")
    if status != "ok":
        return (f"not served: {status}",)
    return tuple(str(o) for o in objectives if not o.holds(metrics))


def bisection_steps(ratio: float, rel_tol: float) -> int:
    """Evaluations bisection needs to shrink a bracket of `ratio` (upper / lower) to 1 + rel_tol."""
    return max(0, math.ceil(math.log2(math.log(ratio) / math.log1p(rel_tol))))


def find_capacity(
    evaluate: Callable[[float], Mapping[str, Any]],
    objectives: tuple[Objective, ...] | list[Objective],
    start: float,
    rel_tol: float = 0.02,
    factor: float = 2.0,
    min_rate: float | None = None,
    max_rate: float | None = None,
) -> CapacityResult:
    """Search the highest rate in [min_rate, max_rate] (default start / 1024 .. start x 1024) at which
    every objective holds, to a relative tolerance `rel_tol` (see the module doc)."""
    objectives = tuple(objectives)
    min_rate = start / 1024 if min_rate is None else min_rate
    max_rate = start * 1024 if max_rate is None else max_rate
    checks = [
        ("objectives", len(objectives) > 0, "at least one"),
        ("start rate", start > 0 and math.isfinite(start), "> 0 requests per second"),
        ("rate tolerance", 0 < rel_tol < 1, "in (0, 1), a fraction of the rate"),
        ("bracketing factor", factor > 1, "> 1"),
        ("min rate", 0 < min_rate <= start, "> 0 and <= the start rate"),
        ("max rate", max_rate >= start, ">= the start rate"),
    ]
    for name, ok, what in checks:
        if not ok:
            raise LorabenchError(f"capacity search: {name} must be {what}")
    made: list[Evaluation] = []

    def tried(rate: float) -> Evaluation:
        metrics = evaluate(rate)
        made.append(Evaluation(rate, metrics, check_failures(metrics, objectives)))
        return made[-1]

    first = tried(start)
    best, failing = (first, None) if first.passed else (None, first)
    while best is None and failing.rate > min_rate:  # shrink until a rate passes
        e = tried(max(failing.rate / factor, min_rate))
        best, failing = (e, failing) if e.passed else (None, e)
    while failing is None and best.rate < max_rate:  # grow until a rate fails
        e = tried(min(best.rate * factor, max_rate))
        best, failing = (best, e) if not e.passed else (e, None)
    while best is not None and failing is not None and failing.rate > best.rate * (1 + rel_tol):
        e = tried(math.sqrt(best.rate * failing.rate))
        best, failing = (e, failing) if e.passed else (best, e)
    return CapacityResult(best, failing, tuple(made), min_rate, max_rate)
