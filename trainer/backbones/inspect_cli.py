"""``edge-inspect inspect-weights FILE``: what a weights file is, before you train on it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge_inspect.trainer.backbones.checkpoint_io import (
    WeightsFileError,
    is_torchscript_archive,
    read_weights,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("weights", type=Path, help="weights file or Hugging Face model folder")


def describe_weights(path: Path) -> str:
    """One paragraph: container format, layout, inferred architecture, tensor count."""
    from edge_inspect.trainer.backbones.clip_weights import (
        detect_clip_layout,
        infer_clip_config,
        read_clip_state_dict,
    )
    from edge_inspect.trainer.backbones.dinov2 import hf_dinov2_to_official, infer_dinov2_config

    raw, hf_config = read_weights(path)
    if path.is_dir():
        container = "Hugging Face folder"
    elif path.suffix == ".safetensors":
        container = "safetensors"
    elif is_torchscript_archive(path):
        container = "TorchScript archive (read without running its code)"
    else:
        container = "torch checkpoint (weights_only)"
    n_params = sum(v.numel() for v in raw.values())
    lines = [f"{path}: {container}, {len(raw)} tensors, {n_params / 1e6:.1f} M values"]
    if detect_clip_layout(raw) != "unknown":
        sd, layout, facts = read_clip_state_dict(path)
        try:
            lines.append(f"CLIP ({layout} layout): {infer_clip_config(sd, facts).describe()}")
        except WeightsFileError as exc:
            lines.append(f"CLIP ({layout} layout), architecture not fully known: {exc}")
        if not facts.act:
            lines.append("activation: not stored in a plain state dict; set backbone.act "
                         "(quick_gelu for OpenAI weights, gelu for LAION open_clip)")
    elif any("patch_embeddings.projection" in k for k in raw) or "patch_embed.proj.weight" in raw:
        sd = raw if "patch_embed.proj.weight" in raw else hf_dinov2_to_official(raw)
        lines.append(f"DINOv2: {infer_dinov2_config(sd).describe()}")
    else:
        lines.append("not a CLIP or DINOv2 checkpoint; first keys: " + ", ".join(list(raw)[:5]))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        print(describe_weights(args.weights))
    except WeightsFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
