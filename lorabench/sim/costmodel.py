"""The modeled executor: a roofline of one Llama/Mistral-shaped decoder step, per strategy.

Each kernel takes max(FLOPs / (peak x eff), bytes / (bandwidth x eff)) plus a fixed cost (launch from
a CUDA graph, ramp-up and tail); a step is the sum over the kernels of every layer, the LM head and a
per-step host overhead. The base model per layer: RMSNorm, fused QKV GEMM, RoPE, attention (KV bytes
read, query-key FLOPs), O GEMM, residual + RMSNorm, fused gate/up GEMM, SiLU-mul, down GEMM, residual.

LoRA adds, per target module:
- single:     a shrink and an expand GEMM (two kernels) on the one adapter.
- per-lora:   segmented shrink/expand (Punica/vLLM). Reads every distinct adapter of the batch once,
              plus a cost per segment, per segment x token (the grid spans token tiles x segments)
              and, as vLLM's default launch does, per *resident slot* the batch does not use.
- paged:      the same segmented kernels with a grid sized to the distinct adapters (S-LoRA
              launches per segment), rows gathered by page index (`paged_gather` slowdown).
- compressed: x @ V per cluster present, a per-token R x R product with the gathered S_i, @ U^T
              per cluster (three kernels; each cluster present is one more segment).

`Efficiency` holds every factor and LoRA fixed cost; a base-model kernel's fixed cost is the device's
`launch_overhead_s`. The defaults are calibrated on the H200 figures of anchors.md (torch 2.11, CUDA
graphs): a decoder layer's decode step at batch 1/16/64/256 (measured 163.7 / 169.2 / 200.4 / 344.7 us,
modeled 165 / 173 / 200 / 354; with single LoRA 207 / 215 / 246 / 392 measured, 210 / 219 / 247 / 405
modeled), the single-LoRA kernels (12.8 us at M = 1, 20.4 us at M = 1024) and the vLLM multi-LoRA
kernels (a least-squares fit of the 13 rows: 14.1 + 0.36 D + 0.0059 M + 0.0007 D M us with the grid
sized to the distinct adapters, plus ~0.07 (1 + M / 256) us per unused slot with vLLM's default grid).
A measured profile (`lorabench profile`, issue 5) replaces any of them: `apply_profile` takes the
fields a profile JSON names ({"device": {...}, "efficiency": {...}}) and keeps the rest; its
`step_scale` / `load_scale` multiply every modeled step / load (a measured-over-modeled fit).

Kernel physics: a profile with a "kernels" object (`lorabench profile --from-vidur`; the shipped
h100 and a100 profiles) replaces the base model's roofline by `physics.py`: GEMMs in waves of tiles
over the SMs, elementwise kernels by their real bytes. Attention and LoRA stay on the roofline, with
the fitted fractions of the datasheet peaks as the ceilings `Efficiency` applies to (as the h200's
are measured ceilings). Without one (the h200 preset, whose efficiencies were calibrated on measured
H200 figures with this roofline) nothing changes.

Tensor parallelism (`Parallel`, lorabench/parallel.py): every kernel is one GPU's slice (sharded
GEMMs and LoRA, its attention heads and KV bytes), plus two all-reduces per layer and the logits'
gather over the device's link. FP8 weights halve the base GEMMs' weight bytes and run at the FP8
rate; an FP8 KV cache halves the bytes attention reads.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorabench.errors import LorabenchError
from lorabench.outputs.results import read_json
from lorabench.parallel import ACTIVATION_BYTES, Parallel, shard
from lorabench.presets import DeviceSpec, ModelShape
from lorabench.sim import physics
from lorabench.sim.executor import Step
from lorabench.sim.physics import KernelPhysics


@dataclass(frozen=True)
class Efficiency:
    """Fractions of the device's ceilings kernels reach, and fixed costs (seconds)."""

    gemm_flops: float = 0.95  # dense GEMMs, fraction of DeviceSpec.bf16_flops (measured on 8192^3)
    memory: float = 0.90  # weight / activation streaming, fraction of DeviceSpec.mem_bandwidth
    attention_memory: float = 1.00  # decode attention reading the KV cache (reads only: at the copy rate)
    attention_flops: float = 0.60  # prefill attention (flash kernels reach less than a GEMM)
    elementwise_kernels: int = 5  # per layer: 2 norms, RoPE, SiLU-mul, residual
    lora_kernel_s: float = 5.5e-6  # fixed cost of one LoRA kernel (12.8 us for two at M = 1; 43 us per layer)
    lora_segment_s: float = 0.29e-6  # per distinct adapter per module (0.36 us fit minus its bytes)
    lora_segment_token_s: float = 0.70e-9  # per (segment x token of the batch) per module
    lora_empty_slot_s: float = 0.07e-6  # per-lora default grid: per unused resident slot per module
    paged_gather: float = 1.10  # paged kernels vs per-lora ones (page-table gather); assumed, not measured
    lora_memory: float = 0.90  # LoRA shrink and expand kernels, fraction of mem_bandwidth (default: as `memory`)
    step_overhead_s: float = 0.0  # host-side scheduling and sampling per step (CUDA graphs: ~0)
    # Overall corrections a profile may fit (measured / modeled), applied to every step and load.
    step_scale: float = 1.0
    load_scale: float = 1.0


