"""`lorabench` command line: each subcommand lives in its own module; this file only dispatches.

A subcommand module defines `add_arguments(parser)` and `main(args) -> int`. Modules are imported
only when their subcommand runs, so `lorabench --help` stays fast (torch is slow to import).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lorabench.errors import LorabenchError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "bench-kernels": ("lorabench.kernelbench.bench_kernels", "time every strategy's LoRA kernels over batch sizes x adapters"),
    "adapters": ("lorabench.adapters.cli", "synthesize a PEFT adapter collection (synth) or check one (info)"),
    "compress": ("lorabench.compress.cli", "jointly compress an adapter collection (full, diagonal, svd; clusters)"),
    "run": ("lorabench.experiments.run", "serve a workload with every strategy and compare it with single-LoRA serving"),
    "profile": ("lorabench.fidelity.profile", "measure the real decoder's step times on this device and calibrate the cost model"),
    "validate": ("lorabench.fidelity.validate", "run measured and modeled executors on one request stream; print their "
                 "relative errors (--real: a fitted engine against measured serving runs)"),
    "calibrate": ("lorabench.fidelity.calibrate", "fit the vllm-v1 engine's terms to measured serving runs -> an engine "
                  "JSON (--cv K: with a cross-validated report)"),
    "compare": ("lorabench.outputs.compare", "put a `vllm bench serve` result JSON beside a lorabench run of the same settings"),
    "sweep": ("lorabench.experiments.sweep", "run every strategy over a grid of adapter counts (resumable) -> DIR/sweep.csv"),
    "capacity": ("lorabench.experiments.capacity", "the highest request rate each strategy sustains within the SLOs, per adapter "
                 "count (resumable) -> DIR/capacity.csv"),
    "plot": ("lorabench.outputs.plots", "comparison charts (PNG + SVG) of a sweep folder or of compress outputs"),
    "report": ("lorabench.outputs.report", "a Markdown page with the table and charts of a sweep folder"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """A parser whose chosen subcommand (the first bare word of argv) has its arguments added."""
    parser = argparse.ArgumentParser(
        prog="lorabench",
        description="Benchmark and simulate serving many LoRA adapters of one LLM.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_main=mod.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args._main(args) or 0)
    except LorabenchError as err:
        print(f"lorabench {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorabench {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
