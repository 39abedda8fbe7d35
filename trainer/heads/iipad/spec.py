"""Registers IIPAD (``method: iipad``): CLIP with the V-V path, BLIP-Diffusion's Q-Former
(``head.qformer``: a diffusers ``BlipDiffusionPipeline`` folder; ``random`` for tests) or the
class-token edge variant; one generator trained on the shots of every category."""

from __future__ import annotations

from dataclasses import replace

from edge_inspect.trainer.heads.iipad.model import IipadConfig, IipadHead
from edge_inspect.trainer.heads.iipad.train import IipadTraining
from edge_inspect.trainer.heads.registry import MethodSpec, register


def build(cfg) -> IipadHead:
    from edge_inspect.trainer.backbones import build_clip
    from edge_inspect.trainer.backbones.qformer import load_qformer, random_qformer

    head_cfg = IipadConfig(**cfg.head_kwargs())
    if head_cfg.retrieve is None:
        head_cfg = replace(head_cfg, retrieve=max(1, cfg.shots))  # the code's k = K
    clip = build_clip(cfg.backbone)
    qformer = None
    if head_cfg.condition == "qformer":
        if not head_cfg.qformer:
            raise ValueError(f"{cfg.source}: IIPAD needs head.qformer: the folder of a diffusers "
                             "BlipDiffusionPipeline (e.g. Salesforce/blipdiffusion), or "
                             "head.condition: class_token for the edge variant without it")
        if head_cfg.qformer == "random":
            size = clip.visual.input_size[0]
            qformer = random_qformer(size, clip.cfg.patch_size, clip.cfg.text_width, cfg.seed)
        else:
            qformer = load_qformer(head_cfg.qformer)
    return IipadHead(clip, qformer, head_cfg)


SPEC = register(MethodSpec(
    name="iipad", config=IipadConfig, build=build, training=IipadTraining(), backbones=("clip",),
    min_shots=1, one_for_all=True,
    memory_recipe=lambda head: {"kind": "category_aware", "capacity": head.capacity,
                                "retrieve": head.retrieve_count},
    summary="IIPAD: instance-induced prompts (CLIP class token + Q-Former), category-aware memory"))