def _replace_fields(obj, values: dict, where: str):
    physics.check_fields(obj, values, where)
    for key, value in values.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise LorabenchError(f"{where}: field {key} must be a finite number >= 0, got {value!r}")
        # rates, sizes, fractions and scales divide or multiply every time: only fixed costs and counts may be 0
        if value == 0 and not (key.endswith("_s") or key == "elementwise_kernels"):
            raise LorabenchError(f"{where}: field {key} must be > 0, got {value!r}")
    return dataclasses.replace(obj, **values)


# Where measured profiles and engine files are looked for: the working directory's results/, then the checkout's.
RESULTS_DIRS = (Path("results"), Path(__file__).resolve().parents[2] / "results")


def find_result(kind: str, name: str) -> Path | None:
    """results/<kind>/<name> from the first of RESULTS_DIRS that has it, if any."""
    return next((d / kind / name for d in RESULTS_DIRS if (d / kind / name).is_file()), None)


def find_profile(device: str, model: str) -> Path | None:
    """The measured profile <device>-<model>.json (`lorabench profile`), if one exists."""
    return find_result("profiles", f"{device}-{model}.json")


# The top-level sections a profile JSON may hold (fidelity/calibration.py writes efficiency_by_strategy,
# points and meta; fidelity/vidur_fit.py writes kernels; the GPU check adds provenance); any other key is a
# typo that would otherwise be ignored.
# (an engine file from `lorabench calibrate` is a profile too: its engine and fit sections are read by
# sim/engine_model.py, its device and efficiency here)
PROFILE_SECTIONS = ("device", "efficiency", "kernels", "efficiency_by_strategy", "points", "meta", "provenance",
                    "engine", "fit")


def default_profile(device: str, model: str) -> Path | None:
    """The profile a modeled run uses unless told otherwise: the measured one of this device and
    model, else the device's kernel physics fitted to Vidur's measurements (<device>-vidur.json,
    shipped for h100 and a100), else none (the preset's roofline)."""
    return find_profile(device, model) or find_profile(device, "vidur")


def load_profile(path: str | Path) -> dict:
    """A profile JSON: {"device": {DeviceSpec fields}, "efficiency": {Efficiency fields}}, both optional."""
    path = Path(path)
    data = read_json(path, "profile")
    if not isinstance(data, dict) or not all(isinstance(data.get(k, {}), dict) for k in ("device", "efficiency")):
        raise LorabenchError(f"profile {path}: expected an object with optional objects device and efficiency")
    unknown = sorted(set(data) - set(PROFILE_SECTIONS))
    if unknown:
        raise LorabenchError(f"profile {path}: unknown section(s) {', '.join(map(repr, unknown))}; expected among "
                             f"{', '.join(PROFILE_SECTIONS)}")
    return {"source": str(path), **data}


