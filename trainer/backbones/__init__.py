"""Frozen backbones behind one interface: CLIP ViT, DINOv2, and the weight-free texture bank."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_inspect.trainer.backbones.base import Backbone

KINDS = ("clip", "dinov2", "texture")


@dataclass
class BackboneSpec:
    """What a YAML config says about the backbone.

    Attributes:
        kind: ``clip``, ``dinov2`` or ``texture``.
        arch: architecture name (``ViT-L-14-336``, ``dinov2_vitb14_reg4``, ``tiny-p16-w64``);
            inferred from the weights when omitted.
        weights: file or Hugging Face folder; None builds random weights (tests only) for
            clip/dinov2 and is the normal case for texture.
        input_size: square input size; positional embeddings are resized once for it.
        interpolation: positional-embedding resize mode (``bilinear`` or ``bicubic``).
        act: CLIP activation (``quick_gelu`` / ``gelu`` / ``gelu_tanh``); needed only for a
            plain state dict, which does not say (OpenAI archives and HF folders do).
        heads, text_heads: CLIP attention heads per tower, needed only for a plain state
            dict whose shapes match no named architecture.
        antialias: antialias the positional-embedding resize (open_clip does; AF-CLIP not).
    """

    kind: str = "texture"
    arch: str | None = None
    weights: str | None = None
    input_size: int | None = None
    interpolation: str = "bilinear"
    act: str | None = None
    heads: int | None = None
    text_heads: int | None = None
    antialias: bool = False

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> BackboneSpec:
        """Build from a YAML mapping; unknown keys are an error naming the allowed ones."""
        allowed = set(cls.__dataclass_fields__)
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"{source}: unknown backbone keys {sorted(unknown)}; "
                             f"allowed: {sorted(allowed)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> BackboneSpec:
        """Read ``configs/backbones/*.yaml`` (the mapping under ``backbone:``)."""
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        return cls.from_dict(data.get("backbone", data), str(path))


def build_backbone(spec: BackboneSpec) -> Backbone:
    """Build the frozen image backbone a spec describes (CLIP: the vision tower)."""
    if spec.kind not in KINDS:
        raise ValueError(f"backbone kind {spec.kind!r} unknown; choose one of {KINDS}")
    if spec.kind == "texture":
        from edge_inspect.trainer.backbones.texture import TextureBackbone

        return TextureBackbone(spec.input_size or 256).eval()
    if spec.kind == "clip":
        return build_clip(spec).visual
    from edge_inspect.trainer.backbones.dinov2 import DINOV2_CONFIGS, Dinov2Backbone, load_dinov2

    if spec.weights:
        return load_dinov2(Path(spec.weights), spec.arch, spec.input_size)
    model = Dinov2Backbone(DINOV2_CONFIGS[spec.arch or "tiny-dinov2"])
    if spec.input_size:
        model.set_input_size(spec.input_size)
    return model.eval().requires_grad_(False)


def build_clip(spec: BackboneSpec):
    """The whole CLIP model (image and text towers) a ``kind: clip`` spec describes."""
    from edge_inspect.trainer.backbones.clip import ClipModel, get_clip_config
    from edge_inspect.trainer.backbones.clip_weights import load_clip

    if spec.weights:
        return load_clip(spec.weights, spec.arch, spec.act, spec.input_size, spec.interpolation,
                         spec.antialias, spec.heads, spec.text_heads)
    model = ClipModel(get_clip_config(spec.arch or "tiny-p16-w64", act=spec.act))
    if spec.input_size:
        model.visual.set_input_size(spec.input_size, mode=spec.interpolation,
                                    antialias=spec.antialias)
    return model.eval().requires_grad_(False)


__all__ = ["Backbone", "BackboneSpec", "KINDS", "build_backbone", "build_clip"]
