"""Several identical replicas behind a router, in one SimPy environment.

A router process takes the request stream in arrival order and, at each arrival, sends the request
to one replica (`Replica.receive`); every replica then schedules, batches, loads adapters and keeps
its KV cache on its own, exactly as a lone replica does. Routers (as dLoRA and LoRAServe compare):

- round-robin:   replica i mod G for the i-th request.
- least-loaded:  the replica with the fewest outstanding tokens (prompt + output tokens of the
                 requests it holds that have not finished).
- power-of-two:  two replicas drawn at random (seeded), the less loaded of them.
- affinity:      an adapter's requests go to its home replica, found by consistent hashing (64
                 points per replica on a hash ring), so each adapter stays resident on one GPU;
                 when the home replica's load would exceed (1 + slack) x the cluster's mean load,
                 the request spills to the least-loaded replica (consistent hashing with bounded load).

The cluster's result is one `RunResult` over the whole stream (requests in their global order, steps
of every replica in time order), with the replica of every request and step and a row of figures
per replica (`replica_stats`).
"""

from __future__ import annotations

import bisect
import hashlib

import numpy as np
import simpy

from lorabench.sim.engine import Replica, RunResult
from lorabench.workload import Requests

ROUTERS = ("round-robin", "least-loaded", "power-of-two", "affinity")
RING_POINTS = 64  # points per replica on the affinity router's hash ring


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class Router:
    """Chooses the replica of each arriving request from the replicas' outstanding tokens."""

    def __init__(self, name: str, replicas: int, seed: int = 0, slack: float = 0.25):
        if name not in ROUTERS:
            raise ValueError(f"router {name!r}: expected one of {', '.join(ROUTERS)}")
        self.name, self.replicas, self.slack = name, replicas, slack
        self._count = 0
        self._rng = np.random.default_rng([seed, 20])
        ring = sorted((_hash(f"replica-{g}-{p}"), g) for g in range(replicas) for p in range(RING_POINTS))
        self._ring_points, self._ring_owner = [p for p, _ in ring], [g for _, g in ring]
        self._home: dict[int, int] = {}

    def home(self, adapter: int) -> int:
        """The affinity router's replica for `adapter`: the first ring point at or after its hash."""
        if adapter not in self._home:
            i = bisect.bisect_left(self._ring_points, _hash(f"adapter-{adapter}")) % len(self._ring_points)
            self._home[adapter] = self._ring_owner[i]
        return self._home[adapter]

    def choose(self, adapter: int, tokens: int, loads: list[int]) -> int:
        """The replica for a request of `tokens` prompt + output tokens on `adapter`, given each
        replica's outstanding tokens."""
        self._count += 1
        if self.name == "round-robin":
            return (self._count - 1) % self.replicas
        least = loads.index(min(loads))
        if self.name == "least-loaded":
            return least
        if self.name == "power-of-two":
            a = int(self._rng.integers(self.replicas))
            b = int(self._rng.integers(self.replicas - 1))
            b += b >= a  # two different replicas
            return a if loads[a] <= loads[b] else b
        home = self.home(adapter)
        bound = (1 + self.slack) * (sum(loads) + tokens) / self.replicas
        return home if loads[home] + tokens <= bound else least


class Cluster:
    """`replicas` (built on `env`, each with capacity for the whole stream) behind `router`."""

    def __init__(self, requests: Requests, replicas: list[Replica], router: Router, env: simpy.Environment):
        self.requests, self.replicas, self.router, self.env = requests, replicas, router, env
        self._arrival = requests.arrival_s.tolist()
        self._next = 0  # the next request to route
        for replica in replicas:
            replica.next_routed_s = self.next_arrival_s

    def next_arrival_s(self) -> float:
        """When the next request arrives at the router: a replica merges no decode iterations past it,
        since it may be sent there."""
        return self._arrival[self._next] if self._next < len(self._arrival) else np.inf

    def _route(self):
        env, r = self.env, self.requests
        adapter, prompt, output = r.adapter.tolist(), r.prompt_tokens.tolist(), r.output_tokens.tolist()
        for i, arrival in enumerate(self._arrival):
            if arrival > env.now:
                yield env.timeout(arrival - env.now)
            self._next = i + 1
            loads = [replica.sched.unfinished_tokens for replica in self.replicas]
            g = self.router.choose(adapter[i], prompt[i] + output[i], loads)
            self.replicas[g].receive(i, arrival, adapter[i], prompt[i], output[i])
        for replica in self.replicas:
            replica.close()

    def run(self) -> RunResult:
        self.env.process(self._route())
        for replica in self.replicas:
            replica.start()
        self.env.run()
        return self._merge([replica.result() for replica in self.replicas])

    def _merge(self, results: list[RunResult]) -> RunResult:
        n, first = len(self.requests), results[0]
        first_token, finish = np.full(n, np.nan), np.full(n, np.nan)
        replica_of = np.full(n, -1, dtype=np.int64)
        for g, (replica, result) in enumerate(zip(self.replicas, results)):
            ids = np.asarray(replica.routed, dtype=np.int64)
            first_token[ids], finish[ids], replica_of[ids] = result.first_token_s, result.finish_s, g
        steps = {f: np.concatenate([r.steps[f] for r in results]) for f in first.steps}
        steps["replica"] = np.concatenate([np.full(len(r.steps["start_s"]), g) for g, r in enumerate(results)])
        order = np.lexsort((steps["replica"], steps["start_s"]))
        admissions = sum(replica.sched.admissions for replica in self.replicas)
        misses = sum(replica.sched.misses for replica in self.replicas)
        r = self.requests
        adapters = np.zeros(n, dtype=np.int64) if first.strategy == "single" else r.adapter
        return RunResult(
            strategy=first.strategy, requests=Requests(r.arrival_s, adapters, r.prompt_tokens, r.output_tokens),
            first_token_s=first_token, finish_s=finish, steps={f: v[order] for f, v in steps.items()},
            plan=first.plan,
            adapter_loads=sum(x.adapter_loads for x in results),
            adapter_load_bytes=sum(x.adapter_load_bytes for x in results),
            load_stall_s=sum(x.load_stall_s for x in results),
            adapter_hit_rate=1.0 - misses / admissions if admissions else float("nan"),
            peak_kv_bytes=max(x.peak_kv_bytes for x in results),  # per GPU
            peak_adapter_bytes=max(x.peak_adapter_bytes for x in results),
            peak_total_bytes=max(x.peak_total_bytes for x in results),
            kv_capacity_bytes=first.kv_capacity_bytes, preemptions=sum(x.preemptions for x in results),
            replica=replica_of, router=self.router.name, replica_stats=[_stats(g, x) for g, x in enumerate(results)],
        )


def _stats(g: int, result: RunResult) -> dict:
    """One replica's row of replicas/<strategy>.csv."""
    r, steps = result.requests, result.steps
    return {
        "replica": g, "requests": len(r), "prompt_tokens": int(r.prompt_tokens.sum()),
        "output_tokens": int(r.output_tokens.sum()), "busy_s": float(steps["duration_s"].sum()),
        "steps": len(steps["start_s"]), "adapter_loads": result.adapter_loads,
        "adapter_hit_rate": result.adapter_hit_rate, "preemptions": result.preemptions,
        "gpu_memory_peak_gib": result.peak_total_bytes / 2**30,
    }
