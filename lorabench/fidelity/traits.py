"""What measured runs' own columns say beyond their settings, read without simulating: the engine's
memory reservation and the client's connection limit.

1. Memory. A run's mean running requests over its mean KV-cache usage is the KV cache's size in
   requests; across runs it falls linearly with the memory the LoRA slots take (max_loras x slot
   bytes). Where that line reaches zero is the KV cache the server had with no slots: device x
   utilization - weights - that cache is the memory the engine reserved; past the CUDA context
   (`non_torch_bytes`, assumed) and the profiled forward pass's activations (computed), it is the
   sampler's, `sampler_bytes_per_logit`.
2. The client. The runs' client refused requests while too many were open (it opened one connection
   per request, and ran out near 27,000); the limit is read off the most saturated runs (mean waiting
   + running, corrected for the time the queue took to fill) and used when replaying them
   (`client_max_inflight`). Runs without a waiting column, or whose queue never reached thousands:
   none.

Each needs the server's columns (`mean_kv_usage`, `mean_num_running`, `mean_num_waiting`); without
them the defaults stay.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lorabench.errors import LorabenchError
from lorabench.fidelity.real_runs import RealRun
from lorabench.fidelity.replay import ReplaySettings
from lorabench.sim.engine_model import EngineModel

CLIENT_EVIDENCE = 1000  # mean waiting requests of a run whose client ran out of connections


def fit_memory(runs: list[RealRun], engine: EngineModel, model, device) -> tuple[EngineModel, dict]:
    """The engine with `sampler_bytes_per_logit` from the KV cache the runs imply (1.)."""
    used = [r for r in runs if r.measured.get("mean_kv_usage", 0) >= 0.02 and r.measured.get("mean_num_running", 0) >= 10]
    shared = {(r.gpu_memory_utilization, r.max_num_batched_tokens, r.max_num_seqs) for r in used}
    slots = np.array([r.max_loras * engine.lora_slot_bytes(model, r.max_lora_rank) for r in used], dtype=np.float64)
    if len(shared) != 1 or len(np.unique(slots)) < 3:
        return engine, {"fitted": False, "why": "needs mean_kv_usage of runs with one memory setting and 3+ slot sizes"}
    capacity = np.array([r.measured["mean_num_running"] / r.measured["mean_kv_usage"] for r in used])
    slope, intercept = np.polyfit(slots, capacity, 1)
    if slope >= 0:
        return engine, {"fitted": False, "why": "their KV cache does not shrink as the slots grow"}
    utilization, tokens, seqs = shared.pop()
    kv_bytes = -intercept / slope
    reserved = device.memory_bytes * utilization - model.params * 2 - kv_bytes
    rest = reserved - engine.non_torch_bytes - engine.activation_bytes(model, tokens) - engine.cuda_graph_bytes
    sampler = max(rest, 0.0) / (min(seqs, tokens) * model.vocab)
    info = {"fitted": True, "kv_cache_gib_without_slots": float(kv_bytes / 2**30), "reserved_gib": float(reserved / 2**30)}
    return dataclasses.replace(engine, sampler_bytes_per_logit=round(float(sampler), 3)), info


def client_limit(runs: list[RealRun]) -> int | None:
    """The most requests the runs' client kept open (module docstring, 2.), or None."""
    caps = []
    for r in runs:
        m = r.measured
        served = m.get("request_throughput", 0.0)
        if m.get("mean_num_waiting", 0.0) < CLIENT_EVIDENCE or "mean_num_running" not in m \
                or r.offered_rate < 4 * max(served, 1e-9):
            continue  # not a run whose queue ran into the client's limit
        open_mean, cap = m["mean_num_waiting"] + m["mean_num_running"], m["mean_num_waiting"] + m["mean_num_running"]
        for _ in range(50):  # the queue fills at (offered - served) until the cap, then stays there
            fill = min(1.0, cap / ((r.offered_rate - served) * r.duration_s))
            cap = open_mean / (1 - fill / 2)
        caps.append(cap)
    return max(int(round(float(np.median(caps)), -2)), 100) if caps else None


def client_setting(text: str, runs: list[RealRun]) -> int | None:
    if text == "auto":
        return client_limit(runs)
    if text == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise LorabenchError(f"--client-max-inflight {text}: expected a positive number, none or auto")
    return value


def replay_settings(runs: list[RealRun], window: float | None, seed: int, client: str) -> ReplaySettings:
    """How to replay these runs: `window`, `seed` and the client's limit (`client`: auto, none or a
    number; auto: as the runs' columns say, 2.)."""
    return ReplaySettings(window, seed, client_setting(client, runs))
