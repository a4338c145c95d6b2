"""lorabench: benchmark and simulate serving many LoRA adapters of one LLM.

The names below are the stable surface for Python users (`from lorabench import RunConfig,
run_experiment`). Each is imported from its module on first use, so `import lorabench` stays light:
torch is imported only by what needs it (adapters, compression, the measured executor) and
matplotlib only by charts.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "LorabenchError": "lorabench.errors",
    # presets and workloads
    "MODELS": "lorabench.presets", "DEVICES": "lorabench.presets",
    "ModelShape": "lorabench.presets", "DeviceSpec": "lorabench.presets",
    "model_preset": "lorabench.presets", "device_preset": "lorabench.presets",
    "Workload": "lorabench.workload", "Requests": "lorabench.workload", "load_workload": "lorabench.workload",
    # experiments
    "RunConfig": "lorabench.experiments.runner", "Experiment": "lorabench.experiments.runner",
    "run_experiment": "lorabench.experiments.runner",
    "run_sweep": "lorabench.experiments.sweep",
    "run_capacity": "lorabench.experiments.capacity", "SearchSettings": "lorabench.experiments.capacity",
    # outputs
    "read_sweep": "lorabench.outputs.tables", "read_capacity": "lorabench.outputs.tables",
    "render": "lorabench.outputs.plots", "write_report": "lorabench.outputs.report",
    # adapters and compression (these import torch)
    "AdapterCollection": "lorabench.adapters", "load_collection": "lorabench.adapters",
    "read_adapter": "lorabench.adapters", "write_adapter": "lorabench.adapters",
    "SynthSpec": "lorabench.adapters", "write_synth_collection": "lorabench.adapters",
    "CompressConfig": "lorabench.compress", "compress_collection": "lorabench.compress",
    "CompressedCollection": "lorabench.compress",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lorabench' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

