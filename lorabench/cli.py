"""`lorabench` command line: each subcommand lives in its own module; this file only dispatches.

A subcommand module defines `add_arguments(parser)` and `main(args) -> int`. Modules are imported
only when their subcommand runs, so `lorabench --help` stays fast (torch is slow to import).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import threading
from concurrent.futures.process import BrokenProcessPool

from lorabench import __version__
from lorabench.errors import LorabenchError

# What the gpu extra installs (pyproject.toml): the modeled path (run, sweep, capacity, plot, report,
# compare, traces) needs none of it.
GPU_PACKAGES = ("torch", "triton", "safetensors", "scipy")
GPU_EXTRA_HINT = "pip install 'lorabench[gpu]' (in a checkout: pip install -e '.[gpu]')"

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "bench-kernels": ("lorabench.kernelbench.bench_kernels", "time every strategy's LoRA kernels over batch sizes x adapters"),
    "adapters": ("lorabench.adapters.cli", "synthesize a PEFT adapter collection (synth) or check one (info)"),
    "compress": ("lorabench.compress.cli", "jointly compress an adapter collection (full, diagonal, svd; clusters)"),
    "eval": ("lorabench.quality.cli", "loss, KL and top-1 agreement of adapters and their compressed versions on a "
             "base model (a preset or a Hugging Face checkpoint folder) -> DIR/eval.csv"),
    "run": ("lorabench.experiments.run", "serve a workload with every strategy and compare it with single-LoRA serving"),
    "profile": ("lorabench.fidelity.profile", "measure the real decoder's step times on this device and calibrate the cost model"),
    "validate": ("lorabench.fidelity.validate", "run measured and modeled executors on one request stream; print their "
                 "relative errors (--real: a fitted engine against measured serving runs)"),
    "calibrate": ("lorabench.fidelity.calibrate", "fit the vllm-v1 engine's terms to measured serving runs -> an engine "
                  "JSON (--cv K: with a cross-validated report)"),
    "fidelity": ("lorabench.fidelity.vidur_table", "the cost model's per-layer error against Vidur-format per-operation measurements"),
    "step": ("lorabench.experiments.step", "the modeled time of one serving step and its breakdown (weights, attention, LoRA, "
             "communication, overheads)"),
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
    parser.add_argument("--version", action="version", version=f"lorabench {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_main=mod.main)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that cleanup runs as for Ctrl-C (worker processes are
    stopped, temporary folders removed)."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


@contextlib.contextmanager
def _sigterm_raises():
    """While the command runs, SIGTERM raises Terminated instead of ending the process at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    prog = f"lorabench {command}" if command else "lorabench"

    def error(message: str, status: int) -> int:
        print(f"{prog}: error: {message}", file=sys.stderr)
        return status

    try:
        with _sigterm_raises():
            args = build_parser(argv).parse_args(argv)
            return int(args._main(args) or 0)
    except LorabenchError as err:
        return error(str(err), 2)
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in GPU_PACKAGES:
            raise
        return error(f"this needs {err.name.split('.')[0]}, which is not installed; it comes with the gpu extra: "
                     f"{GPU_EXTRA_HINT}", 2)
    except Terminated:
        print(f"{prog}: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except BrokenProcessPool:
        return error("a worker process died (killed, or out of memory?); rerun to resume", 1)
    except OSError as err:  # a full disk, a file that vanished: the system's words, without a traceback
        return error(str(err), 1)
