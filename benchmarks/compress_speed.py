"""Time full compression of one module's adapters (the issue's target: 1,000 rank-16 adapters of a
4096 x 4096 module to R = 64 in <= 30 s on the 2-core CPU machine, <= 2 s on a GPU).

    python benchmarks/compress_speed.py [--n 1000] [--d 4096] [--rank 16] [--R 64] [--device cpu]
                                        [--json results/compression/cpu_speed.json]

Adapters are synthetic (4 planted clusters, --shared of each adapter's rank shared, norm spread 0.5),
generated in memory; the time covers compress_module only (the factors are already stacked).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

from lorabench.adapters.synth import SynthSpec, planted_clusters, synth_adapter
from lorabench.adapters.types import LoraStack, ModuleKey
from lorabench.compress import CompressConfig, compress_module


def synth_stack(n: int, d: int, rank: int, device: str, shared: float, seed: int = 0) -> LoraStack:
    """n adapters of a d x d module (q_proj of a model with hidden size d), float32."""
    model = {4096: "llama-7b", 5120: "llama-13b", 64: "tiny"}[d]
    spec = SynthSpec(n=n, model=model, ranks=(rank,), clusters=4, shared=shared, layers=1, modules=("q_proj",), seed=seed)
    key, labels = ModuleKey(0, "q_proj"), planted_clusters(spec)
    A = torch.empty(n, rank, d)
    Bt = torch.empty(n, rank, d)
    for i in range(n):
        config, factors = synth_adapter(spec, i, labels[i], rank)
        a, b = factors[key]
        A[i], Bt[i] = a, b.T * config.scaling(key)
    return LoraStack(A.to(device), Bt.to(device), torch.full((n,), rank))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--d", type=int, default=4096, choices=[64, 4096, 5120])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--R", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shared", type=float, default=0.75, help="fraction of each rank in its cluster's subspace")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--tol", type=float, default=CompressConfig.tol, help="stopping tolerance (default: the CLI's)")
    p.add_argument("--json", default=None, help="append the figure to this JSON file (a list of runs)")
    args = p.parse_args()
    t0 = time.perf_counter()
    stack = synth_stack(args.n, args.d, args.rank, args.device, args.shared)
    generate_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fit = compress_module(stack, CompressConfig(rank=args.R, method="full", tol=args.tol))
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    record = {
        "what": f"full compression of {args.n} rank-{args.rank} adapters of one {args.d}x{args.d} module to R={args.R}",
        "adapters": f"synthetic: 4 clusters, shared fraction {args.shared}, norm spread 0.5",
        "seconds": min(times),
        "seconds_all": times,
        "iterations": fit.iterations,
        "tol": args.tol,
        "mean_error": float(fit.errors.mean()),
        "max_error": float(fit.errors.max()),
        "dtype": "float32",
        "device": args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(sys.argv),
        "generate_seconds": generate_s,
        "load_average_1min": os.getloadavg()[0],  # other jobs on the shared cores slow every figure
    }
    print(json.dumps(record, indent=1))
    if args.json:
        runs = json.load(open(args.json)) if os.path.exists(args.json) else []
        runs.append(record)
        with open(args.json + ".tmp", "w") as f:
            json.dump(runs, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
