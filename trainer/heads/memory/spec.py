"""Registers the training-free few-shot memory (``method: memory``): any backbone, at
least one shot; enrollment rebuilds the patch memory, its border-ring scales and the global
detector (shift reference from held-out normals, or the shots' window Gaussian) and the
per-detector thresholds
(recipe ``patch_memory`` with the head's settings)."""

from __future__ import annotations

from edge_inspect.trainer.heads.memory.model import MemoryHead, MemoryHeadConfig
from edge_inspect.trainer.heads.memory.train import MemoryTraining
from edge_inspect.trainer.heads.registry import MethodSpec, register


def build(cfg) -> MemoryHead:
    from edge_inspect.trainer.backbones import build_backbone

    return MemoryHead(build_backbone(cfg.backbone), MemoryHeadConfig(**cfg.head_kwargs()))


def recipe(head: MemoryHead) -> dict:
    c = head.cfg
    return {"kind": "patch_memory", "metric": c.metric, "use_global": c.use_global,
            "window": c.window, "stride": c.stride, "grid": list(head.backbone.grid),
            "global_detector": c.global_detector, "reference_images": head.reference_normals,
            "border_rings": c.border_rings, "border_quantile": c.border_quantile,
            "shot_turns": c.shot_turns,
            "detectors": list(head.detectors), "detector_shares": list(head.detector_shares),
            "detector_tails": list(head.detector_tails)}


SPEC = register(MethodSpec(
    name="memory", config=MemoryHeadConfig, build=build, training=MemoryTraining(),
    memory_recipe=recipe, min_shots=1,
    summary="training-free few-shot patch memory + image-shift detector, any backbone"))
