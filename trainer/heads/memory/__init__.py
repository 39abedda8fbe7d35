"""The few-shot memory method: ``model.py`` (the module), ``train.py`` (nothing to train),
``spec.py`` (registration)."""

from edge_inspect.trainer.heads.memory.model import TEXTURE_MEMORY, MemoryHead, MemoryHeadConfig

__all__ = ["TEXTURE_MEMORY", "MemoryHead", "MemoryHeadConfig"]
