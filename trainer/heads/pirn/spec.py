"""Registers PIRN (``method: pirn``): DINOv2 encoders (RGB, and surface normals computed in
the graph from the 3D plane), trained on the target's K shots; no memory to enroll."""

from __future__ import annotations

import copy

from edge_inspect.trainer.heads.pirn.model import PirnConfig, PirnHead
from edge_inspect.trainer.heads.pirn.train import PirnTraining
from edge_inspect.trainer.heads.registry import MethodSpec, register


def build(cfg) -> PirnHead:
    from edge_inspect.trainer.backbones import build_backbone

    head_cfg = PirnConfig(**cfg.head_kwargs())
    encoders = {"rgb": build_backbone(cfg.backbone)}
    if "normals" in head_cfg.modalities and not head_cfg.share_encoder:
        encoders["normals"] = copy.deepcopy(encoders["rgb"])  # a separate instance, same weights
    return PirnHead(encoders, head_cfg)


SPEC = register(MethodSpec(
    name="pirn", config=PirnConfig, build=build, training=PirnTraining(), backbones=("dinov2",),
    min_shots=1,
    summary="PIRN: RGB + surface-normal prototype reconstruction (OT assignment, APR, MNC)"))
