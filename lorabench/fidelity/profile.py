"""`lorabench profile`: measure the real decoder's step times over a grid and calibrate the cost model.

The grid spans batch tokens, the prefill/decode mix, context length, distinct adapters per batch,
strategy and rank; each point runs through the measured executor (CUDA graphs for decode steps on a
GPU, unless --eager), median of --repeats runs. Then the device's ceilings (matmul, copy, host link)
are measured, the cost model's efficiency factors fitted, and everything written atomically to
results/profiles/<device>-<model>.json, which `lorabench run` picks up for that device and model.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from lorabench.errors import LorabenchError
from lorabench.fidelity import calibration
from lorabench.model import target_modules
from lorabench.model.serving import STRATEGIES, ServingSetup, build_engine
from lorabench.outputs.results import write_json_atomic
from lorabench.presets import DEVICES, DeviceSpec, device_name, model_preset

# (batch sizes, context lengths, prefill chunks) per grid size
GRIDS = {
    "quick": dict(batches=(1, 8, 32), contexts=(64, 256), chunks=(32, 128)),
    "full": dict(batches=(1, 16, 64, 256), contexts=(256, 1024), chunks=(128, 512, 2048)),
}


def grid_steps(grid: str, n_loras: int) -> list[tuple[list[int], list[int], list[bool], int]]:
    """(tokens, context_lens, is_prefill, distinct adapters) of every grid point."""
    g = GRIDS[grid]
    out = []
    for b in g["batches"]:
        for ctx in g["contexts"]:
            for distinct in sorted({1, min(8, b, n_loras), min(b, n_loras)}):
                out.append(([1] * b, [ctx] * b, [False] * b, distinct))
    for chunk in g["chunks"]:
        out.append(([chunk], [chunk], [True], 1))
        out.append(([chunk // 4] * 4, [chunk // 4] * 4, [True] * 4, min(4, n_loras)))
    b, ctx, chunk = g["batches"][-2], g["contexts"][-1], g["chunks"][0]  # decode and a prefill chunk, mixed
    out.append(([1] * b + [chunk], [ctx] * b + [chunk], [False] * b + [True], min(b + 1, n_loras)))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
    p.add_argument("--model", default="mistral-7b" if cuda else "tiny", help="model preset (default: mistral-7b on a GPU, tiny on the CPU)")
    p.add_argument("--strategy", default="all", help="all, or a comma-separated list of " + ", ".join(STRATEGIES) + " (default: all)")
    p.add_argument("--ranks", default="16", help="comma-separated LoRA ranks to profile (default 16)")
    p.add_argument("--n-loras", type=int, default=256, help="adapters the grid draws from (default 256)")
    p.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj", help="modules with LoRA, or all-linear (default: %(default)s)")
    p.add_argument("--compressed-rank", type=int, default=64, help="shared rank R of the compressed strategy (default 64)")
    p.add_argument("--grid", choices=sorted(GRIDS), default="full" if cuda else "quick",
                   help="the points timed (default: full on a GPU, quick on the CPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point, their median is kept (default: %(default)s)")
    p.add_argument("--eager", action="store_true", help="no CUDA graphs for decode steps")
    p.add_argument("--device", default="cuda" if cuda else "cpu", help="torch device to measure (default: cuda if present)")
    p.add_argument("--out", type=Path, help="output file (default results/profiles/<device>-<model>.json)")


def parse_strategies(spec: str) -> list[str]:
    chosen = list(STRATEGIES) if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in chosen if s not in STRATEGIES]
    if bad or not chosen:
        raise LorabenchError(f"--strategy {spec!r}: expected 'all' or names from {', '.join(STRATEGIES)}")
    return chosen


def parse_ints(spec: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise LorabenchError(f"{flag} {spec!r}: expected comma-separated integers") from None
    if not values or min(values) < 1:
        raise LorabenchError(f"{flag} {spec!r}: expected positive integers")
    return values


def run_profile(model: str, strategies, ranks, n_loras: int, modules, compressed_rank: int, grid: str, repeats: int,
                device: str, cuda_graphs: bool, progress: bool = True) -> dict:
    """Measure, fit, and return the profile as a dict (see lorabench.fidelity.calibration)."""
    from lorabench.model.decoder import Decoder, default_dtype
    from lorabench.sim.measured import MeasuredExecutor, check_fits_cpu

    shape, dev = model_preset(model), torch.device(device)
    check_fits_cpu(shape, dev)
    if n_loras < 1 or repeats < 1:
        raise LorabenchError("--n-loras and --repeats must be >= 1")
    steps = grid_steps(grid, n_loras)
    kv_tokens = max(sum(ctx) for _, ctx, _, _ in steps) + 64
    max_context = max(max(ctx) for _, ctx, _, _ in steps)
    slots = min(n_loras, max(len(t) for t, _, _, _ in steps) + 1)
    decoder = Decoder(shape, dev, default_dtype(dev))
    points, modes = [], Counter()
    # disable=None: tqdm draws bars only on a terminal, so a log gets no cursor codes
    bar = tqdm(total=len(strategies) * len(ranks) * len(steps), desc=f"profile {model}",
               disable=not progress or None)
    for strategy in strategies:
        for rank in ranks:
            setup = ServingSetup(shape, strategy, (rank,) * n_loras, modules, device=device, kv_tokens=kv_tokens,
                                 slots=slots, max_seqs=slots, compressed_rank=compressed_rank, cuda_graphs=cuda_graphs,
                                 max_context=max_context)
            ex = MeasuredExecutor(*build_engine(setup, model=decoder))
            for tokens, ctx, prefill, distinct in steps:
                adapters = [0] * len(tokens) if strategy == "single" else [i % distinct for i in range(len(tokens))]
                step = calibration.make_step(strategy, tokens, ctx, adapters, prefill)
                seconds = float(np.median([ex.step(step) for _ in range(repeats)]))
                modes[ex.records[-1]["mode"]] += 1
                points.append(calibration.ProfilePoint(strategy, rank, tokens, ctx, adapters, prefill, seconds))
                bar.update()
            ex.close()  # frees the KV cache, adapters and CUDA graphs before the next strategy's
    bar.close()
    measured = calibration.measure_device(dev, decoder.dtype)
    del decoder
    base = DEVICES.get(device_name(dev)) or DeviceSpec(device_name(dev), 1.0, 1.0, 1.0, 1)
    spec = dataclasses.replace(base, **measured)
    spec, shared, by_strategy, fit = calibration.calibrate(points, shape, spec, modules, compressed_rank, slots)
    measured.update({k: getattr(spec, k) for k in calibration.DEVICE_FIT_BOUNDS if hasattr(spec, k)})
    meta = calibration.profile_meta(dev, shape, default_dtype(dev), grid=grid, repeats=repeats, slots=slots,
                                    target_modules=list(modules), compressed_rank=compressed_rank,
                                    modes=dict(modes), fit=fit)
    return dict(device=measured, efficiency=dataclasses.asdict(shared),
                efficiency_by_strategy={k: dataclasses.asdict(v) for k, v in by_strategy.items()},
                points=[dataclasses.asdict(p) for p in points], meta=meta)


def main(args: argparse.Namespace) -> int:
    strategies = parse_strategies(args.strategy)
    ranks = parse_ints(args.ranks, "--ranks")
    modules = target_modules(args.target_modules)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise LorabenchError(f"--device {args.device}: CUDA is not available here")
    if args.device == "cpu":
        torch.set_num_threads(1)  # steadier times on a shared CPU
    profile = run_profile(args.model, strategies, ranks, args.n_loras, modules, args.compressed_rank, args.grid,
                          args.repeats, args.device, cuda_graphs=not args.eager)
    out = args.out or Path("results/profiles") / f"{profile['meta']['device']}-{args.model}.json"
    write_json_atomic(out, profile)
    meta, dev = profile["meta"], profile["device"]
    print(f"profile of {args.model} on {meta['device']} ({meta['dtype']}): {len(profile['points'])} points, "
          f"modes {meta['modes']}")
    print(f"device: matmul {dev['bf16_flops'] / 1e12:.2f} TFLOP/s, copy {dev['mem_bandwidth'] / 1e9:.1f} GB/s, "
          f"host->device {dev['host_link_bandwidth'] / 1e9:.1f} GB/s, copy latency {dev['copy_latency_s'] * 1e6:.1f} us")
    table = pd.DataFrame(meta["fit"]).T.rename(columns={
        "median_abs_error_default": "median |err| default", "median_abs_error_fitted": "median |err| fitted",
        "max_abs_error_fitted": "max |err| fitted"})
    print("cost-model fit of step times (relative error, modeled vs measured):")
    print(table.to_string(float_format=lambda v: f"{v:.1%}" if v < 10 else f"{v:.0f}"))
    print(f"wrote {out}")
    return 0
