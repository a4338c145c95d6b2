"""Continuous batching: which waiting requests join the batch, what each running request does in the
next step, and what a finished step changes.

FCFS with the strategy's adapter constraints. A request joins when the batch has a sequence slot, the
step has token budget for its prompt (or a chunk of it, with chunked prefill), its adapter is resident
(or, without prefetch, can be loaded now: the load stalls the step) without exceeding the cap of
distinct adapters, and the KV cache has blocks for it. A request skipped for its adapter lets later
ones pass (as vLLM does); one blocked by memory or budget stops admission (head of line).

KV policies: "reserve" allocates a request's whole prompt + output at admission, so requests wait
for memory and nothing is ever preempted; "preempt" allocates as the context grows and, when blocks
run out, preempts the most recently admitted request (its KV is dropped and recomputed later, as
vLLM's recompute preemption).

Running requests are kept in parallel numpy arrays (admission order) so that a step costs a few
vector operations whatever the batch size.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from lorabench.sim.executor import Step
from lorabench.sim.memory import AdapterCache, KVCache
from lorabench.workload import Requests

_FIELDS = ("rid", "adapter", "ctx", "prompt_left", "out_left", "blocks")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    chunked_prefill: bool = False
    block_size: int = 16
    kv_policy: str = "reserve"  # or "preempt"
    max_distinct: int | None = None  # distinct adapters per batch (per-lora: max_loras)
    prefetch: bool = False  # loads are issued ahead for waiting requests (paged)
    scan_limit: int = 512  # waiting requests examined per step past skipped ones


class Scheduler:
    def __init__(self, requests: Requests, adapters: np.ndarray, config: SchedulerConfig,
                 cache: AdapterCache, kv: KVCache, in_use: np.ndarray, strategy: str):
        self.req, self.cfg, self.cache, self.kv = requests, config, cache, kv
        self.adapter_of = adapters  # per request (the single strategy maps all to 0)
        self.strategy = strategy
        self.in_use = in_use  # running requests per adapter (shared with the cache)
        self.distinct = 0
        n = len(requests)
        self.first_token_s = np.full(n, np.nan)
        self.finish_s = np.full(n, np.nan)
        self.missed = np.zeros(n, dtype=bool)  # its adapter was not resident when it was first examined
        self.examined = np.zeros(n, dtype=bool)
        self.preemptions = 0
        self.generated: dict[int, int] = {}  # tokens a preempted request had generated
        self.waiting: deque[int] = deque()
        self.arrived = 0  # requests 0 .. arrived-1 have arrived (ids are in arrival order)
        self.completed = 0
        self.run = {f: np.zeros(0, dtype=np.int64) for f in _FIELDS}
        self.sync_loads: list[int] = []  # adapters to load before the next step (no prefetch)
        self._ones = np.ones(config.max_num_seqs, dtype=np.int64)

    # --- state ----------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.run["rid"])

    @property
    def done(self) -> bool:
        return self.completed == len(self.req)

    def next_arrival_s(self) -> float:
        return float(self.req.arrival_s[self.arrived]) if self.arrived < len(self.req) else np.inf

    def take_arrivals(self, now: float) -> None:
        end = int(np.searchsorted(self.req.arrival_s, now, side="right"))
        if end > self.arrived:
            self.waiting.extend(range(self.arrived, end))
            self.arrived = end

    # --- admission --------------------------------------------------------------------------

    def admit(self) -> list[int]:
        """Move waiting requests into the batch; returns adapters that must be loaded synchronously
        before the step (no-prefetch strategies) and adapters worth prefetching (prefetch ones)."""
        cfg, run = self.cfg, self.run
        decode = int((run["prompt_left"] == 0).sum())
        budget = cfg.max_num_batched_tokens - decode - int(run["prompt_left"].sum())
        seats = cfg.max_num_seqs - self.num_running
        admitted: list[tuple] = []
        skipped: list[int] = []
        to_load: list[int] = []
        examined = 0
        while self.waiting and seats > 0 and examined < cfg.scan_limit:
            r = self.waiting.popleft()
            examined += 1
            a = int(self.adapter_of[r])
            resident = self.cache.is_resident(a) and a not in self.cache.loading
            if not self.examined[r]:
                self.examined[r] = True
                self.missed[r] = not resident
            generated = self.generated.get(r, 0)  # a preempted request recomputes these too
            prompt = int(self.req.prompt_tokens[r]) + generated
            out_left = int(self.req.output_tokens[r]) - generated
            need_tokens = 1 if cfg.chunked_prefill else prompt
            if budget < need_tokens:
                self.waiting.appendleft(r)
                break
            new_adapter = self.in_use[a] == 0
            if new_adapter and cfg.max_distinct is not None and self.distinct >= cfg.max_distinct:
                skipped.append(r)
                continue
            if not resident:
                if cfg.prefetch or a in self.cache.loading:
                    skipped.append(r)
                    to_load.append(a)
                    continue
                if not self.cache.reserve(a):  # every slot holds an adapter of the running batch
                    skipped.append(r)
                    continue
                self.sync_loads.append(a)
                self.cache.loaded(a)  # the engine charges its copy time to the next step
            reserve = prompt + out_left if cfg.kv_policy == "reserve" else prompt
            blocks = int(self.kv.blocks_for(reserve))
            if not self.kv.alloc(blocks):
                self.waiting.appendleft(r)
                break
            self.cache.touch(a)
            if new_adapter:
                self.distinct += 1
            self.in_use[a] += 1
            admitted.append((r, a, 0, prompt, out_left, blocks))
            budget -= prompt if not cfg.chunked_prefill else min(prompt, budget)
            seats -= 1
        self.waiting.extendleft(reversed(skipped))
        if admitted:
            cols = np.array(admitted, dtype=np.int64).T
            for f, col in zip(_FIELDS, cols):
                run[f] = np.concatenate([run[f], col])
        return to_load

    # --- steps ------------------------------------------------------------------------------

    def build_step(self) -> Step:
        """The next iteration: decode rows take 1 token, prefill rows their prompt (or a chunk)."""
        run, cfg = self.run, self.cfg
        left = run["prompt_left"]
        is_prefill = left > 0
        if cfg.chunked_prefill and is_prefill.any():
            budget = cfg.max_num_batched_tokens - int((~is_prefill).sum())
            before = np.cumsum(left) - left  # prefill tokens of earlier rows (decode rows hold 0)
            chunks = np.clip(budget - before, 0, left)
            tokens = np.where(is_prefill, chunks, 1)
            # a prefill row with no budget left this step sits it out
            keep = ~is_prefill | (chunks > 0)
            if not keep.all():
                tokens, is_prefill = tokens[keep], is_prefill[keep]
                return Step(self.strategy, tokens, run["ctx"][keep] + tokens, run["adapter"][keep],
                            is_prefill, self.distinct), keep
        else:
            tokens = np.where(is_prefill, left, 1) if is_prefill.any() else self._ones[: len(left)]
        return Step(self.strategy, tokens, run["ctx"] + tokens, run["adapter"], is_prefill, self.distinct), None

    def grow_kv(self) -> bool:
        """Preempt policy: give every row the blocks its next token needs, preempting the newest
        rows while memory is short. Returns True when some row was preempted."""
        run = self.run
        preempted = False
        while self.num_running:
            target = self.kv.blocks_for(run["ctx"] + np.maximum(run["prompt_left"], 1))
            need = np.maximum(target - run["blocks"], 0)
            total = int(need.sum())
            if total == 0 or self.kv.alloc(total):
                run["blocks"] = run["blocks"] + need
                return preempted
            self._preempt_last()
            preempted = True
        return preempted

    def _preempt_last(self) -> None:
        run = self.run
        r, a = int(run["rid"][-1]), int(run["adapter"][-1])
        generated = int(self.req.output_tokens[r]) - int(run["out_left"][-1])
        self.generated[r] = generated
        self.kv.release(int(run["blocks"][-1]))
        self._drop_adapter(a)
        for f in _FIELDS:
            run[f] = run[f][:-1]
        self.waiting.appendleft(r)
        self.preemptions += 1

    def _drop_adapter(self, a: int) -> None:
        self.in_use[a] -= 1
        if self.in_use[a] == 0:
            self.distinct -= 1

    def complete(self, step: Step, rows, end_s: float, iterations: int = 1) -> None:
        """Apply `iterations` identical iterations of `step` ending at `end_s` (iterations > 1 only
        for decode-only steps in which nobody finishes before the last one)."""
        run = self.run
        if rows is not None:  # chunked prefill left some rows out: they do nothing this step
            tokens = np.zeros(self.num_running, dtype=np.int64)
            tokens[rows] = step.tokens
            was_prefill = np.zeros(self.num_running, dtype=bool)
            was_prefill[rows] = step.is_prefill
        else:
            tokens, was_prefill = step.tokens, step.is_prefill
        run["ctx"] = run["ctx"] + tokens * iterations
        emits = tokens > 0
        if was_prefill.any():
            run["prompt_left"] = run["prompt_left"] - np.where(was_prefill, tokens, 0)
            emits = emits & ((~was_prefill) | (run["prompt_left"] == 0))
            firsts = run["rid"][was_prefill & (run["prompt_left"] == 0)]
            fresh = firsts[np.isnan(self.first_token_s[firsts])]
            self.first_token_s[fresh] = end_s
        run["out_left"] = run["out_left"] - emits * iterations
        done = run["out_left"] <= 0
        if done.any():
            rids = run["rid"][done]
            self.finish_s[rids] = end_s
            self.completed += len(rids)
            self.kv.release(int(run["blocks"][done].sum()))
            for a in run["adapter"][done].tolist():
                self._drop_adapter(a)
            keep = ~done
            for f in _FIELDS:
                run[f] = run[f][keep]
