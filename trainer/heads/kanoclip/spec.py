"""Registers KAnoCLIP (``method: kanoclip``): CLIP with the V-V path, knowledge-driven
prompts (``head.knowledge``: YAML files under ``configs/kanoclip/knowledge/``), Bi-CMCI and
the Conv-Adapter; zero-shot, trained on auxiliary data."""

from __future__ import annotations

from edge_inspect.trainer.heads.kanoclip.knowledge import load_knowledge
from edge_inspect.trainer.heads.kanoclip.model import KanoClipConfig, KanoClipHead
from edge_inspect.trainer.heads.kanoclip.train import KanoClipTraining
from edge_inspect.trainer.heads.registry import MethodSpec, register


def build(cfg) -> KanoClipHead:
    from edge_inspect.trainer.backbones import build_clip

    head_cfg = KanoClipConfig(**cfg.head_kwargs())
    knowledge = load_knowledge(head_cfg.knowledge) if head_cfg.knowledge else None
    return KanoClipHead(build_clip(cfg.backbone), head_cfg, knowledge)


SPEC = register(MethodSpec(
    name="kanoclip", config=KanoClipConfig, build=build, training=KanoClipTraining(),
    backbones=("clip",), needs_train_data=True,
    summary="KAnoCLIP: knowledge-driven prompts, CLIP-VV, Bi-CMCI, Conv-Adapter (zero-shot)"))
