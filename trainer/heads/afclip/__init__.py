"""AF-CLIP / AF-CLIP+: ``model.py`` (the module), ``train.py`` (losses), ``spec.py`` (registration)."""

from edge_inspect.trainer.heads.afclip.model import (
    AfClipConfig,
    AfClipHead,
    AttentionAdapter,
    GaussianAggregation,
)

__all__ = ["AfClipConfig", "AfClipHead", "AttentionAdapter", "GaussianAggregation"]
