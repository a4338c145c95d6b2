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

Running requests are rows of one int64 table (admission order; columns RID .. BLOCKS) so that a
step costs a few vector operations whatever the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lorabench.sim.executor import Step
from lorabench.sim.memory import AdapterCache, KVCache
from lorabench.workload import Requests

# Columns of the running-request table `Scheduler.state` (one row per running request, admission order).
RID, ADAPTER, CTX, PROMPT_LEFT, OUT_LEFT, BLOCKS = range(6)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    chunked_prefill: bool = False
    block_size: int = 16
    kv_policy: str = "reserve"  # or "preempt"
    max_distinct: int | None = None  # distinct adapters per batch (per-lora: max_loras)
    prefetch: bool = False  # loads are issued ahead for waiting requests (paged)
    scan_limit: int = 512  # waiting requests (FCFS) examined per admission pass
    prefetch_ahead: int = 16  # prefetch for at least this many waiting requests (more when seats are free)


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
        self.admissions = 0
        self.misses = 0  # admissions whose adapter was copied to the GPU for them
        self.preemptions = 0
        self.generated: dict[int, int] = {}  # tokens a preempted request had generated
        # Waiting requests: ids are in arrival order, so FCFS order is id order among those pending.
        self.pending = np.zeros(n, dtype=bool)
        self.head = 0  # no pending id below this
        self.n_waiting = 0
        # Admission is skipped while nothing it depends on changed (`epoch` counts finishes, prefills
        # completed, loads landed, preemptions) and only new arrivals are examined when only they did.
        self.epoch = 0
        self._seen = (-1, 0)  # (epoch, arrived) at the last admission pass
        self._blocked = False  # the last pass stopped at a request that must go first, or a full window
        self.arrived = 0  # requests 0 .. arrived-1 have arrived (ids are in arrival order)
        self.completed = 0
        self.state = np.zeros((0, 6), dtype=np.int64)
        self.prefilling = 0  # running requests still reading their prompt
        self.sync_loads: list[int] = []  # adapters to load before the next step (no prefetch)
        self._ones = np.ones(config.max_num_seqs, dtype=np.int64)
        self._decoding = np.zeros(config.max_num_seqs, dtype=bool)

    # --- state ----------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.state)

    @property
    def done(self) -> bool:
        return self.completed == len(self.req)

    def next_arrival_s(self) -> float:
        return float(self.req.arrival_s[self.arrived]) if self.arrived < len(self.req) else np.inf

    def take_arrivals(self, now: float) -> None:
        if self.arrived == len(self.req) or self.req.arrival_s[self.arrived] > now:
            return
        end = int(np.searchsorted(self.req.arrival_s, now, side="right"))
        if end > self.arrived:
            self.pending[self.arrived:end] = True
            self.n_waiting += end - self.arrived
            self.arrived = end

    def first_waiting(self) -> int:
        return int(self._window(1)[0])

    def _window(self, limit: int) -> np.ndarray:
        """The first `limit` waiting ids in FCFS order."""
        span = max(8 * limit, 1024)
        while True:
            ids = self.head + np.flatnonzero(self.pending[self.head : self.head + span])
            if len(ids) >= limit or self.head + span >= self.arrived:
                break
            span *= 4
        if len(ids):
            self.head = int(ids[0])
        return ids[:limit]

    # --- admission --------------------------------------------------------------------------

    def admit(self) -> list[int]:
        """Move waiting requests into the batch, FCFS. Adapters admitted without being resident
        (no-prefetch strategies) are appended to `sync_loads` (the step waits for them).

        Prefetch strategies return the adapters to copy now: those of the waiting requests that would
        form the next batch (in FCFS order, with a seat and KV memory for them) but whose adapter is
        absent. Their KV memory is counted as taken, so later requests do not overtake them and
        prefetching never outruns the memory the batch can use."""
        cfg, cache = self.cfg, self.cache
        seats = cfg.max_num_seqs - self.num_running
        next_seats = max(seats, cfg.prefetch_ahead) if cfg.prefetch else seats
        if self.n_waiting == 0 or next_seats == 0:
            return []
        if self._seen[0] == self.epoch:
            if self._seen[1] == self.arrived or self._blocked:
                return []
            ids = np.arange(self._seen[1], self.arrived)[: cfg.scan_limit]  # only new arrivals can join
        else:
            ids = self._window(cfg.scan_limit)
        self._seen = (self.epoch, self.arrived)
        ad = self.adapter_of[ids]
        if cfg.max_distinct is not None and self.distinct >= cfg.max_distinct:
            keep = self.in_use[ad] > 0  # only requests on adapters already in the batch can join
            ids, ad = ids[keep], ad[keep]
        budget = cfg.max_num_batched_tokens - (self.num_running - self.prefilling)
        if self.prefilling:
            budget -= int(self.state[:, PROMPT_LEFT].sum())
        blocked = len(ids) == cfg.scan_limit  # requests past the window wait for a change
        admitted: list[tuple] = []
        to_load: list[int] = []
        claimed = 0  # KV blocks of next-batch requests still waiting for their adapter
        no_room = False  # a synchronous load found every slot in use: later ones will too
        for r, a in zip(ids.tolist(), ad.tolist()):
            if next_seats == 0:
                blocked = True
                break
            generated = self.generated.get(r, 0)  # a preempted request recomputes these too
            prompt = int(self.req.prompt_tokens[r]) + generated
            out_left = int(self.req.output_tokens[r]) - generated
            new_adapter = self.in_use[a] == 0
            if new_adapter and cfg.max_distinct is not None and self.distinct >= cfg.max_distinct:
                continue
            blocks = int(self.kv.blocks_for(prompt + out_left if cfg.kv_policy == "reserve" else prompt))
            ready = cache.resident[a] and not cache.loading[a]
            if cfg.prefetch and (not ready or seats == 0):  # joins a later batch; its adapter is copied meanwhile
                if not self.kv.can_alloc(claimed + blocks):
                    blocked = True
                    break
                claimed += blocks
                next_seats -= 1
                if not ready and not cache.loading[a]:
                    to_load.append(a)
                continue
            if seats == 0 or budget < (1 if cfg.chunked_prefill else prompt):
                blocked = True
                break
            self.in_use[a] += 1  # pinned: finding KV memory must not evict this request's adapter
            if not self.kv.can_alloc(claimed + blocks):
                self.in_use[a] -= 1
                blocked = True
                break
            if not ready:
                if no_room or not cache.reserve(a):
                    self.in_use[a] -= 1
                    no_room = True
                    continue
                cache.loaded(a)
                self.sync_loads.append(a)  # the engine charges its copy time to the next step
            self.kv.alloc(blocks)
            cache.touch(a)
            self.admissions += 1
            if cache.fresh[a]:  # the first request to use a copy made since the adapter's last use
                cache.fresh[a] = False
                self.misses += 1
            if new_adapter:
                self.distinct += 1
            self.pending[r] = False
            admitted.append((r, a, 0, prompt, out_left, blocks))
            budget -= min(prompt, budget)
            seats -= 1
            next_seats -= 1
        self._blocked = blocked
        if admitted:
            self.n_waiting -= len(admitted)
            self.prefilling += len(admitted)
            self.state = np.concatenate([self.state, np.array(admitted, dtype=np.int64)])
        return to_load

    # --- steps ------------------------------------------------------------------------------

    def build_step(self) -> tuple[Step, np.ndarray | None]:
        """The next iteration: decode rows take 1 token, prefill rows their prompt (or a chunk).
        Returns the step and, when chunked prefill leaves some rows out this time, the mask of the
        running rows it covers (None: all of them)."""
        st, cfg = self.state, self.cfg
        ctx, adapters = st[:, CTX], st[:, ADAPTER].copy()
        if not self.prefilling:
            n = len(st)
            return Step(self.strategy, self._ones[:n], ctx + 1, adapters, self._decoding[:n], self.distinct), None
        left = st[:, PROMPT_LEFT]
        is_prefill = left > 0
        if cfg.chunked_prefill:
            budget = cfg.max_num_batched_tokens - (len(st) - self.prefilling)
            before = np.cumsum(left) - left  # prefill tokens of earlier rows (decode rows hold 0)
            chunks = np.clip(budget - before, 0, left)
            tokens = np.where(is_prefill, chunks, 1)
            keep = ~is_prefill | (chunks > 0)  # a prefill row with no budget left sits this step out
            if not keep.all():
                tokens = tokens[keep]
                return Step(self.strategy, tokens, ctx[keep] + tokens, adapters[keep], is_prefill[keep],
                            self.distinct), keep
        else:
            tokens = np.where(is_prefill, left, 1)
        return Step(self.strategy, tokens, ctx + tokens, adapters, is_prefill, self.distinct), None

    def grow_kv(self) -> bool:
        """Preempt policy: give every row the blocks its next token needs, preempting the newest
        rows while memory is short. Returns True when some row was preempted."""
        preempted = False
        while self.num_running:
            st = self.state
            target = self.kv.blocks_for(st[:, CTX] + np.maximum(st[:, PROMPT_LEFT], 1))
            need = np.maximum(target - st[:, BLOCKS], 0)
            total = int(need.sum())
            if total == 0 or self.kv.alloc(total):
                st[:, BLOCKS] += need
                return preempted
            self._preempt_last()
            preempted = True
        return preempted

    def _preempt_last(self) -> None:
        r, a, _, prompt_left, out_left, blocks = self.state[-1].tolist()
        self.generated[r] = int(self.req.output_tokens[r]) - out_left
        self.kv.release(blocks)
        self._drop_adapter(a)
        self.prefilling -= prompt_left > 0
        self.state = self.state[:-1]
        self.pending[r] = True
        self.head = min(self.head, r)
        self.n_waiting += 1
        self.preemptions += 1
        self.epoch += 1

    def _drop_adapter(self, a: int) -> None:
        self.in_use[a] -= 1
        if self.in_use[a] == 0:
            self.distinct -= 1

    def complete(self, step: Step, rows, end_s: float, iterations: int = 1) -> None:
        """Apply `iterations` identical iterations of `step` ending at `end_s` (iterations > 1 only
        for decode-only steps in which nobody finishes before the last one)."""
        st = self.state
        if not self.prefilling:  # decode only: every row gets `iterations` tokens
            st[:, CTX] += iterations
            st[:, OUT_LEFT] -= iterations
            return self._finish(end_s)
        if not self.cfg.chunked_prefill:  # prefill rows read their whole prompt: every row emits a token
            firsts = st[st[:, PROMPT_LEFT] > 0, RID]
            st[:, CTX] += step.tokens
            st[:, PROMPT_LEFT] = 0
            st[:, OUT_LEFT] -= 1
        else:
            tokens = np.zeros(len(st), dtype=np.int64)
            tokens[rows if rows is not None else slice(None)] = step.tokens  # rows left out do nothing
            was_prefill = st[:, PROMPT_LEFT] > 0
            st[:, CTX] += tokens
            st[:, PROMPT_LEFT] -= np.where(was_prefill, tokens, 0)
            prefilled = was_prefill & (st[:, PROMPT_LEFT] == 0)  # read its prompt: emits a token
            st[:, OUT_LEFT] -= ((tokens > 0) & ~was_prefill) | prefilled
            firsts = st[prefilled, RID]
        self.first_token_s[firsts[np.isnan(self.first_token_s[firsts])]] = end_s  # not again after a preemption
        self.prefilling -= len(firsts)
        self.epoch += 1  # prefills done: the token budget changed
        self._finish(end_s)

    def _finish(self, end_s: float) -> None:
        """Retire the requests that generated their last token."""
        st = self.state
        done = st[:, OUT_LEFT] <= 0
        if not done.any():
            return
        finished = st[done]
        self.finish_s[finished[:, RID]] = end_s
        self.completed += len(finished)
        self.kv.release(int(finished[:, BLOCKS].sum()))
        for a in finished[:, ADAPTER].tolist():
            self._drop_adapter(a)
        self.state = st[~done]
        self.epoch += 1
