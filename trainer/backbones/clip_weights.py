"""Load CLIP weights from OpenAI archives, open_clip checkpoints and Hugging Face folders.

The layout is detected from the keys: OpenAI and open_clip share the OpenAI names
(``visual.transformer.resblocks.*``); Hugging Face ``CLIPModel`` uses
``vision_model.encoder.layers.*`` and is converted (q/k/v concatenated into
``in_proj_weight``, projections transposed). The architecture is inferred from the tensor
shapes, so a file that does not fit the requested one is reported with what it looks like.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from edge_inspect.trainer.backbones.checkpoint_io import WeightsFileError, check_keys, read_weights
from edge_inspect.trainer.backbones.clip import CLIP_CONFIGS, ClipConfig, ClipModel, get_clip_config

log = logging.getLogger(__name__)

# Non-parameter entries OpenAI archives and open_clip checkpoints carry.
_IGNORED_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")


def detect_clip_layout(sd: dict[str, torch.Tensor]) -> str:
    """``openai`` (OpenAI and open_clip), ``hf`` (transformers CLIPModel) or ``unknown``."""
    if "visual.conv1.weight" in sd:
        return "openai"
    if "vision_model.embeddings.patch_embedding.weight" in sd:
        return "hf"
    return "unknown"


def _count_blocks(sd: dict[str, torch.Tensor], prefix: str) -> int:
    ids = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


def infer_clip_config(sd: dict[str, torch.Tensor], act: str = "quick_gelu") -> ClipConfig:
    """Architecture from the shapes of an OpenAI-layout state dict.

    Head counts are not stored in the weights; they follow CLIP's rule (width / 64).
    """
    try:
        conv = sd["visual.conv1.weight"]
        width, patch = conv.shape[0], conv.shape[-1]
        grid = int(round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5))
        text_width = sd["ln_final.weight"].shape[0]
        cfg = ClipConfig(
            name="inferred",
            image_size=grid * patch,
            patch_size=patch,
            width=width,
            layers=_count_blocks(sd, "visual.transformer.resblocks."),
            heads=max(1, width // 64),
            embed_dim=sd["text_projection"].shape[1],
            text_width=text_width,
            text_layers=_count_blocks(sd, "transformer.resblocks."),
            text_heads=max(1, text_width // 64),
            context_length=sd["positional_embedding"].shape[0],
            vocab_size=sd["token_embedding.weight"].shape[0],
            mlp_ratio=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
            act=act,
        )
    except KeyError as exc:
        raise WeightsFileError(f"not a CLIP state dict: key {exc} missing") from exc
    for known in CLIP_CONFIGS.values():
        if replace(known, name="inferred", heads=cfg.heads, text_heads=cfg.text_heads,
                   act=act) == cfg:
            return replace(known, act=act)
    return cfg


def hf_to_openai(sd: dict[str, torch.Tensor], config: dict | None = None) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face ``CLIPModel`` state dict to the OpenAI layout."""
    out: dict[str, torch.Tensor] = {}
    v, t = "vision_model.", "text_model."
    out["visual.conv1.weight"] = sd[v + "embeddings.patch_embedding.weight"]
    out["visual.class_embedding"] = sd[v + "embeddings.class_embedding"]
    out["visual.positional_embedding"] = sd[v + "embeddings.position_embedding.weight"]
    for src, dst in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        out[f"visual.{dst}.weight"] = sd[f"{v}{src}.weight"]
        out[f"visual.{dst}.bias"] = sd[f"{v}{src}.bias"]
    out["visual.proj"] = sd["visual_projection.weight"].t().contiguous()
    out["token_embedding.weight"] = sd[t + "embeddings.token_embedding.weight"]
    out["positional_embedding"] = sd[t + "embeddings.position_embedding.weight"]
    out["ln_final.weight"] = sd[t + "final_layer_norm.weight"]
    out["ln_final.bias"] = sd[t + "final_layer_norm.bias"]
    out["text_projection"] = sd["text_projection.weight"].t().contiguous()
    out["logit_scale"] = sd["logit_scale"]
    for src_prefix, dst_prefix in ((v, "visual.transformer.resblocks."), (t, "transformer.resblocks.")):
        for i in range(_count_blocks(sd, src_prefix + "encoder.layers.")):
            s = f"{src_prefix}encoder.layers.{i}."
            d = f"{dst_prefix}{i}."
            for part in ("weight", "bias"):
                out[d + f"attn.in_proj_{part}"] = torch.cat(
                    [sd[s + f"self_attn.{n}_proj.{part}"] for n in ("q", "k", "v")])
                out[d + f"attn.out_proj.{part}"] = sd[s + f"self_attn.out_proj.{part}"]
                out[d + f"ln_1.{part}"] = sd[s + f"layer_norm1.{part}"]
                out[d + f"ln_2.{part}"] = sd[s + f"layer_norm2.{part}"]
                out[d + f"mlp.c_fc.{part}"] = sd[s + f"mlp.fc1.{part}"]
                out[d + f"mlp.c_proj.{part}"] = sd[s + f"mlp.fc2.{part}"]
    return out


