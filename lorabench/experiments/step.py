"""`lorabench step`: the modeled time of one serving step, and what it is made of.

One continuous-batching step of `--batch` requests decoding at `--context` tokens of context each,
plus optionally one `--prefill` chunk of a new prompt, on `--model` served by `--tp` GPUs of
`--device` (the profile a `lorabench run` would use: results/profiles/<device>-<model>.json, else
<device>-vidur.json, else the preset's roofline). For every strategy it prints the step's
milliseconds split into the base model's layers (GEMMs and elementwise kernels: reading the
weights), attention (reading the KV cache), the strategy's LoRA kernels, communication (the
all-reduces and the logits' gather under tensor parallelism), the LM head and per-step overheads,
and the decode tokens per second that step rate gives.
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from lorabench.errors import LorabenchError
from lorabench.experiments.run import found_profile, rank_list
from lorabench.experiments.runner import RunConfig, check_parallel
from lorabench.parallel import KV_CACHE_DTYPES, WEIGHT_DTYPES
from lorabench.presets import DEFAULT_TARGET_MODULES, DEVICES, MODEL_HELP, target_modules
from lorabench.sim.costmodel import LoraSetup, make_executor
from lorabench.sim.executor import Step
from lorabench.strategies import parse_strategies

PARTS = ("base model layers", "attention", "lora", "communication", "lm head", "overheads")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mistral-7b", help=f"{MODEL_HELP} (default: %(default)s)")
    p.add_argument("--device", default="h200", choices=sorted(DEVICES), help="device preset (default: %(default)s)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs (default: %(default)s)")
    p.add_argument("--weight-dtype", default="bf16", choices=WEIGHT_DTYPES,
                   help="base weights; fp8 halves their bytes and runs GEMMs at the FP8 rate (default: %(default)s)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="KV cache: auto = the model's bf16, fp8 halves its bytes (default: %(default)s)")
    p.add_argument("--batch", type=int, required=True, help="requests decoding one token each")
    p.add_argument("--context", type=int, required=True, help="tokens of context of each decoding request")
    p.add_argument("--prefill", type=int, default=0, metavar="TOKENS", help="one prompt chunk of this many tokens "
                   "in the same step (chunked prefill; default none)")
    p.add_argument("--rank", type=rank_list, default=(16,), help="adapter rank, or a comma list the adapters cycle through (default: 16)")
    p.add_argument("--distinct", type=int, help="distinct adapters in the batch (default: one per request)")
    p.add_argument("--target-modules", default=",".join(DEFAULT_TARGET_MODULES),
                   help="modules with LoRA, comma-separated, or all-linear (default: %(default)s)")
    p.add_argument("--compressed-rank", type=int, default=64, help="shared rank R of the compressed strategy (default: %(default)s)")
    p.add_argument("--strategy", default="all", help="all, or a comma list of single,per-lora,paged,compressed (default: %(default)s)")
    p.add_argument("--profile", help="profile JSON (default: the one `lorabench run` would use); none = the preset")


def step_table(config: RunConfig, batch: int, context: int, prefill: int, ranks: tuple[int, ...],
               distinct: int, modules: tuple[str, ...], compressed_rank: int) -> pd.DataFrame:
    """Milliseconds of each part of the step (rows) per strategy (columns), with the total and the
    decode tokens per second."""
    model, device = check_parallel(config)
    rows = batch + (1 if prefill else 0)
    tokens = np.array([1] * batch + ([prefill] if prefill else []), dtype=np.int64)
    contexts = np.array([context] * batch + ([prefill] if prefill else []), dtype=np.int64)
    is_prefill = np.array([False] * batch + ([True] if prefill else []))
    n_adapters = max(distinct, 1)
    adapter_ranks = np.array([ranks[i % len(ranks)] for i in range(n_adapters)])
    columns = {}
    for strategy in config.strategies:
        adapters = np.zeros(rows, dtype=np.int64) if strategy == "single" else np.arange(rows) % n_adapters
        lora = LoraSetup(strategy, adapter_ranks, modules, compressed_rank, np.zeros(n_adapters, dtype=np.int64),
                         resident_slots=n_adapters)
        executor = make_executor(config, model, device, lora)
        step = Step(strategy, tokens, contexts, adapters, is_prefill, len(np.unique(adapters)))
        parts = executor.breakdown(step)
        total = executor.step(step)
        columns[strategy] = [parts[p] * 1e3 for p in PARTS] + [total * 1e3, batch / total]
    return pd.DataFrame(columns, index=[*PARTS, "step ms", "decode tok/s"])


def main(args: argparse.Namespace) -> int:
    for flag in ("batch", "context"):
        if getattr(args, flag) < 1:
            raise LorabenchError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.prefill < 0 or (args.distinct is not None and args.distinct < 1):
        raise LorabenchError("--prefill must be >= 0 and --distinct >= 1")
    profile = None if args.profile == "none" else args.profile or found_profile(args)
    config = RunConfig(model=args.model, device=args.device, profile=profile, tp=args.tp,
                       weight_dtype=args.weight_dtype, kv_cache_dtype=args.kv_cache_dtype,
                       strategies=parse_strategies(args.strategy))
    distinct = args.distinct or args.batch + (1 if args.prefill else 0)
    table = step_table(config, args.batch, args.context, args.prefill, args.rank, distinct,
                       target_modules(args.target_modules), args.compressed_rank)
    gpus = f"{args.tp} x {args.device} (tensor parallel)" if args.tp > 1 else f"one {args.device}"
    chunk = f" + a {args.prefill:,}-token prefill chunk" if args.prefill else ""
    print(f"lorabench step: {args.model} on {gpus}, {args.weight_dtype} weights, KV cache {args.kv_cache_dtype}; "
          f"{args.batch} requests decoding at {args.context:,} tokens of context{chunk}; {distinct} distinct adapters "
          f"of rank {','.join(map(str, args.rank))} on {args.target_modules}")
    print(f"MODELED, ms per step ({'profile ' + profile if profile else 'the preset roofline, no profile'}):")
    print(table.to_string(float_format=lambda v: f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"))
    return 0
