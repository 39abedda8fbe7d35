"""Registers AF-CLIP / AF-CLIP+ (``method: afclip``): CLIP backbones only; the AF-CLIP+
memory is one normalized bank per aggregated token set (recipe ``bank_per_set``)."""

from __future__ import annotations

from edge_inspect.trainer.heads.afclip.model import AfClipConfig, AfClipHead
from edge_inspect.trainer.heads.afclip.train import AfClipTraining
from edge_inspect.trainer.heads.registry import MethodSpec, register


def build(cfg) -> AfClipHead:
    from edge_inspect.trainer.backbones import build_clip

    return AfClipHead(build_clip(cfg.backbone), AfClipConfig(**cfg.head_kwargs()))


SPEC = register(MethodSpec(
    name="afclip", config=AfClipConfig, build=build, training=AfClipTraining(), backbones=("clip",),
    memory_recipe=lambda head: {"kind": "bank_per_set", "feature": "features"},
    summary="AF-CLIP: attention adapter, Gaussian aggregation, shared prompt; AF-CLIP+ memory"))
