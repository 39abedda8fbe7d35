"""Load CLIP weights from OpenAI archives, open_clip checkpoints and Hugging Face folders.

The layout is detected from the keys: OpenAI and open_clip share the OpenAI names
(``visual.transformer.resblocks.*``); Hugging Face ``CLIPModel`` uses
``vision_model.encoder.layers.*`` and is converted (q/k/v concatenated into
``in_proj_weight``, projections transposed). The architecture is inferred from the tensor
shapes, so a file that does not fit the requested one is reported with what it looks like.
Head counts and the activation are never guessed from the width: they are read from the
file (Hugging Face config; OpenAI archives follow OpenAI's rule) or a named architecture,
or the user is asked for them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from edge_inspect.trainer.backbones.checkpoint_io import (
    WeightsFileError,
    check_keys,
    is_torchscript_archive,
    read_weights,
)
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


def _shape_config(sd: dict[str, torch.Tensor]) -> ClipConfig:
    """Everything the tensor shapes tell; heads (0) and activation are not among it."""
    try:
        conv = sd["visual.conv1.weight"]
        width, patch = conv.shape[0], conv.shape[-1]
        grid = int(round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5))
        return ClipConfig(
            name="inferred",
            image_size=grid * patch,
            patch_size=patch,
            width=width,
            layers=_count_blocks(sd, "visual.transformer.resblocks."),
            heads=0,
            embed_dim=sd["text_projection"].shape[1],
            text_width=sd["ln_final.weight"].shape[0],
            text_layers=_count_blocks(sd, "transformer.resblocks."),
            text_heads=0,
            context_length=sd["positional_embedding"].shape[0],
            vocab_size=sd["token_embedding.weight"].shape[0],
            mlp_ratio=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
            act="",
        )
    except KeyError as exc:
        raise WeightsFileError(f"not a CLIP state dict: key {exc} missing") from exc


def named_match(sd: dict[str, torch.Tensor]) -> ClipConfig | None:
    """The named architecture whose shapes the state dict has, if any."""
    return _named(_shape_config(sd))


def _named(shapes: ClipConfig) -> ClipConfig | None:
    for known in CLIP_CONFIGS.values():
        if replace(known, name="inferred", heads=0, text_heads=0, act="") == shapes:
            return known
    return None


def infer_clip_config(sd: dict[str, torch.Tensor], facts: ClipFileFacts | None = None) -> ClipConfig:
    """Architecture from the shapes of an OpenAI-layout state dict plus what the file says.

    Head counts and the activation are not stored in the weights. They come from the file
    (a Hugging Face config), from OpenAI's own rule for OpenAI TorchScript archives (width /
    64, QuickGELU: what OpenAI's loader does), or from a named architecture with the same
    shapes; otherwise :class:`WeightsFileError` asks for them.
    """
    facts = facts or ClipFileFacts("state_dict")
    cfg = _shape_config(sd)
    known = _named(cfg)
    heads, text_heads = facts.heads, facts.text_heads
    if heads is None:
        if known is not None:
            heads, text_heads = known.heads, known.text_heads
        elif facts.source == "torchscript":
            heads, text_heads = max(1, cfg.width // 64), max(1, cfg.text_width // 64)
        else:
            raise WeightsFileError(
                f"shapes match no named CLIP architecture ({', '.join(CLIP_CONFIGS)}) and a "
                f"{facts.source} does not store head counts; set backbone.heads and "
                f"backbone.text_heads (vision width {cfg.width}, text width {cfg.text_width})")
    cfg = replace(known or cfg, heads=heads, text_heads=text_heads, act=facts.act or "")
    if known is not None and (heads, text_heads) != (known.heads, known.text_heads):
        cfg = replace(cfg, name=f"{known.name} (file heads {heads}/{text_heads})")
    return cfg


def hf_to_openai(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


# Hugging Face ``hidden_act`` names and ours; anything else is refused, not approximated.
_HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                   "gelu_pytorch_tanh": "gelu_tanh"}
# transformers' CLIPVisionConfig / CLIPTextConfig defaults, used when config.json omits a key.
_HF_DEFAULTS = {"vision_config": {"num_attention_heads": 12, "hidden_act": "quick_gelu"},
                "text_config": {"num_attention_heads": 8, "hidden_act": "quick_gelu"}}


@dataclass(frozen=True)
class ClipFileFacts:
    """What a weights file says beyond its tensor shapes.

    ``source`` is ``torchscript`` (an OpenAI archive), ``hf`` (a Hugging Face folder with
    config.json) or ``state_dict`` (OpenAI / open_clip tensors alone: no head count, no
    activation).
    """

    source: str
    heads: int | None = None
    text_heads: int | None = None
    act: str | None = None


def _hf_facts(config: dict, path: Path) -> ClipFileFacts:
    """Heads and activation from a ``CLIPModel`` config.json, as transformers reads it."""
    found = {}
    for tower, defaults in _HF_DEFAULTS.items():
        sub = {**defaults, **(config.get(tower) or {})}
        act = _HF_ACTIVATIONS.get(sub["hidden_act"])
        if act is None:
            raise WeightsFileError(f"{path}: {tower}.hidden_act {sub['hidden_act']!r} is not "
                                   f"supported; supported: {sorted(_HF_ACTIVATIONS)}")
        eps = sub.get("layer_norm_eps", 1e-5)
        if abs(float(eps) - 1e-5) > 1e-12:
            raise WeightsFileError(f"{path}: {tower}.layer_norm_eps {eps} is not supported "
                                   "(CLIP uses 1e-5)")
        found[tower] = (int(sub["num_attention_heads"]), act)
    (heads, act), (text_heads, text_act) = found["vision_config"], found["text_config"]
    if act != text_act:
        raise WeightsFileError(f"{path}: the towers use different activations ({act} vision, "
                               f"{text_act} text); edge-inspect supports one per model")
    return ClipFileFacts("hf", heads, text_heads, act)


def read_clip_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str, ClipFileFacts]:
    """OpenAI-layout state dict of any supported file, its detected layout, and what the
    file says about heads and activation."""
    path = Path(path)
    sd, hf_config = read_weights(path)
    layout = detect_clip_layout(sd)
    if layout == "unknown":
        raise WeightsFileError(
            f"{path}: not a CLIP checkpoint (no visual.conv1.weight or "
            "vision_model.embeddings.patch_embedding.weight); DINOv2 files load with "
            "trainer.backbones.dinov2.load_dinov2"
        )
    if hf_config is not None:
        facts = _hf_facts(hf_config, path)
    elif path.is_file() and is_torchscript_archive(path):
        facts = ClipFileFacts("torchscript", act="quick_gelu")
    else:
        facts = ClipFileFacts("state_dict")
    if layout == "hf":
        try:
            sd = hf_to_openai(sd)
        except KeyError as exc:
            raise WeightsFileError(f"{path}: Hugging Face CLIP layout without key {exc}") from exc
    sd = {k: v.float() for k, v in sd.items() if k not in _IGNORED_KEYS}
    return sd, layout, facts


def load_clip(
    path: str | Path,
    arch: str | None = None,
    act: str | None = None,
    input_size: int | tuple[int, int] | None = None,
    interpolation: str = "bilinear",
    antialias: bool = False,
    heads: int | None = None,
    text_heads: int | None = None,
) -> ClipModel:
    """Build a :class:`ClipModel` from a weights file, fp32, frozen, in eval mode.

    Args:
        path: OpenAI archive (TorchScript or state dict), open_clip checkpoint
            (.pt/.bin/.safetensors) or Hugging Face ``CLIPModel`` folder.
        arch: expected architecture (``ViT-L-14-336``); inferred from the file when None.
        act: ``quick_gelu`` (OpenAI weights) or ``gelu`` (most LAION open_clip weights).
            Required for a plain state dict, which does not say; an OpenAI TorchScript
            archive (QuickGELU) and a Hugging Face config say it themselves.
        heads, text_heads: attention heads per tower, for a plain state dict whose shapes
            match no named architecture (head counts are not stored in the tensors).
        input_size: resize and bake the positional embedding for this input size.
        interpolation: ``bilinear`` (AF-CLIP, AnomalyCLIP) or ``bicubic`` (open_clip).
        antialias: torch's antialias flag for the resize.
    """
    path = Path(path)
    sd, layout, facts = read_clip_state_dict(path)
    if heads is not None or text_heads is not None:
        if heads is None or text_heads is None:
            raise WeightsFileError("set both backbone.heads and backbone.text_heads, or neither")
        if facts.heads is not None and (facts.heads, facts.text_heads) != (heads, text_heads):
            raise WeightsFileError(f"{path} says {facts.heads}/{facts.text_heads} heads, the "
                                   f"config {heads}/{text_heads}; drop backbone.heads")
        facts = replace(facts, heads=heads, text_heads=text_heads)
    if act is not None:
        if facts.act is not None and act != facts.act:
            raise WeightsFileError(f"{path} was trained with {facts.act}, the config asks for "
                                   f"{act}; drop backbone.act")
        facts = replace(facts, act=act)
    try:
        inferred = infer_clip_config(sd, facts)
        looks_like = inferred.describe()
    except WeightsFileError as exc:
        if not arch:
            raise WeightsFileError(f"{path}: {exc}") from exc
        inferred, looks_like = None, None
    if arch:
        cfg = get_clip_config(arch)
        if facts.heads is not None and (facts.heads, facts.text_heads) != (cfg.heads, cfg.text_heads):
            raise WeightsFileError(
                f"{path} has {facts.heads} vision / {facts.text_heads} text heads, architecture "
                f"{arch} {cfg.heads} / {cfg.text_heads}; drop backbone.arch to use the file's")
        fixed_act = facts.act or (cfg.act if arch.endswith("-quickgelu") else None)
        cfg = replace(cfg, act=fixed_act or "")
    else:
        cfg = inferred
    with torch.device("meta"):  # keys and shapes only; the activation does not change them
        expected = ClipModel(replace(cfg, act=cfg.act or "quick_gelu")).state_dict()
    check_keys(expected, sd, path, cfg.name, looks_like)
    if not cfg.act:
        raise WeightsFileError(
            f"{path}: a plain state dict does not say which activation its MLPs use; set "
            "backbone.act: quick_gelu (OpenAI weights) or gelu (LAION / DataComp open_clip "
            "weights)")
    model = ClipModel(cfg)
    model.load_state_dict(sd)
    log.info("loaded CLIP %s (%s layout) from %s", cfg.describe(), layout, path)
    if input_size is not None:
        model.visual.set_input_size(input_size, mode=interpolation, antialias=antialias)
    model.eval().requires_grad_(False)
    return model