def _hf_activation(config: dict | None) -> str | None:
    if not config:
        return None
    act = config.get("vision_config", {}).get("hidden_act", "quick_gelu")
    return {"quick_gelu": "quick_gelu", "gelu": "gelu"}.get(act)


def read_clip_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str, str | None]:
    """OpenAI-layout state dict of any supported file, its detected layout and activation."""
    sd, hf_config = read_weights(path)
    layout = detect_clip_layout(sd)
    if layout == "unknown":
        raise WeightsFileError(
            f"{path}: not a CLIP checkpoint (no visual.conv1.weight or "
            "vision_model.embeddings.patch_embedding.weight); DINOv2 files load with "
            "trainer.backbones.dinov2.load_dinov2"
        )
    act = None
    if layout == "hf":
        try:
            sd = hf_to_openai(sd, hf_config)
        except KeyError as exc:
            raise WeightsFileError(f"{path}: Hugging Face CLIP layout without key {exc}") from exc
        act = _hf_activation(hf_config)
    sd = {k: v.float() for k, v in sd.items() if k not in _IGNORED_KEYS}
    return sd, layout, act


def load_clip(
    path: str | Path,
    arch: str | None = None,
    act: str | None = None,
    input_size: int | tuple[int, int] | None = None,
    interpolation: str = "bilinear",
    antialias: bool = False,
) -> ClipModel:
    """Build a :class:`ClipModel` from a weights file, fp32, frozen, in eval mode.

    Args:
        path: OpenAI archive (TorchScript or state dict), open_clip checkpoint
            (.pt/.bin/.safetensors) or Hugging Face ``CLIPModel`` folder.
        arch: expected architecture (``ViT-L-14-336``); inferred from the file when None.
        act: ``quick_gelu`` (OpenAI weights, the default) or ``gelu`` (most LAION open_clip
            weights); a Hugging Face config decides for itself.
        input_size: resize and bake the positional embedding for this input size.
        interpolation: ``bilinear`` (AF-CLIP, AnomalyCLIP) or ``bicubic`` (open_clip).
        antialias: torch's antialias flag for the resize.
    """
    path = Path(path)
    sd, layout, file_act = read_clip_state_dict(path)
    act = act or file_act or "quick_gelu"
    looks_like = None
    try:
        inferred = infer_clip_config(sd, act=act)
        looks_like = inferred.describe()
    except WeightsFileError:
        inferred = None
    cfg = get_clip_config(arch, act=act) if arch else inferred
    if cfg is None:
        raise WeightsFileError(f"{path}: cannot infer the CLIP architecture; pass arch=")
    model = ClipModel(cfg)
    check_keys(model.state_dict(), sd, path, cfg.name, looks_like)
    model.load_state_dict(sd)
    log.info("loaded CLIP %s (%s layout, %s) from %s", cfg.name, layout, act, path)
    if input_size is not None:
        model.visual.set_input_size(input_size, mode=interpolation, antialias=antialias)
    model.eval().requires_grad_(False)
    return model
