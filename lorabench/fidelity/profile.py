"""`lorabench profile`: measure the real decoder's step times over a grid and calibrate the cost model.

The grid spans batch tokens, the prefill/decode mix, context length, distinct adapters per batch,
strategy and rank; each point runs through the measured executor (CUDA graphs for decode steps on a
GPU, unless --eager), median of --repeats runs. Then the device's ceilings (matmul, copy, host link)
are measured, the cost model's efficiency factors fitted, and everything written atomically to
results/profiles/<device>-<model>.json, which `lorabench run` picks up for that device and model.

`--from-vidur DIR --device D` instead fits the device's kernel physics and GPU link to Vidur-format
measurements (no GPU needed; lorabench.fidelity.vidur_fit) and writes results/profiles/<D>-vidur.json,
which modeled runs on D use when no measured profile of their model exists.
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
    p.add_argument("--from-vidur", metavar="DIR", type=Path,
                   help="fit the kernel physics of --device D to Vidur-format measurements in DIR "
                   "(compute/<D>/<model>/mlp.csv, network/<D>*/all_reduce.csv) instead of measuring")
    p.add_argument("--fit-tp", default="1", help="with --from-vidur: the tensor-parallel sizes whose rows are fitted, "
                   "a comma list or all (default 1: the other sizes are held out as a check)")
    p.add_argument("--model", help="model preset (default: mistral-7b on a GPU, tiny on the CPU); with --from-vidur, "
                   "the model folder under compute/<device>/ (default: the only one)")
    p.add_argument("--strategy", default="all", help="all, or a comma-separated list of " + ", ".join(STRATEGIES) + " (default: all)")
    p.add_argument("--ranks", default="16", help="comma-separated LoRA ranks to profile (default 16)")
    p.add_argument("--n-loras", type=int, default=256, help="adapters the grid draws from (default 256)")
    p.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj", help="modules with LoRA, or all-linear (default: %(default)s)")
    p.add_argument("--compressed-rank", type=int, default=64, help="shared rank R of the compressed strategy (default 64)")
    p.add_argument("--grid", choices=sorted(GRIDS), default="full" if cuda else "quick",
                   help="the points timed (default: full on a GPU, quick on the CPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point, their median is kept (default: %(default)s)")
    p.add_argument("--eager", action="store_true", help="no CUDA graphs for decode steps")
    p.add_argument("--device", help="torch device to measure (default: cuda if present, else cpu); with --from-vidur, "
                   f"the device preset the measurements are of ({', '.join(DEVICES)})")
    p.add_argument("--out", type=Path, help="output file (default results/profiles/<device>-<model>.json; with "
                   "--from-vidur, results/profiles/<device>-vidur.json)")


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
    if args.from_vidur is not None:
        return from_vidur(args)
    args.model = args.model or ("mistral-7b" if torch.cuda.is_available() else "tiny")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
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


def from_vidur(args: argparse.Namespace) -> int:
    """`lorabench profile --from-vidur DIR --device D`: fit, print what was fitted and how well, write."""
    from lorabench.fidelity import vidur, vidur_fit
    from lorabench.presets import device_preset

    if args.device is None:
        raise LorabenchError(f"--from-vidur needs --device: the device preset the measurements are of ({', '.join(DEVICES)})")
    device = device_preset(args.device)
    fit_tp = None if args.fit_tp.strip() == "all" else tuple(parse_ints(args.fit_tp, "--fit-tp"))
    command = f"lorabench profile --from-vidur {args.from_vidur} --device {args.device}" + (
        f" --model {args.model}" if args.model else "") + (f" --fit-tp {args.fit_tp}" if args.fit_tp != "1" else "")
    profile = vidur_fit.fit_profile(args.from_vidur, device, args.model, fit_tp, command=command)
    out = args.out or Path("results/profiles") / f"{device.name}-vidur.json"
    write_json_atomic(out, profile)
    meta, kernels = profile["meta"], profile["kernels"]
    print(f"kernel physics of {device.name} fitted to {meta['compute']} ({meta['fitted_on']}):")
    print("  " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in kernels.items()))
    table = pd.DataFrame(meta["fidelity"]).T
    table["mape"] = table["mape"].map(vidur.percent)
    table["worst_bucket_mape"] = table["worst_bucket_mape"].map(vidur.percent)
    print("per-layer error (modeled / measured - 1) by tensor-parallel size" +
          ("" if meta["held_out"] == "none" else f" (held out: {meta['held_out']})") + ":")
    print(table.to_string())
    checks = meta["cross_checks"]
    print(f"cross-checks: fitted on every other token count, the rest {vidur.percent(checks['tokens']['held-out mape'])}; "
          f"fitted without {vidur_fit.HELD_OUT_OP}, it {vidur.percent(checks['op'][f'{vidur_fit.HELD_OUT_OP} mape'])} "
          f"and the layer {vidur.percent(checks['op']['layer mape'])}")
    if "link" in meta:
        dev = profile["device"]
        print(f"all-reduce: {dev['link_latency_s'] * 1e6:.1f} us + 2 (n - 1) / n x bytes / "
              f"{dev['link_bandwidth'] / 1e9:.0f} GB/s ({meta['link']['rows']} rows over {meta['link']['gpus']} GPUs, "
              f"error {vidur.percent(meta['link']['mape'])})")
    print(f"wrote {out}")
    return 0
