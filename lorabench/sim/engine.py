"""The SimPy replica: one GPU serving a request stream with continuous batching.

One process loops over batch iterations: take arrivals, admit (scheduler.py), charge synchronous
adapter loads, run the step (its duration from the executor), apply it. Prefetched loads are SimPy
timeouts on the host->GPU link (copies serialize on it) that wake the replica when it idles.

Events are per batch, never per token: a run of decode-only iterations in which no request
finishes, no request arrives and no load lands is one SimPy event and one step record
(`iterations` > 1). Each iteration still has its own duration, with the context grown by one: an
executor that can (`repeat_decode`, the modeled one) gives them all in one call, others are asked
once per iteration.
"""

from __future__ import annotations

import dataclasses
from array import array
from dataclasses import dataclass

import numpy as np
import simpy

from lorabench.sim.executor import Executor, Step
from lorabench.sim.memory import AdapterCache, KVCache, MemoryPlan, Pool
from lorabench.sim.scheduler import Scheduler, SchedulerConfig
from lorabench.sim.scheduler_v1 import SchedulerV1
from lorabench.strategies import Strategy
from lorabench.workload import Requests

STEP_FIELDS = ("start_s", "duration_s", "batch_size", "tokens", "prefill_tokens", "distinct_adapters",
               "memory_gib", "iterations")
FLOAT_STEP_FIELDS = ("start_s", "duration_s", "memory_gib")


class SimulationStuck(RuntimeError):
    """No request can ever be admitted (e.g. one needs more KV cache than the whole budget)."""


@dataclass
class RunResult:
    """Everything one strategy's run produced; `metrics.summarize` turns it into a summary row."""

    strategy: str
    requests: Requests  # as served (the single strategy's adapters are all 0)
    first_token_s: np.ndarray
    finish_s: np.ndarray
    steps: dict[str, np.ndarray]
    plan: MemoryPlan
    adapter_loads: int = 0
    adapter_load_bytes: int = 0
    load_stall_s: float = 0.0
    adapter_hit_rate: float = float("nan")
    peak_kv_bytes: int = 0
    peak_adapter_bytes: int = 0  # resident adapters + shared bases
    peak_total_bytes: int = 0  # weights + KV + adapters
    kv_capacity_bytes: int = 0
    preemptions: int = 0
    device: str | None = None  # where the steps ran, when the executor says (measured: device and mode)
    # A cluster of replicas (sim/cluster.py): each request's replica (steps have a "replica" column too),
    # the router, and one row of figures per replica.
    replica: np.ndarray | None = None
    router: str | None = None
    replica_stats: list[dict] | None = None


