"""`lorabench eval`: loss, KL and top-1 agreement of adapters and their compressed versions on a base model.

    lorabench eval --adapters DIR [--compressed CDIR ...] --base MODEL --data FILE --out DIR

MODEL is a preset (random weights of its shape: for tests and smoke runs) or a local Hugging Face
checkpoint folder of a Llama, Mistral or Qwen2 model (config.json + *.safetensors), loaded into
lorabench's own decoder. Writes DIR/eval.csv, DIR/summary.csv, DIR/config.json and
DIR/charts/kept_improvement.{png,svg}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lorabench.adapters.collection import load_collection
from lorabench.errors import LorabenchError
from lorabench.model.checkpoint import checkpoint_shape, load_checkpoint
from lorabench.model.decoder import Decoder
from lorabench.outputs.results import atomic_dir, write_json
from lorabench.presets import MODELS, ModelShape, is_config_path, model_preset
from lorabench.quality.data import Tokenizer, byte_tokenizer, checkpoint_tokenizer, read_rows
from lorabench.quality.evaluate import compressed_version, evaluate, original_version
from lorabench.quality.report import write_outputs

DTYPES = ("float32", "bfloat16", "float16", "float64")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapters", required=True, metavar="DIR", help="adapter collection (one PEFT folder per adapter)")
    parser.add_argument("--compressed", nargs="+", action="extend", default=[], metavar="CDIR",
                        help="compressed collections of those adapters (`lorabench compress` outputs); each is a "
                             "version named after its folder (default: none, only base and original)")
    parser.add_argument("--base", required=True, metavar="MODEL",
                        help=f"a preset with random weights ({', '.join(MODELS)}) or a Hugging Face checkpoint folder "
                             "(Llama, Mistral, Qwen2: config.json + *.safetensors)")
    parser.add_argument("--data", required=True, metavar="FILE",
                        help='JSONL rows {"adapter": name, "text": ...} or {"adapter": name, "tokens": [...]}')
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to create")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when present, else cpu)")
    parser.add_argument("--dtype", default=None, choices=DTYPES,
                        help="model and adapter dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--batch-tokens", type=int, default=4096,
                        help="tokens per forward pass (default 4096; logits of that many tokens are in memory)")
    parser.add_argument("--seed", type=int, default=0, help="seed of a preset's random weights")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or table")


def base_shape(base: str) -> tuple[ModelShape, Tokenizer]:
    """The base model's shape and the tokenizer of its text rows, without reading weights."""
    if base in MODELS:
        shape = model_preset(base)
        return shape, byte_tokenizer(shape.vocab)
    if Path(base).is_dir():
        return checkpoint_shape(base)[0], checkpoint_tokenizer(Path(base))
    if is_config_path(base) and Path(base).is_file():
        raise LorabenchError(f"--base {base}: a config.json alone has no weights; give its checkpoint folder, or a preset")
    if is_config_path(base):
        raise LorabenchError(f"--base {base}: no such checkpoint folder")
    model_preset(base)  # raises: unknown preset
    raise AssertionError(base)


def load_base(base: str, device: torch.device, dtype: torch.dtype | None, seed: int) -> Decoder:
    """A preset's random weights, or the checkpoint's."""
    if base in MODELS:
        return Decoder(model_preset(base), device, dtype, seed=seed)
    return load_checkpoint(base, device, dtype)


def main(args: argparse.Namespace) -> int:
    if args.batch_tokens < 2:
        raise LorabenchError(f"--batch-tokens must be >= 2, got {args.batch_tokens}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LorabenchError(f"--device {args.device}: no CUDA device here")
    shape, tokenize = base_shape(args.base)  # every check that needs no weights first: loading can take long
    collection = load_collection(args.adapters, model=args.base if args.base in MODELS else str(Path(args.base)))
    versions = [original_version(collection, shape)]
    for folder in args.compressed:
        versions.append(compressed_version(folder, collection, shape))
        if versions[-1].name in {"base"} | {v.name for v in versions[:-1]}:
            raise LorabenchError(f"--compressed {folder}: its name {versions[-1].name!r} is taken by another version; "
                                 "rename the folder")
    rows = read_rows(args.data, collection.names, tokenize, shape.vocab, shape.max_context)
    empty = [name for name, seqs in rows.items() if not seqs]
    if len(empty) == len(rows):
        raise LorabenchError(f"--data {args.data}: no rows for any adapter of {args.adapters}")
    if empty:
        print(f"lorabench eval: {len(empty)} adapter(s) have no rows in {args.data} (reported with 0 tokens): "
              f"{', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}", file=sys.stderr)
    model = load_base(args.base, device, getattr(torch, args.dtype) if args.dtype else None, args.seed)
    table = evaluate(model, rows, versions, args.batch_tokens, progress=not args.quiet)
    title = (f"lorabench eval: {len(rows) - len(empty)} adapters of {args.adapters} on {args.base} "
             f"({str(model.dtype).removeprefix('torch.')}, {device.type})")
    with atomic_dir(args.out) as tmp:
        summary = write_outputs(tmp, table, title)
        write_json(tmp / "config.json", {
            "adapters": args.adapters, "compressed": args.compressed, "base": args.base, "data": args.data,
            "device": str(device), "dtype": str(model.dtype).removeprefix("torch."), "batch_tokens": args.batch_tokens,
            "seed": args.seed, "adapters_without_rows": empty,
        })
    if not args.quiet:
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"wrote {args.out} ({len(table)} rows)")
    return 0
