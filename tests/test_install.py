"""What a new user meets first: the modeled path without torch (`pip install -e .` without the gpu
extra), one clear line from a command that needs the extra, --version, and a help text with its
default for every flag of every command."""

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lorabench import __version__
from lorabench.cli import COMMANDS, build_parser, main

# A Python that cannot import what the gpu extra installs (as after `pip install -e .` alone): a
# sitecustomize that refuses them. The commands of the modeled path then run in one process.
BLOCKER = """
import importlib.abc, sys
GPU = ("torch", "triton", "safetensors", "scipy")
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in GPU:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NotInstalled())
"""

MODELED_PATH = """
import sys
from lorabench.cli import main
d = sys.argv[1]
quick = ["--requests", "20", "--no-progress", "--n-loras"]
calls = [
    ["run", *quick, "16", "--out", f"{d}/run"],
    ["run", *quick, "16", "--workload", "azure", "--out", f"{d}/azure"],
    ["sweep", *quick, "1,4", "--out", f"{d}/sweep"],
    ["capacity", *quick, "4", "--strategy", "single", "--max-rate", "80", "--out", f"{d}/capacity"],
    ["plot", f"{d}/sweep"],
    ["report", f"{d}/sweep"],
    ["compare", f"{d}/run/bench/single.json", f"{d}/run"],
]
for argv in calls:
    assert main(argv) == 0, argv
gpu = [m for m in ("torch", "triton", "safetensors", "scipy") if m in sys.modules]
assert not gpu, gpu
for argv in (["compress", d, "--rank", "4", "--out", f"{d}/c"], ["adapters", "info", d],
             ["run", "--executor", "measured", "--model", "tiny", "--out", f"{d}/m"], ["profile", "--help"]):
    assert main(argv) == 2, argv
print("ok")
"""


def test_the_modeled_path_runs_without_torch_and_the_rest_names_the_gpu_extra(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCKER)
    env = {"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}
    assert subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True).returncode == 1
    done = subprocess.run([sys.executable, "-c", MODELED_PATH, str(tmp_path)], env=env, capture_output=True,
                          text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
    needs = [line for line in done.stderr.splitlines() if "gpu extra" in line]
    assert len(needs) == 4 and all("pip install 'lorabench[gpu]'" in line for line in needs), done.stderr[-3000:]
    assert "lorabench compress: error: this needs torch, which is not installed" in done.stderr
    assert "Traceback" not in done.stderr


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.strip() == f"lorabench {__version__}"


def parsers(parser: argparse.ArgumentParser, name: str):
    """(name, parser) of a command and of each of its own subcommands."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                yield from parsers(subparser, f"{name} {sub}")


def command_parser(name: str) -> argparse.ArgumentParser:
    top = build_parser([name])
    return next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices[name]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_flag_has_a_help_text_that_states_its_default(command):
    missing = []
    for name, parser in parsers(command_parser(command), command):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            flag = "/".join(action.option_strings) or action.dest
            if not action.help:
                missing.append(f"{name} {flag}: no help")
                continue
            has_default = action.default not in (None, False, argparse.SUPPRESS) and action.option_strings
            if has_default and "default" not in action.help.lower():
                missing.append(f"{name} {flag}: default {action.default!r} not said")
    assert not missing, "\n".join(missing)


def test_flags_that_mean_nothing_are_not_offered():
    def flags(command):
        return {f for a in command_parser(command)._actions for f in a.option_strings}

    assert "--executor" not in flags("validate")
    jobs = next(a for a in command_parser("validate")._actions if "--jobs" in a.option_strings)
    assert jobs.help.startswith("--real:")  # validate's replays of measured runs are its only parallel work
    assert "--save-detailed" not in flags("capacity")


def test_sweep_and_capacity_tables_print_numbers_as_run_does(tmp_path, capsys):
    assert main(["sweep", "--n-loras", "4", "--requests", "200", "--rate", "200", "--strategy", "single",
                 "--no-progress", "--out", str(tmp_path / "s")]) == 0
    printed = capsys.readouterr().out
    row = pd.read_csv(tmp_path / "s" / "sweep.csv").iloc[0]
    assert row["output_throughput"] >= 1000  # a figure `run` prints with a thousands separator
    assert f"{row['output_throughput']:,.0f}" in printed and "e+0" not in printed


def test_ci_runs_the_readme_test_command_which_installs_every_extra():
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.endswith("&& python -m pytest"))
    assert command in (root / ".ci" / "run").read_text().splitlines()
    assert '".[gpu,test,ray]"' in command
    quick = next(line for line in readme.splitlines() if "lorabench run --workload zipf --n-loras 1024" in line
                 and line.startswith("python -m pip install"))
    assert "torch" not in quick  # the main job installs without torch
