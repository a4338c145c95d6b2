"""`lorabench adapters synth|info`: write a synthetic PEFT collection, or describe one."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from lorabench.adapters.collection import load_collection
from lorabench.adapters.peft import read_module
from lorabench.adapters.synth import DTYPES, SynthSpec, write_synth_collection
from lorabench.errors import LorabenchError
from lorabench.presets import MODEL_HELP


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = sub.add_parser("synth", help="write a synthetic adapter collection in PEFT format")
    s.add_argument("--n", type=int, required=True, help="number of adapters")
    s.add_argument("--model", default="tiny", help=f"base model shape: {MODEL_HELP} (default tiny)")
    s.add_argument("--rank", type=_int_list, default=(16,), help="rank, or comma-separated ranks to mix (default 16)")
    s.add_argument("--clusters", type=int, default=1, help="planted clusters with their own shared subspaces (default: %(default)s)")
    s.add_argument("--shared", type=float, default=0.75,
                   help="fraction of each adapter's rank in its cluster's subspace (default: %(default)s)")
    s.add_argument("--shared-dim", type=int, default=None, help="dimension of a cluster's subspace (default: max rank)")
    s.add_argument("--noise", type=float, default=0.0, help="relative Gaussian noise on every A and B entry")
    s.add_argument("--norm-spread", type=float, default=0.5, help="std of log adapter norm, 0: all norms 1 (default: %(default)s)")
    s.add_argument("--modules", default="q_proj,k_proj,v_proj,o_proj", help="target modules, comma-separated (default: %(default)s)")
    s.add_argument("--layers", type=int, default=None, help="adapt only the first LAYERS layers")
    s.add_argument("--rslora", action="store_true", help="rsLoRA scaling alpha / sqrt(r)")
    s.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the weights (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="the same seed writes the same adapters (default: %(default)s)")
    s.add_argument("--out", required=True, help="collection directory to create")
    i = sub.add_parser("info", help="check a collection of PEFT adapters and describe it")
    i.add_argument("adapters_dir", help="the collection: one PEFT adapter folder per adapter")
    i.add_argument("--model", default=None, help=f"also check shapes against this model: {MODEL_HELP}")
    i.add_argument("--headers-only", action="store_true",
                   help="check configs and tensor shapes only, not the values (NaN, Inf, all-zero adapters): "
                   "fast for a collection of many GB")


def check_values(coll) -> str:
    """Read every tensor: a LorabenchError for NaN or Inf (naming adapter, key and count); a line on the
    adapters whose delta is all zero on some module (a fresh PEFT adapter's B is zero)."""
    zero: dict[str, int] = {}
    bar = tqdm(coll.adapters, desc="checking values", unit="adapter", disable=None)  # no bar in logs
    for adapter in bar:
        for key in coll.modules:
            A, B = read_module(Path(adapter.folder), key)
            a, b = A.double(), B.double()
            if float(((a @ a.T) * (b.T @ b)).sum()) == 0:  # ||B A||_F^2 from r x r Gram matrices
                zero[adapter.name] = zero.get(adapter.name, 0) + 1
    if not zero:
        return "values: all finite, no all-zero module"
    shown = ", ".join(f"{name} ({n} of {len(coll.modules)} modules)" for name, n in list(zero.items())[:5])
    return (f"values: all finite; {len(zero)} adapter(s) have all-zero modules, which compression leaves out of its "
            f"errors: {shown}{' ...' if len(zero) > 5 else ''}")


def main(args: argparse.Namespace) -> int:
    if args.action == "synth":
        spec = SynthSpec(
            n=args.n, model=args.model, ranks=args.rank, clusters=args.clusters, shared=args.shared,
            shared_dim=args.shared_dim, noise=args.noise, norm_spread=args.norm_spread,
            modules=tuple(m for m in args.modules.split(",") if m), layers=args.layers, rslora=args.rslora,
            dtype=args.dtype, seed=args.seed,
        )
        out = write_synth_collection(spec, args.out)
        print(f"wrote {spec.n} adapters ({spec.model}, ranks {list(spec.ranks)}, {spec.clusters} clusters) to {out}")
        return 0
    if args.action == "info":
        coll = load_collection(args.adapters_dir, model=args.model)
        rows: dict[str, dict] = {}
        for key in coll.modules:
            d_in, d_out = coll.shapes[key]
            row = rows.setdefault(key.module, {"module": key.module, "layers": 0, "d_in": d_in, "d_out": d_out})
            row["layers"] += 1
        ranks = Counter(max(per.values()) for per in coll.ranks)
        print(f"{len(coll)} adapters in {coll.root}, dtype {str(coll.dtype).removeprefix('torch.')}, "
              f"adapters per rank {dict(sorted(ranks.items()))}, {coll.uncompressed_params():,} parameters")
        print(pd.DataFrame(list(rows.values())).to_string(index=False))
        if not args.headers_only:
            print(check_values(coll))
        return 0
    raise LorabenchError(f"unknown action {args.action!r}")
