"""The measured executor: every step the scheduler forms really runs through the decoder and the
strategy's LoRA kernels on the device at hand, and the SimPy clock advances by its measured time.

Times: CUDA events around the forward on a GPU; `perf_counter` around it on the CPU (where PyTorch
runs synchronously). The KV cache holds each row's context (its values are whatever the cache
holds: the work, not the numbers, is what is timed); rows are released after the step, since a
`Step` carries no request identity. Host work (packing, adapter residency, CUDA-graph capture, the
first run of a new shape, which compiles Triton kernels) happens outside the timed region.

Adapter loads are real copies of the same bytes from host memory (pinned when CUDA is there), in
the same number of transfers, issued on a side stream; the simulator decides whether a strategy
overlaps them with compute.
"""

from __future__ import annotations

import gc
import time
from collections import Counter

import numpy as np
import torch

from lorabench.errors import LorabenchError
from lorabench.model.batch import SeqWork
from lorabench.model.decoder import Decoder, default_dtype
from lorabench.model.engine import Engine
from lorabench.model.serving import Residency, ServingSetup, build_engine, kv_tokens_per_page, page_size
from lorabench.presets import DeviceSpec, ModelShape
from lorabench.sim.executor import Step

LOAD_STAGING_CAP = 512 * 2**20  # larger loads copy this much and scale (copies are linear in bytes)
CPU_KV_BYTES = 64 * 2**20  # KV cache of a measured run on the CPU
GPU_MEMORY_FRACTION = 0.85  # of the memory free after weights and adapters, for the KV cache

_decoders: dict[tuple, Decoder] = {}  # one decoder per (model, device), shared by a run's strategies
_live: list["MeasuredExecutor"] = []  # the strategies of a run execute one after another


def torch_device(config) -> torch.device:
    """The device a measured run executes on: RunConfig.torch_device, else CUDA when present."""
    name = config.torch_device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LorabenchError(f"torch_device {name}: CUDA is not available here")
    return device


CPU_MAX_PARAMS = 10**9  # a real-size decoder on the CPU would take hours per run


def check_fits_cpu(model: ModelShape, device: torch.device) -> None:
    if device.type == "cpu" and model.params > CPU_MAX_PARAMS:
        raise LorabenchError(f"model {model.name} ({model.params / 1e9:.1f} B parameters) is too large to execute on "
                             f"the CPU: use --model tiny here, or a GPU")


def make_executor(config, model: ModelShape, device: DeviceSpec, lora) -> "MeasuredExecutor":
    """The runner's entry point (`RunConfig.executor == "measured"`): an engine for `lora.strategy`
    with the run's adapters (`config.adapters`: a PEFT collection; `config.compressed`: a compressed
    collection; else random weights of the run's ranks and modules) on `torch_device(config)`."""
    from lorabench.model.collections import compressed_weights, peft_adapters

    while _live:  # free the previous strategy's KV cache and adapters before sizing this one's
        _live.pop().close()
    dev = torch_device(config)
    check_fits_cpu(model, dev)
    if dev.type == "cpu":
        torch.set_num_threads(1)  # CPU runs are smoke tests: one thread keeps times steady on shared machines
    modules, n = tuple(lora.target_modules), len(lora.ranks)
    adapters = peft_adapters(config.adapters, model, modules, n) if config.adapters else None
    compressed = None
    if lora.strategy == "compressed" and config.compressed:
        compressed = compressed_weights(config.compressed, model, modules, n)
        if compressed.rank != lora.compressed_rank:
            raise LorabenchError(f"--compressed {config.compressed}: its shared rank is {compressed.rank}, the "
                                 f"workload's [adapters] compressed_rank is {lora.compressed_rank}; make them agree")
    ranks = tuple(a.rank for a in adapters) if adapters else tuple(int(r) for r in lora.ranks)
    requests = config.load_workload().generate()
    max_context = int((requests.prompt_tokens + requests.output_tokens).max())
    key = (model.name, str(dev), config.seed)
    if key not in _decoders:
        _decoders.clear()  # one model at a time on the device
        _decoders[key] = Decoder(model, dev, default_dtype(dev), seed=config.seed or 0)
    decoder = _decoders[key]
    slots = min(n, max(lora.resident_slots, config.max_num_seqs))
    setup = ServingSetup(
        model, lora.strategy, ranks, modules, device=str(dev), slots=slots, block_size=config.block_size,
        max_seqs=config.max_num_seqs, compressed_rank=lora.compressed_rank,
        cluster_of=None if lora.clusters is None else tuple(int(c) for c in lora.clusters),
        cuda_graphs=config.cuda_graphs, max_context=max_context, seed=config.seed or 0,
        kv_tokens=_kv_tokens(model, dev, lora.strategy, ranks, modules, slots, bound=config.max_num_seqs * max_context),
    )
    engine, residency = build_engine(setup, adapters, compressed, model=decoder)
    executor = MeasuredExecutor(engine, residency, seed=config.seed or 0)
    executor.warm_up()
    _live.append(executor)
    return executor


