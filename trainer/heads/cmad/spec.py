"""Registers CMAD (``method: cmad``): CLIP backbones, one prototype set per auxiliary
dataset (so it needs ``data.train``); the Visual Discrepancy memory is one normalized bank
per tap (recipe ``bank_per_set``)."""

from __future__ import annotations

from edge_inspect.trainer.heads.cmad.model import CmadConfig, CmadHead
from edge_inspect.trainer.heads.cmad.train import CmadTraining
from edge_inspect.trainer.heads.registry import MethodSpec, register


def build(cfg) -> CmadHead:
    from edge_inspect.trainer.backbones import build_clip

    return CmadHead(build_clip(cfg.backbone), [d.name for d in cfg.train_data],
                    CmadConfig(**cfg.head_kwargs()))


SPEC = register(MethodSpec(
    name="cmad", config=CmadConfig, build=build, training=CmadTraining(), backbones=("clip",),
    memory_recipe=lambda head: {"kind": "bank_per_set", "feature": "features"},
    needs_train_data=True,
    summary="CMAD: transferable visual prototypes, harmonization, visual discrepancy inference"))