def apply_profile(profile: dict, device: DeviceSpec, efficiency: Efficiency) -> tuple[DeviceSpec, Efficiency]:
    """The device and efficiency with the fields a profile names replaced (the rest kept)."""
    source = profile.get("source", "profile")
    device_fields = {k: v for k, v in profile.get("device", {}).items() if k not in ("name", "measured")}
    where = f"profile {source}: device"
    if "gemm_tiles" in device_fields:  # a list of [rows, cols]
        tiles = device_fields.pop("gemm_tiles")
        if not isinstance(tiles, list) or not tiles:
            raise LorabenchError(f"{where}: field gemm_tiles must be a list of [rows, cols], got {tiles!r}")
        device = dataclasses.replace(device, gemm_tiles=tuple(physics.tile_pair(t, f"{where}: gemm_tiles") for t in tiles))
    if "interconnect" in device_fields:  # words
        device = dataclasses.replace(device, interconnect=str(device_fields.pop("interconnect")))
    if device_fields:
        device = _replace_fields(device, device_fields, where)
    efficiency = _replace_fields(efficiency, profile.get("efficiency", {}), f"profile {source}: efficiency")
    return device, efficiency


def profile_physics(profile: dict) -> KernelPhysics | None:
    """A profile's kernel physics ("kernels" object), or None: the plain roofline."""
    kernels = profile.get("kernels")
    if kernels is None:
        return None
    if not isinstance(kernels, dict):
        raise LorabenchError(f"profile {profile.get('source', 'profile')}: kernels must be an object")
    return KernelPhysics.from_dict(kernels, f"profile {profile.get('source', 'profile')}: kernels")


def make_executor(config, model: ModelShape, device: DeviceSpec, lora: "LoraSetup") -> "ModeledExecutor":
    """The runner's entry point (`RunConfig.executor == "modeled"`); `device` already has the
    profile's device figures, this applies its efficiencies and kernel physics."""
    efficiency, kernel_physics = Efficiency(), None
    if config.profile is not None:
        profile = load_profile(config.profile)
        _, efficiency = apply_profile(profile, device, efficiency)
        # A measured profile (lorabench.fidelity.calibration) also fits each strategy's kernels apart.
        by_strategy = profile.get("efficiency_by_strategy", {}).get(lora.strategy, {})
        efficiency = _replace_fields(efficiency, by_strategy, f"profile {config.profile}: {lora.strategy} efficiency")
        kernel_physics = profile_physics(profile)
    return ModeledExecutor(model, device, lora, efficiency, parallel=config.parallel, physics=kernel_physics)


@dataclass(frozen=True)
class LoraSetup:
    """What the LoRA cost needs to know of the strategy's adapters."""

    strategy: str
    ranks: np.ndarray  # rank of every adapter
    target_modules: tuple[str, ...]
    compressed_rank: int = 64
    clusters: np.ndarray | None = None  # cluster of every adapter (compressed)
    resident_slots: int = 1  # per-lora: slots the default grid spans