def _kv_tokens(model: ModelShape, dev: torch.device, strategy: str, ranks, modules, slots: int, bound: int) -> int:
    """KV-cache tokens: what the run can use at most (`bound`), within the device's free memory
    (after the adapters the strategy keeps) or, on the CPU, CPU_KV_BYTES."""
    elem = 2 if dev.type == "cuda" else 4
    if strategy == "paged":
        page = page_size(model, modules)
        tokens_per_page, pages_per_token = kv_tokens_per_page(model, page)
        per_token = model.layers * page * elem * pages_per_token // tokens_per_page
    else:
        per_token = model.layers * 2 * model.kv_dim * elem
    if dev.type != "cuda":
        return max(1, min(bound, CPU_KV_BYTES // per_token))
    adapter_bytes = slots * model.lora_params(max(ranks), modules) * elem
    free = torch.cuda.mem_get_info(dev)[0] - adapter_bytes
    return max(1, min(bound, int(GPU_MEMORY_FRACTION * free) // per_token))


class MeasuredExecutor:
    name = "measured"

    def __init__(self, engine: Engine, residency: Residency, seed: int = 0):
        self.engine, self.residency = engine, residency
        self.device = engine.model.device
        self.records: list[dict] = []  # one per step: batch_size, tokens, prefill_tokens, mode, seconds
        self.load_records: list[dict] = []
        self._gen = torch.Generator().manual_seed(seed)
        self._next_seq = 0
        self._warm: set[tuple] = set()
        self._host = self._dev = None
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    # ---- steps -------------------------------------------------------------------------------

    def step(self, step: Step) -> float:
        if step.batch_size == 0:
            return 0.0
        indices = self.residency.pin(step.adapters)
        vocab = self.engine.model.shape.vocab
        seqs = []
        for n, ctx, index in zip(step.tokens.tolist(), step.context_lens.tolist(), indices):
            sid, self._next_seq = self._next_seq, self._next_seq + 1
            if ctx > n:
                self.engine.kv.reserve(sid, ctx - n)  # the context already in the cache
            seqs.append(SeqWork(sid, torch.randint(vocab, (n,), generator=self._gen).tolist(), index))
        try:
            fb = self.engine.prepare(seqs)
            mode = self.engine.mode_of(fb)
            key = (mode, fb.num_seqs if mode == "cuda-graph" else _pow2(fb.num_tokens), fb.num_decode == fb.num_seqs)
            if key not in self._warm:  # first of its kind: compile and warm caches, untimed
                self.engine.run(fb)
                self._warm.add(key)
            compiled = _jit_compiles.count
            seconds = self._timed(lambda: self.engine.run(fb))
            if _jit_compiles.count != compiled:  # a Triton kernel compiled inside the timed run: time it again
                seconds = self._timed(lambda: self.engine.run(fb))
        finally:
            for s in seqs:
                self.engine.release(s.seq_id)
        self.records.append(dict(batch_size=step.batch_size, tokens=step.num_tokens, prefill_tokens=step.prefill_tokens,
                                 distinct_adapters=step.distinct_adapters, mode=mode, seconds=seconds))
        return seconds

    def warm_up(self) -> None:
        """A prefill and a decode step, untimed and unrecorded: first-call costs (allocator growth,
        library initialization) must not land on the first strategy's first steps."""
        n = min(len(self.residency.bank), 4)
        for tokens in ([16] * n, [1] * n):
            self.engine.run(self.engine.prepare([SeqWork(-2 - i, [0] * t, self.residency.index(i))
                                                 for i, t in enumerate(tokens)]))
        for i in range(n):
            self.engine.release(-2 - i)

    def _timed(self, fn) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    # ---- loads -------------------------------------------------------------------------------

    def load(self, nbytes: int, copies: int = 1) -> float:
        """Copy `nbytes` host->device in `copies` transfers and time it."""
        if nbytes <= 0:
            return 0.0
        moved = min(nbytes, LOAD_STAGING_CAP)
        self._ensure_staging(moved)
        copies = max(1, min(copies, moved))
        bounds = np.linspace(0, moved, copies + 1).astype(np.int64).tolist()
        if self._copy_stream is not None:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(self._copy_stream):
                start.record()
                for a, b in zip(bounds, bounds[1:]):
                    self._dev[a:b].copy_(self._host[a:b], non_blocking=True)
                end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            for a, b in zip(bounds, bounds[1:]):
                self._dev[a:b].copy_(self._host[a:b])
            seconds = time.perf_counter() - t0
        seconds *= nbytes / moved
        self.load_records.append(dict(nbytes=nbytes, copies=copies, seconds=seconds))
        return seconds

    def _ensure_staging(self, nbytes: int) -> None:
        if self._host is None or self._host.numel() < nbytes:
            size = max(nbytes, 2**20)
            self._host = torch.ones(size, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
            self._dev = torch.empty(size, dtype=torch.uint8, device=self.device)

    @property
    def adapter_loads(self) -> int:
        """Adapters this executor copied into the strategy's device slots."""
        return self.residency.loads if self.residency is not None else self._loads_at_close

    def close(self) -> None:
        """Drop the device memory this executor holds (its records stay)."""
        self._loads_at_close = self.adapter_loads
        self.engine = self.residency = self._dev = self._host = None
        gc.collect()  # the engine and its CUDA graphs refer to each other
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- what ran ----------------------------------------------------------------------------

    @property
    def device_label(self) -> str:
        """The device and how its steps ran, for the results: e.g. 'h200 (cuda-graph 412, eager 37 steps)'."""
        from lorabench.presets import device_name

        counts = Counter(r["mode"] for r in self.records)
        modes = ", ".join(f"{m} {n}" for m, n in sorted(counts.items())) or "no"
        return f"{device_name(self.device)} ({modes} steps)"


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class _CompileCounter:
    """Counts Triton JIT compilations through triton's post-compile hook (triton >= 3.4; elsewhere
    it stays 0), chained after any hook already set."""

    def __init__(self) -> None:
        self.count = 0
        try:
            from triton import knobs

            runtime = knobs.runtime
            previous = runtime.jit_post_compile_hook
        except (ImportError, AttributeError):
            return

        def hook(*args, **kwargs):
            self.count += 1
            return previous(*args, **kwargs) if previous else None

        runtime.jit_post_compile_hook = hook


_jit_compiles = _CompileCounter()
