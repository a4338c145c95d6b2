"""vLLM V1's admission and preemption rules (vllm/v1/core/sched/scheduler.py, vLLM 0.8.5) on the base
scheduler's rows, steps and KV blocks.

Each step vLLM V1 first gives every running request its next tokens, preempting the most recently
admitted ones while KV blocks run out; only in a step that preempted nothing does it then admit
waiting requests. Admission walks the whole waiting queue from its head: a request whose adapter is
not among the batch's adapters while the batch already has `max_loras` of them is skipped (it keeps
its place), and the walk stops at the first request that finds no token budget, no KV blocks or no
seat. With few adapter slots and a long queue this walk passes thousands of requests to find the
few of the batch's adapters, so batches stay full (where a window of the first 512 does not), and
the host time of the walk is an engine term (`EngineModel.waiting_scan_s`; `scanned` counts it).

The walk is not done request by request here: waiting requests are also listed per adapter (in
FCFS order), so once the batch has `max_loras` adapters the next admissible request is the earliest
head among those adapters' lists (a heap), and how many requests vLLM walked past is counted at the
end in one vectorized pass. A pass costs work per admitted request, never per waiting one.

Two more things real runs need: a client that refuses new requests while `client_max_inflight` are
in flight (the benchmark client of the shipped data runs out of connections near 27,000 open
requests), and the time-averaged numbers of running and waiting requests, which vLLM's metrics
sample (`running_area`, `waiting_area`: request-seconds, integrated over the times they held).

FCFS order is request id order (arrival order); a preempted request goes back to its place by id,
where vLLM puts it at the head of the queue (it arrived before those that wait, bar the rare
request that was skipped for its adapter while it ran).
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
from array import array
from collections import deque

import numpy as np

from lorabench.sim.scheduler import Row, Scheduler


# Per step row: iterations, requests, distinct adapters, waiting requests walked, tokens (per
# iteration), seconds waiting for adapter copies, end time, and the kernels' compute-bound and
# memory-bound seconds, and of the latter the LoRA kernels', when the executor tells (`kernel_split`).
TRACE_FIELDS = ("iterations", "batch_size", "distinct", "scanned", "tokens", "stall_s", "end_s", "compute_s", "memory_s",
                "lora_s")


class SchedulerV1(Scheduler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.queues: dict[int, deque[int]] = {}  # adapter -> its waiting request ids, FCFS
        self.scanned = 0  # waiting requests the last admission pass walked (vLLM's loop iterations)
        self.dropped = 0  # arrivals the client refused (client_max_inflight)
        self.running_area = self.waiting_area = 0.0  # request-seconds running / waiting
        self._levels = (0, 0)  # (running, waiting) since `_level_s`
        self._level_s = 0.0
        self.trace: dict[str, array] | None = None  # `record_steps`: what each step row's time depends on
        self._ingress = self.cfg.ingress_s  # requests reach the queue this long after they arrive
        if self._ingress:
            self._arrival_s = [a + self._ingress for a in self._arrival_s]
            self._next_arrival_s = self._arrival_s[0] if self._arrival_s else np.inf
        self.step_stall_s = 0.0  # adapter copies the step being built waits for (set by the replica)
        self.kernel_split = None  # iterations -> (compute, memory, LoRA memory) seconds of the row's kernels
        self._growing = [0] * self.kv.block_size  # decoding rows per class (see grow_kv)
        self._grown_at = -1  # the iteration whose rows got their blocks last

    @property
    def done(self) -> bool:
        return self.closed and self.completed + self.dropped == len(self._arrival_s)

    def push(self, arrival_s: float, adapter: int, prompt: int, output: int) -> int:
        return super().push(arrival_s + self._ingress, adapter, prompt, output)

    def served(self):
        requests = super().served()
        return dataclasses.replace(requests, arrival_s=requests.arrival_s - self._ingress)

    # --- arrivals -----------------------------------------------------------------------------

    def take_arrivals(self, now: float) -> None:
        self.finish_window(now)  # the levels held until now
        if self._next_arrival_s > now:
            return
        arrival, start = self._arrival_s, self.arrived
        end = start + 1
        while end < len(arrival) and arrival[end] <= now:
            end += 1
        taken = end - start
        cap = self.cfg.client_max_inflight
        if cap is not None:  # the client opens no more connections than it has
            taken = max(0, min(taken, cap - self.n_waiting - self.num_running))
            self.dropped += end - start - taken
        if taken:
            self.pending[start:start + taken] = True
            self.n_waiting += taken
            adapters, queues = self._adapter, self.queues
            for r in range(start, start + taken):
                queue = queues.get(adapters[r])
                if queue is None:
                    queues[adapters[r]] = deque((r,))
                else:
                    queue.append(r)
        self.arrived = end
        self._next_arrival_s = arrival[end] if end < len(arrival) else np.inf

    def finish_window(self, end_s: float) -> None:
        """Close the running / waiting integrals at `end_s` (the end of a measurement window)."""
        running, waiting = self._levels
        self.running_area += running * (end_s - self._level_s)
        self.waiting_area += waiting * (end_s - self._level_s)
        self._level_s = end_s

    def record_steps(self) -> None:
        """From now on keep, per step row (as the replica records rows), the figures its engine time
        depends on: TRACE_FIELDS."""
        self.trace = {f: array("d") for f in TRACE_FIELDS}

    def complete(self, step, end_s: float, iterations: int = 1) -> None:
        if self.trace is not None:
            split = self.kernel_split(iterations) if self.kernel_split is not None else (0.0, 0.0, 0.0)
            for f, v in zip(TRACE_FIELDS, (iterations, step.batch_size, step.distinct_adapters, self.scanned,
                                           step.num_tokens, self.step_stall_s, end_s, *split)):
                self.trace[f].append(v)
        self.step_stall_s = 0.0
        super().complete(step, end_s, iterations)

    # --- admission ----------------------------------------------------------------------------

    def admit(self) -> list[int]:
        """Running requests first (their next KV block, preempting the newest when short); then,
        unless that preempted, the whole-queue walk."""
        preempted = self.cfg.kv_policy == "preempt" and self.num_running > 0 and self.grow_kv()
        if not preempted:
            self._admit_waiting()
        self._levels = (self.num_running, self.n_waiting)
        return []

    def _admit_waiting(self) -> None:
        if self.n_waiting == 0:
            self.scanned = 0
            return
        if self._seen == (self.epoch, self.arrived):  # nothing changed: the same walk admits nothing again
            return
        self._seen = (self.epoch, self.arrived)
        cfg = self.cfg
        self._seats = cfg.max_num_seqs - self.num_running
        self._budget = cfg.max_num_batched_tokens - len(self.decoding) - self.prompt_left
        waiting_before, head_before = self.n_waiting, self.head
        cap = cfg.max_distinct
        admitted: list[Row] = []
        stop = None  # the request the walk stopped at (None: it reached the end of the queue)
        if cap is None or self.distinct < cap:
            stop = self._walk_fcfs(admitted, cap)
        if stop is None and cap is not None and self.distinct >= cap:
            stop = self._walk_batch_adapters(admitted)
        if stop is None:
            self.scanned = waiting_before
        else:  # every request waiting before this pass with an id up to `stop` was walked past
            self.scanned = int(np.count_nonzero(self.pending[head_before:stop + 1])) + len(admitted)
        if admitted:
            while self.head < self.arrived and not self.pending[self.head]:
                self.head += 1
            self.n_waiting -= len(admitted)
            self.prefill += admitted
            self.prompt_left += sum(row.prompt_left for row in admitted)
            self.batch_id += 1

    def _walk_fcfs(self, admitted: list[Row], cap: int | None) -> int | None:
        """FCFS from the head while the batch has room for another adapter: every request is
        admitted or stops the walk. Returns the request it stopped at, or None when it reached the
        end of the queue or the batch reached `cap` adapters."""
        chunk, start = 64, self.head
        while True:
            ids = self._pending_from(start, chunk)[:chunk].tolist()
            for r in ids:
                if not self._try_admit(r, admitted):
                    return r
                if self._budget <= 0 or self._seats == 0:  # vLLM's loop ends here, after r
                    return r
                if cap is not None and self.distinct >= cap:
                    return None
            if len(ids) < chunk:
                return None
            start, chunk = ids[-1] + 1, chunk * 4

    def _walk_batch_adapters(self, admitted: list[Row]) -> int | None:
        """The batch has `max_loras` adapters: walk on through the requests of those adapters only,
        in FCFS order (vLLM skips the others; the FCFS walk before admitted every earlier one, so
        their lists start after it). Returns the request it stopped at, or None."""
        queues = self.queues
        heads = [(queues[a][0], a) for a in self.active if queues.get(a)]
        heapq.heapify(heads)
        while heads:
            r, a = heads[0]
            if not self._try_admit(r, admitted):
                return r
            queue = queues[a]
            if queue:
                heapq.heapreplace(heads, (queue[0], a))
            else:
                heapq.heappop(heads)
            if self._budget <= 0 or self._seats == 0:  # vLLM's loop ends here, after r
                return r
        return None

    def _try_admit(self, r: int, admitted: list[Row]) -> bool:
        """Admit request r if it gets a seat, token budget and KV blocks (and its adapter a GPU
        slot); False stops the walk."""
        cache, kv = self.cache, self.kv
        a = self._adapter[r]
        done = self.generated.get(r, 0) if self.generated else 0  # a preempted request recomputes these too
        prompt, out_left = self._prompt[r] + done, self._output[r] - done
        if self._seats == 0 or self._budget < 1:
            return False
        blocks = -(-prompt // kv.block_size)
        cache.pin(a)  # finding KV memory must not evict this request's adapter
        if not kv.can_alloc(blocks):
            cache.unpin(a)
            return False
        if not (cache.resident[a] and not cache.loading[a]):
            if not cache.reserve(a):  # every slot holds an adapter of the batch
                cache.unpin(a)
                return False
            cache.loaded(a)
            self.sync_loads.append(a)  # the engine charges its copy time to the next step
        kv.alloc(blocks)
        cache.touch(a)
        self.admissions += 1
        if cache.fresh[a]:
            cache.fresh[a] = False
            self.misses += 1
        self.pending[r] = False
        self.queues[a].popleft()  # r is the earliest waiting request of its adapter
        admitted.append(Row(r, a, blocks, prompt, out_left))
        self._budget -= min(prompt, self._budget)
        self._seats -= 1
        if self.in_use[a] == 1:  # its first running request
            self.distinct += 1
            self.active.add(a)
        return True

    # --- KV growth and preemption -----------------------------------------------------------
    # A decoding row needs its next block every `block_size` iterations, at iterations of one residue
    # modulo the block size (its class): instead of listing each row under its next iteration (the
    # base scheduler), V1 counts the rows of each class. At iteration T the rows of class T mod
    # block_size need a block each; a row's blocks are those of its prompt plus one per such
    # iteration it has passed, counted when it leaves.

    def _track_growth(self, row: Row) -> None:
        row.grow_at = row.blocks * self.kv.block_size - row.base  # its first such iteration
        self._growing[row.grow_at % self.kv.block_size] += 1

    def _untrack_growth(self, row: Row) -> int:
        size = self.kv.block_size
        self._growing[row.grow_at % size] -= 1
        passed = self.T - 1 - row.grow_at  # it was given blocks at the iterations before this one
        return row.blocks + (passed // size + 1 if passed >= 0 else 0)

    def grow_kv(self) -> bool:
        """Give the rows of this iteration's class their next block, preempting the newest rows while
        memory is short (once per iteration). Returns True when some row was preempted."""
        if self._grown_at == self.T:
            return False
        preempted = False
        while self.num_running:
            need = self._growing[self.T % self.kv.block_size]
            if need == 0 or self.kv.alloc(need):
                break
            self._preempt_last()
            preempted = True
        self._grown_at = self.T
        return preempted

    def decode_headroom(self) -> int | float:
        size, T, growing = self.kv.block_size, self.T, self._growing
        # the first iteration after T whose class has rows: class (T + d) mod size needs blocks at T + d
        return next((d for d in range(1, size + 1) if growing[(T + d) % size]), np.inf)

    def _preempt_last(self) -> Row:
        row = super()._preempt_last()
        queue = self.queues.setdefault(row.adapter, deque())
        if not queue or row.rid < queue[0]:
            queue.appendleft(row.rid)
        else:
            queue.insert(bisect.bisect_left(queue, row.rid), row.rid)
        return row
