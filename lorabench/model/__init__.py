"""A Llama/Mistral-shaped decoder with LoRA through the strategy kernels, a block/paged KV cache,
and an engine that runs mixed prefill/decode steps (`lorabench.model.Engine`)."""

from .adapters import AdapterWeights, CompressedWeights, random_adapter, random_compressed, target_modules
from .batch import ForwardBatch, SeqWork
from .decoder import Decoder, default_dtype
from .engine import Engine
from .kv_cache import BlockKVCache, KVCache, PagedKVCache
from .lora import CompressedLora, LoraState, PagedLora, SingleLora, SlotLora
from .page_pool import PagePool

__all__ = [
    "AdapterWeights", "BlockKVCache", "CompressedLora", "CompressedWeights", "Decoder", "Engine", "ForwardBatch",
    "KVCache", "LoraState", "PagePool", "PagedKVCache", "PagedLora", "SeqWork", "SingleLora", "SlotLora",
    "default_dtype", "random_adapter", "random_compressed", "target_modules",
]
