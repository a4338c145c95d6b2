"""lorabench: benchmark and simulate serving many LoRA adapters of one LLM."""

__version__ = "0.1.0"
