"""The quality study's synthetic language and its families of tasks (seeded, plain numpy).

Tokens are (class, value) pairs: token = 8 * class + value, 64 tokens. The *language* the base model
is pretrained on is a factorized Markov chain: the next token's class follows a class chain and its
value a value chain, each row with three likely successors, plus 10% uniformly random tokens.

A *task* changes the class chain only. Tasks come in groups: group g's rule sends every class c to
sigma_g(c) (a permutation of the classes, the group's shared behaviour), and each task of the
group has its own exceptions: two classes of its own that go to other classes instead
(task-specific behaviour). With probability `rule_prob` the next class follows the task, otherwise
the language's class chain; values always follow the language. So a task's adapter must learn its
group's rule (shared with 11 others) and its own two exceptions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLASSES = VALUES = 8
VOCAB = CLASSES * VALUES


def _chain(rng: np.random.Generator, n: int, successors: int = 3) -> np.ndarray:
    """A row-stochastic n x n matrix, each row with `successors` likely next states."""
    P = np.full((n, n), 0.02)
    for i in range(n):
        P[i, rng.choice(n, successors, replace=False)] += rng.dirichlet(np.ones(successors)) * 2
    return P / P.sum(1, keepdims=True)


@dataclass(frozen=True)
class Language:
    class_chain: np.ndarray  # (8, 8)
    value_chain: np.ndarray  # (8, 8)
    noise: float = 0.1

    @classmethod
    def make(cls, seed: int) -> "Language":
        rng = np.random.default_rng([seed, 0])
        return cls(_chain(rng, CLASSES), _chain(rng, VALUES))


@dataclass(frozen=True)
class Task:
    name: str
    group: int
    class_map: np.ndarray  # (8,) next class of each class when the task's rule applies
    rule_prob: float = 0.85


def make_tasks(seed: int, groups: int, per_group: int, exceptions: int = 2) -> list[Task]:
    """`groups` x `per_group` tasks, named task_GG_TT; group g's tasks share sigma_g."""
    rng = np.random.default_rng([seed, 1])
    tasks = []
    for g in range(groups):
        sigma = rng.permutation(CLASSES)
        for t in range(per_group):
            class_map = sigma.copy()
            for c in rng.choice(CLASSES, exceptions, replace=False):
                class_map[c] = rng.choice([x for x in range(CLASSES) if x != sigma[c]])
            tasks.append(Task(f"task_{g:02d}_{t:02d}", g, class_map))
    return tasks


def sample(language: Language, task: Task | None, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """n sequences (n, length) of token ids from the language, or from a task of it."""
    out = np.empty((n, length), dtype=np.int64)
    cls = rng.integers(CLASSES, size=n)
    val = rng.integers(VALUES, size=n)
    out[:, 0] = cls * VALUES + val
    cum_c, cum_v = language.class_chain.cumsum(1), language.value_chain.cumsum(1)
    for t in range(1, length):
        next_c = (rng.random((n, 1)) > cum_c[cls]).sum(1)
        next_v = (rng.random((n, 1)) > cum_v[val]).sum(1)
        if task is not None:
            follows = rng.random(n) < task.rule_prob
            next_c = np.where(follows, task.class_map[cls], next_c)
        noisy = rng.random(n) < language.noise
        next_c = np.where(noisy, rng.integers(CLASSES, size=n), next_c)
        next_v = np.where(noisy, rng.integers(VALUES, size=n), next_v)
        cls, val = np.minimum(next_c, CLASSES - 1), np.minimum(next_v, VALUES - 1)
        out[:, t] = cls * VALUES + val
    return out