class Replica:
    """One GPU. Alone (the default) it serves `requests` in its own SimPy environment; behind a
    router (sim/cluster.py) it shares the cluster's `env`, starts with no requests and is given them
    as they arrive (`receive`, up to `capacity`, then `close`)."""

    def __init__(self, requests: Requests, strategy: Strategy, plan: MemoryPlan, executor: Executor,
                 config: SchedulerConfig, kv_bytes_per_token: int, host_slots: int | None = None,
                 storage_bandwidth: float = 2e9, progress=None, eviction: str = "lru", pinned: tuple[int, ...] = (),
                 env: simpy.Environment | None = None, capacity: int | None = None):
        self.env = env or simpy.Environment()
        self.strategy, self.plan, self.executor = strategy, plan, executor
        self.storage_bandwidth = storage_bandwidth
        self.progress = progress
        n_loras = len(strategy.adapter_bytes)
        adapters = np.zeros(len(requests), dtype=np.int64) if strategy.name == "single" else requests.adapter
        self.requests = Requests(requests.arrival_s, adapters, requests.prompt_tokens, requests.output_tokens)
        self.in_use = np.zeros(n_loras, dtype=np.int64)
        if strategy.shared_pool:
            adapter_pool = kv_pool = Pool(plan.adapter_capacity)
        else:
            adapter_pool, kv_pool = Pool(plan.adapter_capacity), Pool(plan.kv_capacity)
        preloaded = range(plan.slots) if plan.preload else ()
        self.cache = AdapterCache(adapter_pool, strategy, self.in_use, host_slots, preloaded, eviction, pinned)
        self.kv = KVCache(kv_pool, config.block_size, kv_bytes_per_token, self.cache if strategy.shared_pool else None)
        config = dataclasses.replace(config, max_distinct=plan.max_distinct, prefetch=strategy.prefetch)
        self.cfg = config
        scheduler = SchedulerV1 if config.vllm_v1 else Scheduler
        self.sched = scheduler(self.requests, adapters, config, self.cache, self.kv, self.in_use, strategy.name,
                               capacity)
        if hasattr(executor, "bind_scheduler"):  # an engine's host time depends on the scheduler's work
            executor.bind_scheduler(self.sched)
        self.routed: list[int] = []  # behind a router: the cluster's id of each request received, in order
        self.next_routed_s = None  # behind a router: when the cluster's next request arrives (a function)
        self.link_free_s = 0.0  # when the host->GPU link finishes its queued copies
        self.inflight = 0
        self.wake: simpy.Event | None = None
        self.loads = 0
        self.load_bytes = 0
        self.load_stall_s = 0.0
        self.peak_kv = self.peak_adapters = self.peak_total = 0
        # Step records, one typed array per field (8 bytes a value, not a Python object each)
        self.rows = {f: array("d" if f in FLOAT_STEP_FIELDS else "q") for f in STEP_FIELDS}

    # --- loads ----------------------------------------------------------------------------

    def _copy_time(self, a: int) -> float:
        nbytes = int(self.strategy.load_bytes[a])
        self.loads += 1
        self.load_bytes += nbytes
        t = self.executor.load(nbytes, self.strategy.copies_per_load)
        if self.cache.host_miss(a):
            t += nbytes / self.storage_bandwidth
        return t

    def _sync_loads(self) -> float:
        """Copy time of the adapters admitted without being resident: the step waits for them."""
        loads = self.sched.sync_loads
        if not loads:
            return 0.0
        now = self.env.now
        for a in loads:
            self.link_free_s = max(self.link_free_s, now) + self._copy_time(a)
        loads.clear()
        stall = self.link_free_s - now
        self.load_stall_s += stall
        return stall

    def _prefetch(self, adapters: list[int]) -> None:
        for a in dict.fromkeys(adapters):
            if self.cache.resident[a]:
                continue
            if not self.cache.reserve(a):
                break
            self.link_free_s = max(self.link_free_s, self.env.now) + self._copy_time(a)
            self.inflight += 1
            done = self.env.timeout(self.link_free_s - self.env.now, value=a)
            done.callbacks.append(self._landed)

    def _landed(self, event) -> None:
        self.cache.loaded(event.value)
        self.inflight -= 1
        self.sched.epoch += 1
        self._notify()

    def _notify(self) -> None:
        """Wake the replica if it is idle, waiting for a load to land or a request to be routed here."""
        if self.wake is not None and not self.wake.triggered:
            self.wake.succeed()

    # --- behind a router ----------------------------------------------------------------------

    def receive(self, rid: int, arrival_s: float, adapter: int, prompt: int, output: int) -> None:
        """Request `rid` of the cluster's stream is routed here (at its arrival time)."""
        self.routed.append(rid)
        self.sched.push(arrival_s, 0 if self.strategy.name == "single" else adapter, prompt, output)
        self._notify()

    def close(self) -> None:
        """The router has no more requests."""
        self.sched.close()
        self._notify()

    # --- the replica process ----------------------------------------------------------------

    def _note_memory(self) -> int:
        """Record peaks; returns the bytes in use now (weights + KV + adapters)."""
        kv, adapters = self.kv.used, self.cache.used + self.plan.shared_bytes
        total = self.plan.weights + kv + adapters
        if kv > self.peak_kv:
            self.peak_kv = kv
        if adapters > self.peak_adapters:
            self.peak_adapters = adapters
        if total > self.peak_total:
            self.peak_total = total
        return total

    def _process(self):
        env, s = self.env, self.sched
        (add_start, add_duration, add_batch, add_tokens, add_prefill, add_distinct, add_memory,
         add_iterations) = (self.rows[f].append for f in STEP_FIELDS)
        preempt = self.cfg.kv_policy == "preempt"
        while not s.done:
            s.take_arrivals(env.now)
            to_load = s.admit()
            stall = self._sync_loads() if s.sync_loads else 0.0
            if to_load:
                self._prefetch(to_load)
            if preempt and s.num_running:
                s.grow_kv()
            memory = self._note_memory()
            if s.num_running == 0:
                yield from self._idle()
                continue
            step = s.build_step()
            iterations, duration = self._iterations(step)
            start = env.now
            yield env.timeout(stall + duration)
            done_before = s.completed
            s.complete(step, env.now, iterations)
            add_start(start)
            add_duration(stall + duration)
            add_batch(step.batch_size)
            add_tokens(step.num_tokens * iterations)
            add_prefill(step.prefill_tokens)
            add_distinct(step.distinct_adapters)
            add_memory(memory / 2**30)
            add_iterations(iterations)
            if self.progress is not None and s.completed > done_before:
                self.progress.update(s.completed - done_before)

    def _idle(self):
        env, s = self.env, self.sched
        nxt = s.next_arrival_s()
        if not self.inflight and not np.isfinite(nxt) and s.closed:
            raise SimulationStuck(
                f"{s.describe(s.first_waiting())} can never be admitted: KV cache {self.kv.capacity_blocks()} "
                f"blocks of {self.kv.block_size} tokens"
            )
        start = env.now
        stalled = s.n_waiting > 0 and self.inflight > 0  # idle only because adapters are on their way
        # A landing load may let a waiting request in before the next arrival; a router may send one.
        if self.inflight or not s.closed:
            self.wake = env.event()
            yield env.any_of([self.wake, env.timeout(nxt - start)] if np.isfinite(nxt) else [self.wake])
            self.wake = None
        else:
            yield env.timeout(nxt - start)
        if stalled:
            self.load_stall_s += env.now - start
        if env.now >= nxt - 1e-9:  # woken for that arrival: take it even if float rounding fell short
            s.take_arrivals(nxt)

    def _iterations(self, step: Step) -> tuple[int, float]:
        """How many identical decode iterations to apply at once, and their total duration: as many
        as fit before the next arrival, stopping at the first that finishes a request."""
        first = self.executor.step(step)
        s = self.sched
        if self.inflight or s.prefilling:
            return 1, first
        k_max = s.decode_iterations_left()
        if self.cfg.kv_policy == "preempt":  # stay within the blocks every row holds now
            k_max = min(k_max, s.decode_headroom())
        next_arrival = s.next_arrival_s() if self.next_routed_s is None else self.next_routed_s()
        now = self.env.now
        k, t = 1, now + first
        repeat = getattr(self.executor, "repeat_decode", None)
        # Each later iteration takes at least `first` (contexts only grow): a bound on how many can
        # start before the next arrival, so the executor is asked for few durations that go unused.
        guess = int((next_arrival - t) / first) + 2 if first > 0 and next_arrival < np.inf else k_max
        while k < k_max and t < next_arrival:
            if repeat is None:  # one executor call per iteration
                durations = (self.executor.step(step.decoded(k)),)
            else:
                durations = repeat(step.decoded(k - 1), min(k_max - k, guess))
            for d in durations:
                t += d
                k += 1
                if t >= next_arrival:
                    break
        return k, t - now

    def run(self) -> RunResult:
        self.start()
        self.env.run()
        return self.result()

    def start(self) -> None:
        self.env.process(self._process())

    def result(self) -> RunResult:
        """What it served (behind a router: the requests routed here, in their order of arrival)."""
        s = self.sched
        requests = self.requests if not self.routed else s.served()
        n = len(requests)
        hit = 1.0 - s.misses / s.admissions if s.admissions else float("nan")
        return RunResult(
            strategy=self.strategy.name, requests=requests,
            first_token_s=s.first_token_s[:n], finish_s=s.finish_s[:n],
            steps={f: np.frombuffer(column, dtype=column.typecode) for f, column in self.rows.items()},
            plan=self.plan,
            adapter_loads=self.loads, adapter_load_bytes=self.load_bytes, load_stall_s=self.load_stall_s,
            adapter_hit_rate=hit, peak_kv_bytes=self.peak_kv, peak_adapter_bytes=self.peak_adapters,
            peak_total_bytes=self.peak_total, kv_capacity_bytes=self.kv.pool.capacity,
            preemptions=s.preemptions,
        )
