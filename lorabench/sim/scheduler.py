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

Running requests are `Row`s in admission order: first the decoding ones, then the few still reading
their prompt (rows read their prompts in admission order, so those are always the newest). A
decoding row is kept relative to the iteration count T, so that a decode iteration changes no row:
its context is `base + T`, and it emits its last token at iteration `end`; rows are listed under the
iteration at which they finish (and, with the preempt policy, need their next KV block), and the
totals a step needs are kept as running sums. A step then costs a few scalar updates whatever the
batch size, and only what joins or leaves the batch costs work.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from lorabench.sim.executor import Step
from lorabench.sim.memory import AdapterCache, KVCache
from lorabench.workload import Requests


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
    vllm_v1: bool = False  # vLLM V1's whole-queue admission and preemption rule instead (scheduler_v1.py)
    client_max_inflight: int | None = None  # vllm_v1: arrivals refused while this many requests are in flight
    ingress_s: float = 0.0  # vllm_v1: a request reaches the scheduler this long after it arrives


class Row:
    """A running request. While it reads its prompt, `ctx`, `prompt_left` and `out_left` are its own;
    once decoding, its context is `base + T` and it emits its last token at iteration `end` (T is the
    scheduler's iteration count), and with the preempt policy it needs another KV block at `grow_at`."""

    __slots__ = ("rid", "adapter", "blocks", "ctx", "prompt_left", "out_left", "base", "end", "grow_at")

    def __init__(self, rid: int, adapter: int, blocks: int, prompt: int, out_left: int):
        self.rid, self.adapter, self.blocks = rid, adapter, blocks
        self.ctx, self.prompt_left, self.out_left = 0, prompt, out_left


class Due:
    """Request ids listed under the iteration at which something happens to them."""

    def __init__(self):
        self.at: dict[int, list[int]] = {}
        self._heap: list[int] = []  # iterations with a list, and some emptied since (skipped lazily)

    def add(self, when: int, rid: int) -> None:
        listed = self.at.get(when)
        if listed is None:
            self.at[when] = [rid]
            heapq.heappush(self._heap, when)
        else:
            listed.append(rid)

    def remove(self, when: int, rid: int) -> None:
        listed = self.at[when]
        listed.remove(rid)
        if not listed:
            del self.at[when]

    def pop(self, when: int) -> list[int]:
        return self.at.pop(when, [])

    def first(self) -> int | float:
        """The earliest iteration with a request listed (inf when none)."""
        heap = self._heap
        while heap and heap[0] not in self.at:
            heapq.heappop(heap)
        return heap[0] if heap else np.inf


