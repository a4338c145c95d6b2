"""What a serving engine adds to the kernels, named in one place: host time per step, the CUDA-graph
limit, the memory it reserves, the size of its LoRA slots, and which scheduling rules it follows.

The kernels and links stay in `costmodel.py`; `EngineModel` holds the rest, each term a physical
quantity with a unit and a default, read from and written to an engine JSON file
({"engine": {...}, "device": {...}, "efficiency": {...}, "fit": {...}}: the engine terms, and the
device figures and kernel factors of `presets.DeviceSpec` / `costmodel.Efficiency` fitted with
them; `lorabench calibrate` writes such files).

Two engines:

- `ideal` (the default): lorabench's idealized server, unchanged: no host time, no reservation,
  adapter slots sized for the adapters' target modules, admission from the first
  `SchedulerConfig.scan_limit` waiting requests, preemption after admission.
- `vllm-v1`: vLLM 0.8.5's V1 engine, read in its source (vllm/v1/core/sched/scheduler.py,
  vllm/v1/worker/gpu_worker.py and gpu_model_runner.py, vllm/lora/models.py and layers.py):
  * admission walks the whole waiting queue each step, skipping requests whose adapter would exceed
    `max_loras` distinct adapters, until the token budget, the KV cache or a seat runs out
    (`scheduler_v1.py`); a step that had to preempt a running request admits nothing new;
  * the KV cache grows block by block and preemption recomputes (always on in V1), as does chunked
    prefill;
  * memory: KV cache = device x utilization - the profiled peak, and the profile runs one forward
    pass of `max_num_batched_tokens` tokens and the sampler on min(max_num_seqs,
    max_num_batched_tokens) rows of logits with every LoRA slot allocated (`reserved_bytes`);
    CUDA graphs are captured after the KV cache is sized, so their memory comes out of the
    1 - utilization headroom, not out of the KV cache (`cuda_graph_bytes` = 0);
  * a LoRA slot holds A and B for every linear layer vLLM wraps (q, k, v, o, gate, up, down: all of
    them, whatever the adapter targets) at `max_lora_rank`, and for Llama/Mistral also the
    embeddings and lm_head (`lora_slot_bytes`);
  * the LoRA kernels run on every wrapped layer with a grid sized by `max_loras` (the executor's
    `resident_slots`);
  * a request reaches the scheduler `ingress_s` after it arrives (the API server parses and
    tokenizes it and hands it to the engine process, its first token is detokenized and streamed
    back): TTFT includes it, TPOT does not;
  * host time adds to the kernels: 0.8.5 runs schedule(), input preparation, the forward pass,
    sampling and update_from_output one after another in one process, with no overlap of CPU and
    GPU work (`host_s`); a step of more tokens than the largest CUDA-graph capture size runs
    eagerly, its kernels launched one by one from the host while the GPU runs them (`eager_launch_s`:
    a 28-layer step launches ~500 kernels, the LoRA ones from Python at ~15 us each, ~4.5 ms in all,
    which a step that large (tens of ms of GPU work) hides: it shows only if the kernels take less).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorabench.errors import LorabenchError
from lorabench.outputs.results import read_json
from lorabench.presets import ALL_LINEAR, ModelShape
from lorabench.sim.costmodel import RESULTS_DIRS, find_result
from lorabench.sim.executor import Step
from lorabench.sim.physics import check_fields
from lorabench.strategies import Strategy

ENGINES = ("ideal", "vllm-v1")
GIB = 2**30
BF16_BYTES = 2  # LoRA slots and activations are bf16 (vllm-v1 is fitted on bf16 runs only)

# Architectures whose embeddings and lm_head vLLM 0.8.5 wraps with LoRA (their model class declares
# `embedding_modules`); Qwen2's declares none.
LORA_EMBEDDING_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


def term(default: float, unit: str, meaning: str):
    """A field of EngineModel: its default, unit and physical meaning (reports read the last two)."""
    return field(default=default, metadata={"unit": unit, "meaning": meaning})


@dataclass(frozen=True)
class EngineModel:
    """The engine's terms. Times in seconds, memory in bytes; every term of `ideal` is zero."""

    kind: str = "ideal"  # "ideal" or "vllm-v1" (module docstring)
    # --- host time (vllm-v1), added to the kernels' time ---
    step_s: float = term(0.0, "s", "host time of each step: schedule(), building the inputs, update_from_output")
    request_s: float = term(0.0, "s", "host time per request in the batch, each step: its inputs, sampled token, "
                            "output")
    adapter_s: float = term(0.0, "s", "LoRA bookkeeping per distinct adapter in the batch, each step (LoRA "
                            "mapping, set_active_adapters)")
    waiting_scan_s: float = term(0.0, "s", "each waiting request the scheduler walks past (the whole-queue scan)")
    ingress_s: float = term(0.0, "s", "each request once: HTTP, tokenization, hand-off to the engine, and its "
                            "first token's way back (TTFT, not TPOT)")
    eager_launch_s: float = term(0.0, "s", "launching a step's kernels from the host outside a CUDA graph "
                                 "(overlaps them: the step takes the longer)")
    cuda_graph_max_tokens: int = term(512, "tokens", "steps of up to this many tokens replay a captured CUDA graph")
    # --- memory the engine keeps from the KV cache (vllm-v1) ---
    non_torch_bytes: float = term(0.0, "B", "outside torch's allocator at profiling: CUDA context, cuBLAS and "
                                  "NCCL workspaces")
    sampler_bytes_per_logit: float = term(0.0, "B", "peak bytes per (row x vocabulary entry) of the profiled "
                                          "sampler (rows: min(max_num_seqs, max_num_batched_tokens))")
    activation_scale: float = term(1.0, "", "profiled forward pass's peak activations over (3 intermediate + 4 "
                                   "hidden) x 2 bytes per token")
    cuda_graph_bytes: float = term(0.0, "B", "CUDA-graph memory taken from the KV cache (0.8.5 captures after "
                                   "sizing it)")
    lora_extra_vocab_size: int = term(256, "rows", "extra embedding rows per LoRA slot (Llama, Mistral)")

    def __post_init__(self) -> None:
        if self.kind not in ENGINES:
            raise LorabenchError(f"engine kind {self.kind!r}: choose one of {', '.join(ENGINES)}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "kind" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                     or not math.isfinite(value) or value < 0):
                raise LorabenchError(f"engine term {f.name} must be a non-negative number, got {value!r}")

    @property
    def v1(self) -> bool:
        return self.kind == "vllm-v1"

    # --- memory -------------------------------------------------------------------------------

    def lora_slot_bytes(self, model: ModelShape, rank: int) -> int:
        """GPU bytes of one LoRA slot at `rank` (vLLM's stacked A and B of every wrapped layer)."""
        linear = model.lora_params(rank, ALL_LINEAR)
        embeddings = 0
        if model.architecture in LORA_EMBEDDING_ARCHITECTURES:
            extra, h, vocab = self.lora_extra_vocab_size, model.hidden, model.vocab
            padded_vocab = -(-vocab // 256) * 256  # lm_head's B, padded to lora_vocab_padding_size
            # embed_tokens: A (vocab + extra) x r, B h x r, extra embeddings; lm_head: A r x h, B, extra rows
            embeddings = rank * (vocab + extra) + rank * h + extra * h + rank * h + rank * padded_vocab + extra * h
        return (linear + embeddings) * BF16_BYTES

    def activation_bytes(self, model: ModelShape, tokens: int) -> float:
        """Peak activations of a forward pass of `tokens` tokens: the MLP's gate/up output (2 x
        intermediate), its SiLU-mul output (intermediate), and the hidden state, residual and their
        normalized copies (4 x hidden), all live together at the MLP."""
        return self.activation_scale * tokens * (3 * model.intermediate + 4 * model.hidden) * BF16_BYTES

    def reserved_bytes(self, model: ModelShape, max_num_batched_tokens: int, max_num_seqs: int) -> int:
        """Memory the vllm-v1 engine keeps from the KV cache beside weights and LoRA slots (0 for ideal)."""
        if not self.v1:
            return 0
        rows = min(max_num_seqs, max_num_batched_tokens)  # the profiled sampler's logits rows
        return int(self.non_torch_bytes + self.activation_bytes(model, max_num_batched_tokens)
                   + self.sampler_bytes_per_logit * rows * model.vocab + self.cuda_graph_bytes)

    def sized_strategy(self, strategy: Strategy, model: ModelShape, ranks: np.ndarray) -> Strategy:
        """per-lora's slots as this engine sizes them (vllm-v1: every wrapped layer at the largest rank)."""
        if not self.v1 or strategy.name != "per-lora":
            return strategy
        slot = self.lora_slot_bytes(model, int(ranks.max()))
        return dataclasses.replace(strategy, adapter_bytes=np.full(len(ranks), slot, dtype=np.int64))

    def lora_modules(self, strategy: str, target_modules: tuple[str, ...]) -> tuple[str, ...]:
        """The modules whose LoRA kernels run: vLLM runs them on every layer it wraps."""
        return ALL_LINEAR if self.v1 and strategy in ("single", "per-lora") else tuple(target_modules)

    # --- time ---------------------------------------------------------------------------------

    def host_s(self, step: Step, scanned: int) -> float:
        """Host time of one step of `step`'s batch, the scheduler having walked `scanned` waiting requests."""
        return (self.step_s + self.request_s * step.batch_size + self.adapter_s * step.distinct_adapters
                + self.waiting_scan_s * scanned)

    def kernels_s(self, step: Step, kernels: float) -> float:
        """The kernels' time of a step as the engine runs them: above the CUDA-graph size they are
        launched one by one while the GPU runs the earlier ones, so the step takes the longer of the two."""
        return max(kernels, self.eager_launch_s) if step.num_tokens > self.cuda_graph_max_tokens else kernels

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "engine") -> "EngineModel":
        check_fields(cls, data, source, "engine term(s)")
        return cls(**data)


# The defaults of vllm-v1 before any fit: memory terms as reasoned above (the sampler's figure: bf16
# logits 2 + their fp32 copy 4 + softmax probabilities 4 + sampling scratch 4 bytes per logit), the
# eager launch time estimated above, no host time. `lorabench calibrate` fits the host terms and
# the sampler's memory.
VLLM_V1 = EngineModel("vllm-v1", eager_launch_s=4.5e-3, non_torch_bytes=0.5 * GIB, sampler_bytes_per_logit=14.0)


@dataclass(frozen=True)
class EngineFile:
    """An engine JSON file: the engine, the device figures and kernel factors fitted with it, and
    what it was fitted on."""

    engine: EngineModel
    device: dict  # DeviceSpec fields
    efficiency: dict  # costmodel.Efficiency fields
    fit: dict  # provenance and errors (free form)
    source: str = "<memory>"

    def as_profile(self) -> dict:
        """The device and efficiency parts in the form of a `costmodel` profile."""
        return {"source": self.source, "device": dict(self.device), "efficiency": dict(self.efficiency)}

    def to_json(self) -> dict:
        return {"engine": self.engine.to_dict(), "device": self.device, "efficiency": self.efficiency, "fit": self.fit}


DEFAULT_ENGINE_FILE = "vllm-0.8.5-h100-64gb.json"


def default_engine_file() -> Path:
    """The shipped fitted vllm-v1 engine (results/engines/), looked for like profiles are."""
    found = find_result("engines", DEFAULT_ENGINE_FILE)
    if found is None:
        raise LorabenchError(f"--engine vllm-v1: no engine file given and the shipped {DEFAULT_ENGINE_FILE} is not in "
                             f"{' or '.join(str(d / 'engines') for d in RESULTS_DIRS)}; give one with "
                             "--engine-profile FILE")
    return found


def load_engine_file(path: str | Path) -> EngineFile:
    path = Path(path)
    data = read_json(path, "engine file")
    if not isinstance(data, dict) or not isinstance(data.get("engine"), dict):
        raise LorabenchError(f"engine file {path}: expected an object with an object `engine` (and optional "
                             "device, efficiency, fit)")
    parts = {k: data.get(k, {}) for k in ("device", "efficiency", "fit")}
    for key, value in parts.items():
        if not isinstance(value, dict):
            raise LorabenchError(f"engine file {path}: `{key}` must be an object")
    return EngineFile(EngineModel.from_dict(data["engine"], f"engine file {path}"), parts["device"],
                      parts["efficiency"], parts["fit"], str(path))


def resolve_engine(kind: str, engine_file: str | Path | None) -> EngineFile:
    """The engine a run asks for: `ideal` (no file), or vllm-v1 from `engine_file` (default: the shipped one)."""
    if kind not in ENGINES:
        raise LorabenchError(f"--engine {kind}: choose one of {', '.join(ENGINES)}")
    if kind == "ideal":
        if engine_file is not None:
            raise LorabenchError("--engine-profile: only with --engine vllm-v1")
        return EngineFile(EngineModel(), {}, {}, {})
    loaded = load_engine_file(engine_file if engine_file is not None else default_engine_file())
    if not loaded.engine.v1:
        raise LorabenchError(f"engine file {loaded.source}: its engine kind is {loaded.engine.kind!r}, not vllm-v1")
    return loaded


class EngineExecutor:
    """An executor whose steps take the kernels' time (from `inner`, as the engine launches them) plus
    the engine's host time. The scheduler it serves (`bind_scheduler`) says how many waiting requests
    its last pass walked."""

    def __init__(self, inner, engine: EngineModel):
        self.inner, self.engine = inner, engine
        self.name = inner.name
        self._scanned: Callable[[], int] = lambda: 0
        if hasattr(inner, "repeat_decode"):
            self.repeat_decode = self._repeat_decode
        device_label = getattr(inner, "device_label", None)
        if device_label is not None:
            self.device_label = device_label

    def bind_scheduler(self, scheduler) -> None:
        self._scanned = lambda: scheduler.scanned

    def step(self, step: Step) -> float:
        return self.engine.kernels_s(step, self.inner.step(step)) + self.engine.host_s(step, self._scanned())

    def _repeat_decode(self, step: Step, count: int) -> list[float]:
        host = self.engine.host_s(step, self._scanned())  # the same batch each iteration
        return [self.engine.kernels_s(step, k) + host for k in self.inner.repeat_decode(step, count)]

    def load(self, nbytes: int, copies: int = 1) -> float:
        return self.inner.load(nbytes, copies)
