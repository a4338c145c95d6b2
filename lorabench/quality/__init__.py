"""Behaviour of adapters and their compressed versions on a base model (`lorabench eval`)."""

from lorabench.quality.evaluate import Version, compressed_version, evaluate, original_version

__all__ = ["Version", "compressed_version", "evaluate", "original_version"]