class Scheduler:
    def __init__(self, requests: Requests, adapters: np.ndarray, config: SchedulerConfig,
                 cache: AdapterCache, kv: KVCache, in_use: np.ndarray, strategy: str, capacity: int | None = None):
        """`requests` (their `adapters`: the single strategy maps all to 0) are all it serves, unless
        `capacity` is given: then more arrive by `push` (a replica behind a router, sim/cluster.py),
        up to `capacity` in all, until `close`."""
        self.cfg, self.cache, self.kv = config, cache, kv
        n = max(len(requests), capacity or 0)
        self.adapter_of = np.zeros(n, dtype=np.int64)  # per request
        self.adapter_of[: len(requests)] = adapters
        self.closed = capacity is None  # no more requests will be pushed
        self.strategy = strategy
        self.in_use = in_use  # running requests per adapter (shared with the cache)
        self.distinct = 0
        self.active: set[int] = set()  # adapters of the running requests (len: distinct)
        # Per-request figures as Python lists: admission reads them one request at a time.
        self._adapter = adapters.tolist()
        self._prompt = requests.prompt_tokens.tolist()
        self._output = requests.output_tokens.tolist()
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
        self._arrival_s = requests.arrival_s.tolist()
        self._next_arrival_s = self._arrival_s[0] if self._arrival_s else np.inf
        self.completed = 0
        # Prompt and output tokens of the requests not finished yet (a router's measure of load)
        self.unfinished_tokens = int(requests.prompt_tokens.sum() + requests.output_tokens.sum())
        # The running rows (see the module docstring) and the totals a step needs.
        self.T = 0  # iterations applied
        self.decoding: dict[int, Row] = {}  # request id -> row, in admission order
        self.prefill: list[Row] = []  # rows still reading their prompt, in admission order
        self.ends = Due()  # decoding rows by the iteration of their last token
        self.grows = Due()  # preempt policy: decoding rows by the iteration they need another KV block
        self.base_sum = 0  # sum of `base` over decoding rows
        self.prompt_left = 0  # prompt tokens the prefill rows have still to read
        self.batch_id = 0  # changes whenever a request joins or leaves the batch
        self._chunks: list[int] = []  # prompt tokens each prefill row reads in the step being built
        self.sync_loads: list[int] = []  # adapters to load before the next step (no prefetch)

    # --- state ----------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.decoding) + len(self.prefill)

    @property
    def prefilling(self) -> int:
        return len(self.prefill)

    @property
    def done(self) -> bool:
        return self.closed and self.completed == len(self._arrival_s)

    def next_arrival_s(self) -> float:
        return self._next_arrival_s

    def push(self, arrival_s: float, adapter: int, prompt: int, output: int) -> int:
        """A request routed here (arrivals come in time order); returns its id in this scheduler."""
        r = len(self._arrival_s)
        self._arrival_s.append(arrival_s)
        self._adapter.append(adapter)
        self._prompt.append(prompt)
        self._output.append(output)
        self.adapter_of[r] = adapter
        self.unfinished_tokens += prompt + output
        if self.arrived == r:
            self._next_arrival_s = arrival_s
        return r

    def served(self) -> Requests:
        """The requests it was given (pushed ones included), in arrival order."""
        return Requests(np.array(self._arrival_s, dtype=np.float64), self.adapter_of[: len(self._arrival_s)].copy(),
                        np.array(self._prompt, dtype=np.int64), np.array(self._output, dtype=np.int64))

    def close(self) -> None:
        """No more requests will be pushed."""
        self.closed = True

    def describe(self, r: int) -> str:
        return f"request {r} (prompt {self._prompt[r]}, output {self._output[r]} tokens)"

    def take_arrivals(self, now: float) -> None:
        if self._next_arrival_s > now:
            return
        arrival, end = self._arrival_s, self.arrived + 1  # a step sees few arrivals: walk to them
        while end < len(arrival) and arrival[end] <= now:
            end += 1
        self.pending[self.arrived:end] = True
        self.n_waiting += end - self.arrived
        self.arrived = end
        self._next_arrival_s = arrival[end] if end < len(arrival) else np.inf

    def first_waiting(self) -> int:
        return int(self._window(1)[0])

    def _window(self, limit: int) -> np.ndarray:
        """The first `limit` waiting ids in FCFS order."""
        if self.n_waiting == self.arrived - self.head:  # no gaps: head .. arrived-1 all wait
            return np.arange(self.head, min(self.arrived, self.head + limit))
        ids = self._pending_from(self.head, limit)
        if len(ids):
            self.head = int(ids[0])
        return ids[:limit]

    def _pending_from(self, start: int, limit: int) -> np.ndarray:
        """Waiting ids from `start` on in FCFS order: at least `limit` of them unless fewer wait (the
        span searched grows until it holds them, so a long gap costs a few passes, not one per id)."""
        span = max(8 * limit, 1024)
        while True:
            ids = start + self.pending[start : start + span].nonzero()[0]
            if len(ids) >= limit or start + span >= self.arrived:
                return ids
            span *= 4

    def decode_iterations_left(self) -> int | float:
        """Decode iterations until the first running request emits its last token."""
        return self.ends.first() - self.T

    def decode_headroom(self) -> int | float:
        """Decode iterations every row can take within the KV blocks it holds now (preempt policy)."""
        return self.grows.first() - self.T

    # --- admission --------------------------------------------------------------------------

    def admit(self) -> list[int]:
        """Move waiting requests into the batch, FCFS. Adapters admitted without being resident
        (no-prefetch strategies) are appended to `sync_loads` (the step waits for them).

        Prefetch strategies return the adapters to copy now: those of the waiting requests that would
        form the next batch (in FCFS order, with a seat and KV memory for them) but whose adapter is
        absent. Their KV memory is counted as taken, so later requests do not overtake them and
        prefetching never outruns the memory the batch can use."""
        if self.n_waiting == 0:
            return []
        new_arrivals_only = self._seen[0] == self.epoch
        if new_arrivals_only and (self._seen[1] == self.arrived or self._blocked):
            return []
        cfg, cache, kv, in_use = self.cfg, self.cache, self.kv, self.in_use
        seats = cfg.max_num_seqs - len(self.decoding) - len(self.prefill)
        next_seats = max(seats, cfg.prefetch_ahead) if cfg.prefetch else seats
        if next_seats == 0:
            return []
        if new_arrivals_only:
            ids = np.arange(self._seen[1], self.arrived)[: cfg.scan_limit]  # only new arrivals can join
        else:
            ids = self._window(cfg.scan_limit)
        self._seen = (self.epoch, self.arrived)
        ad = self.adapter_of[ids]
        cap, distinct = cfg.max_distinct, self.distinct
        if cap is not None and distinct >= cap:
            keep = in_use[ad] > 0  # only requests on adapters already in the batch can join
            ids, ad = ids[keep], ad[keep]
        budget = cfg.max_num_batched_tokens - len(self.decoding) - self.prompt_left
        blocked = len(ids) == cfg.scan_limit  # requests past the window wait for a change
        reserve, chunked, prefetch = cfg.kv_policy == "reserve", cfg.chunked_prefill, cfg.prefetch
        block_size, generated = kv.block_size, self.generated
        resident, loading, fresh = cache.resident, cache.loading, cache.fresh
        admitted: list[Row] = []
        to_load: list[int] = []
        claimed = 0  # KV blocks of next-batch requests still waiting for their adapter
        no_room = False  # a synchronous load found every slot in use: later ones will too
        window, n_window = ids.tolist(), len(ids)
        visit, i = range(n_window), 0  # positions in `window` still to examine
        while i < len(visit):
            p = visit[i]
            i += 1
            r = window[p]
            a = self._adapter[r]
            done = generated.get(r, 0) if generated else 0  # a preempted request recomputes these too
            prompt, out_left = self._prompt[r] + done, self._output[r] - done
            new_adapter = in_use[a] == 0
            if new_adapter and cap is not None and distinct >= cap:
                continue
            blocks = -(-(prompt + out_left if reserve else prompt) // block_size)
            ready = resident[a] and not loading[a]
            if prefetch and (not ready or seats == 0):  # joins a later batch; its adapter is copied meanwhile
                if not kv.can_alloc(claimed + blocks):
                    blocked = True
                    break
                claimed += blocks
                if not ready and not loading[a]:
                    to_load.append(a)
            else:
                if seats == 0 or budget < (1 if chunked else prompt):
                    blocked = True
                    break
                cache.pin(a)  # finding KV memory must not evict this request's adapter
                if not kv.can_alloc(claimed + blocks):
                    cache.unpin(a)
                    blocked = True
                    break
                if not ready:
                    if no_room or not cache.reserve(a):
                        cache.unpin(a)
                        no_room = True
                        continue
                    cache.loaded(a)
                    self.sync_loads.append(a)  # the engine charges its copy time to the next step
                kv.alloc(blocks)
                cache.touch(a)
                self.admissions += 1
                if fresh[a]:  # the first request to use a copy made since the adapter's last use
                    fresh[a] = False
                    self.misses += 1
                self.pending[r] = False
                admitted.append(Row(r, a, blocks, prompt, out_left))
                budget -= min(prompt, budget)
                seats -= 1
                if new_adapter:
                    distinct += 1
                    self.active.add(a)
                    if cap is not None and distinct >= cap:  # from now on only adapters in the batch can join
                        visit, i = (p + 1 + (in_use[ad[p + 1:]] > 0).nonzero()[0]).tolist(), 0
            next_seats -= 1
            if next_seats == 0:  # the next request in the window, if any, finds no seat
                blocked = blocked or p + 1 < n_window
                break
        self.distinct = distinct
        self._blocked = blocked
        if admitted:
            while self.head < self.arrived and not self.pending[self.head]:  # keep head at the first waiting id
                self.head += 1
            self.n_waiting -= len(admitted)
            self.prefill += admitted
            self.prompt_left += sum(row.prompt_left for row in admitted)
            self.batch_id += 1
        return to_load

    # --- steps ------------------------------------------------------------------------------

    def build_step(self) -> Step:
        """The next iteration: decode rows take 1 token, prefill rows their prompt (or, with chunked
        prefill, a chunk; a prefill row left without budget sits the step out)."""
        n_decode, after = len(self.decoding), self.T + 1
        decode_context = self.base_sum + n_decode * after
        if not self.prefill:
            return Step.from_totals(self.strategy, self.distinct, n_decode, n_decode, 0, decode_context,
                                    2 * decode_context, self.batch_id, *self._arrays_of(after, ()))
        if self.cfg.chunked_prefill:  # chunks in row order, from the budget decode rows leave
            budget, before, chunks = self.cfg.max_num_batched_tokens - n_decode, 0, []
            for row in self.prefill:
                chunks.append(min(max(budget - before, 0), row.prompt_left))
                before += row.prompt_left
        else:
            chunks = [row.prompt_left for row in self.prefill]
        self._chunks = chunks
        taken = [(row, c) for row, c in zip(self.prefill, chunks) if c]
        prefill_tokens = sum(c for _, c in taken)
        context_sum = decode_context + sum(row.ctx + c for row, c in taken)
        pairs = 2 * decode_context + sum(c * (2 * row.ctx + c + 1) for row, c in taken)
        batch_id = self.batch_id if len(taken) == len(chunks) else None  # rows sat out: another batch
        return Step.from_totals(self.strategy, self.distinct, n_decode + len(taken), n_decode + prefill_tokens,
                                prefill_tokens, context_sum, pairs, batch_id, *self._arrays_of(after, taken))

    def _arrays_of(self, after: int, taken: list[tuple[Row, int]]):
        """The step's arrays and its distinct adapter ids, as functions run when an executor reads
        them: decoding rows at iteration `after`, then the prefill rows `taken` with their chunks."""
        T, batch_id, whole = self.T, self.batch_id, len(taken) == len(self.prefill)

        def check():
            if (self.T, self.batch_id) != (T, batch_id):
                raise RuntimeError("a step's arrays were read after the scheduler applied it")

        def arrays():
            check()
            rows = self.decoding.values()
            tokens = [1] * len(rows) + [c for _, c in taken]
            context = [row.base + after for row in rows] + [row.ctx + c for row, c in taken]
            adapters = [row.adapter for row in rows] + [row.adapter for row, _ in taken]
            is_prefill = [False] * len(rows) + [True] * len(taken)
            return (np.array(tokens, dtype=np.int64), np.array(context, dtype=np.int64),
                    np.array(adapters, dtype=np.int64), np.array(is_prefill, dtype=bool))

        def adapter_ids():
            check()
            return frozenset(self.active if whole else arrays()[2].tolist())  # whole: every running request is in it

        return arrays, adapter_ids

    def complete(self, step: Step, end_s: float, iterations: int = 1) -> None:
        """Apply `iterations` identical iterations of `step` (the last one built) ending at `end_s`
        (iterations > 1 only for decode-only steps in which nobody finishes before the last one)."""
        self.T += iterations
        if self.prefill:
            self._read_prompts(end_s)
        self._finish(end_s)

    def _read_prompts(self, end_s: float) -> None:
        """Prefill rows read their chunks; those done with their prompt emit their first token and
        decode from now on."""
        T, preempt = self.T, self.cfg.kv_policy == "preempt"
        done = 0
        for row, chunk in zip(self.prefill, self._chunks):
            row.ctx += chunk
            row.prompt_left -= chunk
            self.prompt_left -= chunk
            if row.prompt_left:
                continue
            done += 1  # chunks go in row order, so the rows done are the first ones
            if not self.preemptions or np.isnan(self.first_token_s[row.rid]):  # not again after a preemption
                self.first_token_s[row.rid] = end_s
            row.base, row.end = row.ctx - T, T + row.out_left - 1
            self.decoding[row.rid] = row
            self.base_sum += row.base
            self.ends.add(row.end, row.rid)
            if preempt:
                self._track_growth(row)
        del self.prefill[:done]
        self.epoch += 1  # prefills done: the token budget changed

    def _finish(self, end_s: float) -> None:
        """Retire the requests that generated their last token."""
        finished = self.ends.pop(self.T)
        if not finished:
            return
        released = 0
        for rid in finished:
            row = self.decoding.pop(rid)
            self.finish_s[rid] = end_s
            self.unfinished_tokens -= self._prompt[rid] + self._output[rid]
            self.base_sum -= row.base
            released += self._untrack_growth(row) if self.cfg.kv_policy == "preempt" else row.blocks
            self._drop_adapter(row.adapter)
        self.completed += len(finished)
        self.kv.release(released)
        self.batch_id += 1
        self.epoch += 1

    def _track_growth(self, row: Row) -> None:
        """Preempt policy: a row starts decoding; list it under the iteration it needs another block."""
        row.grow_at = row.blocks * self.kv.block_size - row.base
        self.grows.add(row.grow_at, row.rid)

    def _untrack_growth(self, row: Row) -> int:
        """Preempt policy: a decoding row leaves the batch; returns the KV blocks it holds."""
        self.grows.remove(row.grow_at, row.rid)
        return row.blocks

    def grow_kv(self) -> bool:
        """Preempt policy: give every row the blocks its next token needs, preempting the newest
        rows while memory is short. Returns True when some row was preempted. (A prefill row holds
        the blocks of its whole prompt from admission; a decoding row needs one more block when its
        context fills the ones it holds.)"""
        preempted = False
        while self.num_running:
            due = self.grows.at.get(self.T, [])
            if not due or self.kv.alloc(len(due)):
                for rid in self.grows.pop(self.T):
                    row = self.decoding[rid]
                    row.blocks += 1
                    row.grow_at += self.kv.block_size
                    self.grows.add(row.grow_at, rid)
                return preempted
            self._preempt_last()
            preempted = True
        return preempted

    def _preempt_last(self) -> Row:
        """Preempt the most recently admitted row: its KV is dropped; it waits to be admitted again.
        Returns that row."""
        if self.prefill:
            row = self.prefill.pop()
            self.prompt_left -= row.prompt_left
            out_left, blocks = row.out_left, row.blocks
        else:
            _, row = self.decoding.popitem()
            self.base_sum -= row.base
            self.ends.remove(row.end, row.rid)
            blocks = self._untrack_growth(row)
            out_left = row.end - self.T
        r = row.rid
        self.generated[r] = self._output[r] - out_left
        self.kv.release(blocks)
        self._drop_adapter(row.adapter)
        self.batch_id += 1
        self.pending[r] = True
        self.head = min(self.head, r)
        self.n_waiting += 1
        self.preemptions += 1
        self.epoch += 1
        return row

    def _drop_adapter(self, a: int) -> None:
        self.cache.unpin(a)
        if self.in_use[a] == 0:
            self.distinct -= 1
            self.active.discard(a)
