"""Adapter collections: PEFT read/write, lazy stacked access per module, synthetic collections."""

from lorabench.adapters.collection import AdapterCollection, load_collection
from lorabench.adapters.peft import read_adapter, write_adapter
from lorabench.adapters.synth import SynthSpec, write_synth_collection
from lorabench.adapters.types import Adapter, AdapterConfig, LoraStack, ModuleKey

__all__ = [
    "Adapter", "AdapterCollection", "AdapterConfig", "LoraStack", "ModuleKey", "SynthSpec",
    "load_collection", "read_adapter", "write_adapter", "write_synth_collection",
]