class ModeledExecutor:
    """Predicts step and load times of `model` on `device` for one strategy (see module docstring)."""

    name = "modeled"

    def __init__(self, model: ModelShape, device: DeviceSpec, lora: LoraSetup,
                 efficiency: Efficiency | None = None, dtype_bytes: int = 2, parallel: Parallel | None = None,
                 physics: KernelPhysics | None = None):
        self.model, self.device, self.lora = model, device, lora
        self.eff = efficiency or Efficiency()
        self.dtype_bytes = dtype_bytes
        self.parallel = parallel or Parallel()
        self.parallel.check_device(device)
        self.shard = sh = shard(model, self.parallel.tp)  # what one GPU computes
        self.physics = physics  # None: the base model on the plain roofline
        self._kernel_s = device.launch_overhead_s  # fixed cost of one base-model kernel
        # The ceilings Efficiency's fractions apply to: measured ones (the h200 preset's matmul and copy
        # figures, on which they were calibrated), or with kernel physics the datasheet peaks times the
        # fractions its fit found (attention and LoRA kernels run on these).
        flops, fp8_flops, bandwidth = device.bf16_flops, device.fp8_flops, device.mem_bandwidth
        if physics is not None:
            flops, fp8_flops = flops * physics.gemm_flops, fp8_flops * physics.gemm_flops
            bandwidth *= physics.gemm_memory
        self._flops_rate = flops * self.eff.gemm_flops
        self._fp8_flops_rate = fp8_flops * self.eff.gemm_flops
        self._byte_rate = bandwidth * self.eff.memory
        self._lora_byte_rate = bandwidth * self.eff.lora_memory
        self._attention_flops_rate = flops * self.eff.attention_flops
        self._attention_byte_rate = bandwidth * self.eff.attention_memory
        h, kv, inter = model.hidden, sh.kv_dim, sh.intermediate
        # Base GEMMs of one layer as (d_in, d_out), fused as serving engines run them (one GPU's slices).
        self._q_dim = q = sh.q_dim  # a computed property: read once, not per step
        self._gemms = ((h, q + 2 * kv), (q, h), (h, 2 * inter), (inter, h))
        self._kv_dim, self._kv_bytes = kv, self.parallel.kv_bytes
        # LoRA shrink and expand widths per module on one GPU (A's d_in, B's d_out; parallel.py).
        self._modules = tuple(sh.lora_elements(m) for m in lora.target_modules)
        self._uniform_rank = len(np.unique(lora.ranks)) == 1
        self._max_rank = int(lora.ranks.max())
        self._n_clusters = 1 if lora.clusters is None else int(lora.clusters.max()) + 1
        # Per adapter, as lists: read for a batch's few distinct adapters at a time.
        self._rank_of = lora.ranks.tolist()
        self._cluster_of = None if lora.clusters is None else lora.clusters.tolist()
        self._memo: dict[tuple, float] = {}
        self._batch_figure: tuple = (None, 0)  # (batch_id, value) of `_of_batch`
        self._last_ids: frozenset[int] = frozenset()  # `_clusters_present`: the last batch's adapters
        self._cluster_counts = [0] * self._n_clusters  # and how many of them each cluster has

    # --- roofline pieces ------------------------------------------------------------------

    def _kernel(self, flops: float, nbytes: float, fixed: float, byte_rate: float | None = None) -> float:
        return max(flops / self._flops_rate, nbytes / (byte_rate or self._byte_rate)) + fixed

    def _gemm(self, m: int, d_in: int, d_out: int, fixed: float, weight_copies: float = 1.0) -> float:
        """y (m x d_out) = x (m x d_in) @ W^T, reading W `weight_copies` times."""
        b = self.dtype_bytes
        return self._kernel(2.0 * m * d_in * d_out, b * (weight_copies * d_in * d_out + m * (d_in + d_out)), fixed)

    def _base_gemm(self, m: int, d_in: int, d_out: int) -> float:
        """A base-model GEMM on the roofline, in the weights' format (FP8: its rate, one byte per
        weight and input activation, a bf16 output)."""
        if self.parallel.weight_dtype == "bf16":
            return self._gemm(m, d_in, d_out, self._kernel_s)
        nbytes = d_in * d_out + m * (d_in + ACTIVATION_BYTES * d_out)
        return max(2.0 * m * d_in * d_out / self._fp8_flops_rate, nbytes / self._byte_rate) + self._kernel_s

    def layer_seconds(self, tokens: int) -> float:
        """One decoder layer's non-attention kernels (GEMMs, norms, RoPE, SiLU-mul, residual) for
        `tokens` tokens on one GPU, without communication: what Vidur's profiles measure."""
        return self._dense_parts(tokens, 1)[0]

    def _dense_parts(self, tokens: int, rows: int) -> tuple[float, float, float, float]:
        """One layer's non-attention kernels and its communication (two all-reduces); the LM head for
        `rows` sequences and the gather of its logits (communication is 0 on one GPU)."""
        key = ("dense", tokens, rows)
        parts = self._memo.get(key)
        if parts is None:
            h, b, e, sh, tp = self.model.hidden, self.dtype_bytes, self.eff, self.shard, self.parallel.tp
            if self.physics is None:
                layer = sum(self._base_gemm(tokens, d_in, d_out) for d_in, d_out in self._gemms)
                # Elementwise kernels each read and write about a hidden-sized row per token (SiLU-mul
                # reads two intermediate rows and writes one).
                elementwise = (4 * tokens * h * b + 3 * tokens * sh.intermediate * b) / self._byte_rate
                layer += elementwise + e.elementwise_kernels * self._kernel_s
                head = self._gemm(rows, h, sh.vocab, self._kernel_s)
            else:
                layer = float(sum(physics.layer_kernels(tokens, sh, self.device, self.physics, self.parallel).values()))
                head = float(physics.gemm_seconds(rows, sh.vocab, h, self.device, self.physics))
            comm = 2 * physics.all_reduce_seconds(sh.all_reduce_bytes(tokens), tp, self.device)
            gather = physics.gather_seconds(rows * self.model.vocab * ACTIVATION_BYTES, tp, self.device)
            parts = self._memo[key] = (layer, comm, head, gather)
        return parts

    def _dense_part(self, tokens: int, rows: int) -> float:
        """Everything but attention and LoRA, for `tokens` tokens and `rows` sequences (LM head)."""
        key = ("dense total", tokens, rows)
        seconds = self._memo.get(key)
        if seconds is None:
            layer, comm, head, gather = self._dense_parts(tokens, rows)
            seconds = self.model.layers * layer + head + self.eff.step_overhead_s
            if self.parallel.tp > 1:  # the layers' all-reduces and the logits' gather
                seconds += self.model.layers * comm + gather
            self._memo[key] = seconds
        return seconds

    def _attention(self, step: Step) -> float:
        """One layer's attention: the query-key pairs of every row (see `Step`) and the KV bytes it reads."""
        return self._attention_of(float(step.context_sum), step.twice_attention_pairs / 2)

    def _attention_of(self, context, pairs, maximum=max):
        """`_attention` from the batch's total context and query-key pairs: floats, or arrays of them
        with `maximum=np.maximum` (the same operations in the same order, so the same values)."""
        kv_bytes = context * 2 * self._kv_dim * self._kv_bytes
        flops = 4.0 * self._q_dim * pairs
        return maximum(flops / self._attention_flops_rate, kv_bytes / self._attention_byte_rate) + self._kernel_s

    # --- LoRA per strategy ------------------------------------------------------------------

    def _lora(self, step: Step) -> float:
        """LoRA time of one layer (all target modules)."""
        m, strategy = step.num_tokens, self.lora.strategy
        if strategy == "compressed":
            present = self._of_batch(step, self._clusters_present) if self._n_clusters > 1 else 1
            key = (m, present, step.distinct_adapters)
            seconds = self._memo.get(key)
            if seconds is None:
                seconds = self._memo[key] = self._compressed(m, present, step.distinct_adapters)
            return seconds
        if strategy == "single":
            segments, rank, rank_sum = 1, self._max_rank, self._max_rank
        else:
            segments = step.distinct_adapters
            if self._uniform_rank or strategy == "per-lora":  # per-lora slots are padded to max_lora_rank
                rank, rank_sum = self._max_rank, segments * self._max_rank
            else:
                rank_sum = self._of_batch(step, self._rank_sum)
                rank = rank_sum / segments
        key = (m, segments, rank_sum)
        seconds = self._memo.get(key)
        if seconds is None:
            seconds = self._memo[key] = self._segmented(m, segments, rank, rank_sum, strategy)
        return seconds

    def _clusters_present(self, adapter_ids: frozenset[int]) -> int:
        """Clusters with an adapter in the batch: counted from the last batch's by the adapters that
        came and went (a batch differs from the one before by a request or two)."""
        last, counts = self._last_ids, self._cluster_counts
        came, went = adapter_ids - last, last - adapter_ids
        for a in came:
            counts[self._cluster_of[a]] += 1
        for a in went:
            counts[self._cluster_of[a]] -= 1
        self._last_ids = adapter_ids
        return self._n_clusters - counts.count(0)

    def _rank_sum(self, adapter_ids: frozenset[int]) -> int:
        return sum(self._rank_of[a] for a in adapter_ids)

    def _of_batch(self, step: Step, figure) -> int:
        """figure(the batch's distinct adapter ids), computed once per batch (`Step.batch_id`). A
        strategy needs one such figure (compressed: clusters present; paged, mixed ranks: rank sum)."""
        if step.batch_id is None or step.batch_id != self._batch_figure[0]:
            self._batch_figure = (step.batch_id, figure(step.adapter_ids))
        return self._batch_figure[1]

    def _compressed(self, m: int, present: int, distinct: int) -> float:
        """x @ V, the per-token S_i product, @ U^T, for `present` clusters and `distinct` adapters."""
        r, e, b = self.lora.compressed_rank, self.eff, self.dtype_bytes
        total = 0.0
        for d_in, d_out in self._modules:
            down = self._kernel(2.0 * m * d_in * r, b * (present * d_in * r + m * (d_in + r)), e.lora_kernel_s)
            # S_i gathered per token ([m, r, r]) then a batched product: reads S of the distinct
            # adapters, writes and reads the gathered copy.
            mid = self._kernel(2.0 * m * r * r, b * (distinct * r * r + 2 * m * r * r + 2 * m * r), e.lora_kernel_s)
            up = self._kernel(2.0 * m * r * d_out, b * (present * r * d_out + m * (r + 2 * d_out)), e.lora_kernel_s)
            total += down + mid + up + present * e.lora_segment_s
        return total

    def _segmented(self, m: int, segments: int, rank: float, rank_sum: float, strategy: str) -> float:
        """Shrink + expand over `segments` same-adapter segments for every target module."""
        e, b = self.eff, self.dtype_bytes
        total = 0.0
        for d_in, d_out in self._modules:
            # shrink reads x and the A of every segment; expand reads the B's and adds into y
            shrink = self._kernel(2.0 * m * d_in * rank, b * (rank_sum * d_in + m * (d_in + rank)), e.lora_kernel_s,
                                  self._lora_byte_rate)
            expand = self._kernel(2.0 * m * rank * d_out, b * (rank_sum * d_out + m * (rank + 2 * d_out)),
                                  e.lora_kernel_s, self._lora_byte_rate)
            grid = segments * (e.lora_segment_s + m * e.lora_segment_token_s)
            if strategy == "per-lora":
                unused = max(self.lora.resident_slots + 1 - segments, 0)
                grid += unused * e.lora_empty_slot_s * (1 + m / 256)
            elif strategy == "paged":
                grid *= e.paged_gather
                shrink, expand = shrink * e.paged_gather, expand * e.paged_gather
            total += shrink + expand + grid
        return total

    # --- the Executor protocol --------------------------------------------------------------

    def step(self, step: Step) -> float:
        if step.batch_size == 0:
            return 0.0
        return self._step_time(self._dense_part(step.num_tokens, step.batch_size), self._attention(step),
                               self._lora(step))

    def repeat_decode(self, step: Step, count: int) -> list[float]:
        """Durations of the `count` decode iterations that follow the decode-only `step`, each with
        every context one token longer: equal, bit for bit, to calling `step` on each (the engine
        uses it to apply a run of identical iterations at once)."""
        dense, lora = self._dense_part(step.num_tokens, step.batch_size), self._lora(step)
        if count <= 32:  # a few: Python floats cost less than numpy's per-call overhead
            contexts = [float(step.context_sum + step.batch_size * j) for j in range(1, count + 1)]
            return [self._step_time(dense, self._attention_of(c, c), lora) for c in contexts]
        contexts = (step.context_sum + step.batch_size * np.arange(1, count + 1)).astype(np.float64)
        return self._step_time(dense, self._attention_of(contexts, contexts, np.maximum), lora).tolist()

    def _step_time(self, dense, attention, lora):
        """A step from its dense part and one layer's attention and LoRA (floats or arrays)."""
        return (dense + self.model.layers * (attention + lora)) * self.eff.step_scale

    def breakdown(self, step: Step) -> dict[str, float]:
        """`step`'s modeled seconds by part (each x step_scale; they add up to `step(step)` but for
        rounding): the base model's layers, attention, LoRA, communication, the LM head, overheads."""
        layer, comm, head, gather = self._dense_parts(step.num_tokens, step.batch_size)
        n, scale = self.model.layers, self.eff.step_scale
        parts = {"base model layers": n * layer, "attention": n * self._attention(step), "lora": n * self._lora(step),
                 "communication": n * comm + gather, "lm head": head, "overheads": self.eff.step_overhead_s}
        return {k: v * scale for k, v in parts.items()}

    def load(self, nbytes: int, copies: int = 1) -> float:
        return (nbytes / self.device.host_link_bandwidth + copies * self.device.copy_latency_s) * self.eff.load_scale
