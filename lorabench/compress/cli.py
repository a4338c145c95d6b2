"""`lorabench compress`: jointly compress a PEFT adapter collection; add adapters; export one.

    lorabench compress ADAPTERS_DIR --rank R [--method full|diagonal|svd] [--clusters K|auto]
                       [--target-error E] [--memory-budget GIB] --out DIR
    lorabench compress NEW_ADAPTERS_DIR --onto COMPRESSED_DIR --out DIR   (fit onto existing bases)
    lorabench compress COMPRESSED_DIR --export ADAPTER --out DIR          (rebuilt adapter, PEFT format)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lorabench.adapters.collection import load_collection
from lorabench.compress.collection import CompressedCollection
from lorabench.compress.module import CompressConfig
from lorabench.compress.run import add_adapters, compress_collection
from lorabench.errors import LorabenchError
from lorabench.presets import GIB, MODEL_HELP

DTYPES = ("float32", "float64", "float16", "bfloat16")


def _clusters(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="DIR", help="adapter collection (one PEFT folder per adapter); "
                        "with --export, a compressed collection")
    parser.add_argument("--out", required=True, help="folder to create (compressed collection, or PEFT adapter)")
    parser.add_argument("--rank", type=int, help="R, the rank of the shared bases (required to compress)")
    parser.add_argument("--method", default="full", choices=["full", "diagonal", "svd"],
                        help="full R x R cores, diagonal cores, or per-adapter SVD (default full)")
    parser.add_argument("--clusters", type=_clusters, default=1,
                        help="groups of adapters with their own bases, or 'auto' (default: %(default)s)")
    parser.add_argument("--cluster-by", default="module", choices=["module", "adapter"],
                        help="module: each module groups the adapters on its own (default); adapter: one group per "
                             "adapter across all its modules, from every module's evidence")
    parser.add_argument("--target-error", type=float, default=0.6,
                        help="with --clusters auto: mean relative error to reach (default 0.6)")
    parser.add_argument("--memory-budget", type=float, default=None,
                        help="with --clusters auto: GPU GiB for the whole compressed collection (caps K)")
    parser.add_argument("--normalize", action="store_true", help="fit adapters scaled to unit norm (norms kept)")
    parser.add_argument("--weights", default=None, help="JSON file {adapter name: weight} (others weigh 1)")
    parser.add_argument("--model", default=None, help=f"check adapter shapes against a model: {MODEL_HELP}")
    parser.add_argument("--dtype", default=None, choices=DTYPES, help="stored dtype (default: the adapters')")
    parser.add_argument("--compute-dtype", default="float32", choices=["float32", "float64"],
                        help="dtype the fits compute in (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device for the fits: cpu, cuda (default: %(default)s)")
    parser.add_argument("--tol", type=float, default=1e-4,
                        help="stop when an iteration lowers the total error by less than this fraction (default 1e-4)")
    parser.add_argument("--max-iter", type=int, default=50, help="iteration cap per fit (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the fits' random starts; the same seed gives the same result (default: %(default)s)")
    parser.add_argument("--onto", default=None, metavar="COMPRESSED_DIR",
                        help="fit the adapters of DIR onto this compressed collection's bases")
    parser.add_argument("--export", default=None, metavar="ADAPTER",
                        help="write adapter ADAPTER of the compressed collection DIR as a PEFT adapter")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or table")


def _read_weights(path: str | None) -> dict[str, float] | None:
    if path is None:
        return None
    try:
        weights = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise LorabenchError(f"--weights: {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise LorabenchError(f"--weights: {path}: malformed JSON ({err})") from None
    if not isinstance(weights, dict):
        raise LorabenchError(f"--weights: {path} must hold a JSON object {{adapter name: weight}}")
    return weights


def main(args: argparse.Namespace) -> int:
    if args.export is not None:
        compressed = CompressedCollection.load(args.source)
        out = compressed.export_peft(args.export, args.out)
        print(f"wrote adapter {args.export!r} (rank {compressed.rank}, {compressed.method}) to {out}")
        return 0
    if args.onto is not None:
        summary = add_adapters(CompressedCollection.load(args.onto), args.source, args.out,
                               progress=not args.quiet)
        print(f"added {summary['added']} adapters; wrote {args.out}")
        return 0
    if args.rank is None:
        raise LorabenchError("--rank is required to compress")
    if args.memory_budget is not None and args.clusters != "auto":
        raise LorabenchError("--memory-budget applies to --clusters auto")
    config = CompressConfig(
        rank=args.rank, method=args.method, clusters=args.clusters, target_error=args.target_error,
        normalize=args.normalize, tol=args.tol, max_iter=args.max_iter, seed=args.seed, cluster_by=args.cluster_by,
    )
    collection = load_collection(args.source, model=args.model)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise LorabenchError(f"--device {args.device}: no CUDA device here")
    summary = compress_collection(
        collection, config, args.out, weights=_read_weights(args.weights),
        memory_budget=None if args.memory_budget is None else args.memory_budget * GIB,
        dtype=getattr(torch, args.dtype) if args.dtype else None, compute_dtype=getattr(torch, args.compute_dtype),
        device=args.device, progress=not args.quiet,
    )
    print(f"wrote {args.out} (mean error {summary['mean_error']:.4f}, {summary['seconds']:.1f} s)")
    return 0
