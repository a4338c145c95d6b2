"""Where and how a figure was measured: device, date and versions (torch, triton, CUDA, driver).

Every file a device check writes carries these (with the exact command), so a committed result
says what made it. `python -m lorabench.kernelbench.provenance` prints them as JSON, and the names
of the Python modules this machine lacks for lorabench's commands (scripts/gpu_check.py asks
before running anything).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import platform
import shutil
import subprocess
from datetime import datetime, timezone

# What the device check's steps import: a module missing here fails them all, so it is asked first.
CHECK_MODULES = ("lorabench.kernels", "lorabench.kernelbench.bench_kernels", "lorabench.fidelity.profile",
                 "lorabench.fidelity.validate", "lorabench.experiments.run", "pytest")


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return triton.__version__


def driver_version() -> str | None:
    """The NVIDIA driver's version, from nvidia-smi (None without one)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.split()
    return lines[0] if done.returncode == 0 and lines else None


def toolchain() -> str:
    """'torch 2.11.0+cu130, triton 3.6.0': what compiles the kernels, without asking for a GPU."""
    import torch

    return f"torch {torch.__version__}, triton {triton_version()}"


def versions() -> str:
    """'torch 2.11.0+cu130, triton 3.6.0, CUDA 13.0, driver 580.159.04' (CUDA and driver where CUDA runs)."""
    import torch

    cuda = torch.cuda.is_available()
    return _versions(cuda, driver_version() if cuda else None)


def _versions(cuda: bool, driver: str | None) -> str:
    """versions() with CUDA's presence and the driver's version already known."""
    import torch

    text = toolchain()
    if cuda:
        text += f", CUDA {torch.version.cuda}, driver {driver or 'unknown'}"
    return text


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def environment() -> dict:
    """The device (its full name, `card`: lorabench's name for it, `preset`: the device preset of that
    name if there is one), date, versions, and the modules missing here."""
    import torch

    from lorabench.presets import DEVICES, device_name

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    card = device_name(device)
    driver = driver_version() if cuda else None  # nvidia-smi, asked once
    env = dict(device=torch.cuda.get_device_name() if cuda else "cpu", card=card, preset=card if card in DEVICES else None,
               date=utc_now(),
               versions=_versions(cuda, driver), torch=torch.__version__, triton=triton_version(),
               cuda=torch.version.cuda if cuda else None, driver=driver,
               python=platform.python_version(), machine=platform.machine())
    if cuda:
        props = torch.cuda.get_device_properties(device)
        env.update(memory_gib=round(props.total_memory / 2**30, 2), capability=f"{props.major}.{props.minor}",
                   multiprocessors=props.multi_processor_count)
    env["missing_modules"] = missing_modules()
    env["xdist"] = importlib.util.find_spec("xdist") is not None
    return env


def missing_modules(modules=CHECK_MODULES) -> list[str]:
    """Top-level names of the modules that importing `modules` finds missing (e.g. ['simpy'])."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            missing.append(err.name.split(".")[0] if err.name else name)
    return sorted(set(missing))


if __name__ == "__main__":
    print(json.dumps(environment()))
