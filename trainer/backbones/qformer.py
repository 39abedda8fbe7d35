"""BLIP-Diffusion's Q-Former: IIPAD's per-image category tokens, loaded from a diffusers folder.

IIPAD (research/official_code.md section 3a) conditions its prompt generator on 16 query
tokens of width 768 from the Q-Former of diffusers' ``BlipDiffusionPipeline`` with the subject
text "object". What that model computes, and what this module computes:

* its own vision encoder, a CLIP ViT-L/14 cut to 23 blocks: patchify (no bias), class token,
  positions, LayerNorm before the blocks, pre-LN blocks, and a LayerNorm after them over
  *all* tokens (the image tokens the queries read);
* BERT-style layers over the 16 learned queries followed by the text tokens
  ``[CLS] object [SEP]`` (ids 101 4874 102 in bert-base-uncased; the text tokens get word and
  position embeddings, queries none, one LayerNorm over both): self-attention over queries and
  text together, then, for the queries only, cross-attention to the image tokens in every
  ``cross_every``-th layer; queries and text have separate feed-forward blocks; post-LN
  residuals (BERT);
* the projection layer on the 16 query outputs: ``x + W2 quick_gelu(W1 LN(x))``.

The official IIPAD code passes ``['object'] * 10`` and averages the 10 outputs; they are
identical without dropout, so one copy is computed. The image is the same CLIP-normalized 224
tensor the CLIP tower sees, as the official code feeds it at test time (its training and bank
building use BLIP-Diffusion's own image preprocessing instead; here one preprocessing serves
training, export and the runtime).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edge_inspect.trainer.backbones.checkpoint_io import WeightsFileError, check_keys, read_weights
from edge_inspect.trainer.backbones.clip import QuickGELU, Transformer, _activation

log = logging.getLogger(__name__)

# "[CLS] object [SEP]" in bert-base-uncased's vocabulary (the tokenizer diffusers' Q-Former
# loads by default); a config.json may name another tokenizer, so the ids are a setting.
OBJECT_TEXT_IDS = (101, 4874, 102)
_HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                   "gelu_pytorch_tanh": "gelu_tanh"}


@dataclass(frozen=True)
class QFormerConfig:
    """Sizes of the Q-Former and its vision encoder (``blip-diffusion``: the released model)."""

    vision_width: int = 1024
    vision_layers: int = 23
    vision_heads: int = 16
    vision_mlp: int = 4096
    patch_size: int = 14
    image_size: int = 224
    vision_act: str = "quick_gelu"
    vision_eps: float = 1e-5
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp: int = 3072
    cross_every: int = 1
    vocab_size: int = 30523
    max_positions: int = 512
    eps: float = 1e-12
    act: str = "gelu"
    queries: int = 16
    text_ids: tuple[int, ...] = OBJECT_TEXT_IDS

    @classmethod
    def from_hf(cls, config: dict, path: Path | str = "config.json") -> QFormerConfig:
        """From the ``Blip2Config`` JSON a ``BlipDiffusionPipeline`` saves in ``qformer/``."""
        try:
            v, q = config["vision_config"], config["qformer_config"]
            acts = [_HF_ACTIVATIONS[c.get("hidden_act", "gelu")] for c in (v, q)]
            return cls(vision_width=v["hidden_size"], vision_layers=v["num_hidden_layers"],
                       vision_heads=v["num_attention_heads"], vision_mlp=v["intermediate_size"],
                       patch_size=v["patch_size"], image_size=v["image_size"], vision_act=acts[0],
                       vision_eps=float(v.get("layer_norm_eps", 1e-6)), width=q["hidden_size"],
                       layers=q["num_hidden_layers"], heads=q["num_attention_heads"],
                       mlp=q["intermediate_size"], cross_every=q.get("cross_attention_frequency", 2),
                       vocab_size=q["vocab_size"], max_positions=q.get("max_position_embeddings", 512),
                       eps=float(q.get("layer_norm_eps", 1e-12)), act=acts[1],
                       queries=config.get("num_query_tokens", 32))
        except KeyError as exc:
            raise WeightsFileError(f"{path}: not a BLIP-2 / BLIP-Diffusion Q-Former config "
                                   f"(missing {exc}; or an unsupported hidden_act)") from None


class BlipVisionEncoder(nn.Module):
    """The Q-Former's image encoder: CLIP's ViT with LayerNorm after the blocks on all tokens."""

    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        w, grid = cfg.vision_width, cfg.image_size // cfg.patch_size
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(w))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, w))
        self.ln_pre = nn.LayerNorm(w, eps=cfg.vision_eps)
        self.transformer = Transformer(w, cfg.vision_layers, cfg.vision_heads, cfg.vision_mlp / w,
                                       cfg.vision_act)
        for block in self.transformer.resblocks:
            block.ln_1.eps = block.ln_2.eps = cfg.vision_eps
        self.ln_post = nn.LayerNorm(w, eps=cfg.vision_eps)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        return self.ln_post(self.transformer(x))


class _QKV(nn.Module):
    def __init__(self, width: int, context_width: int) -> None:
        super().__init__()
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(context_width, width)
        self.value = nn.Linear(context_width, width)


class _AddNorm(nn.Module):
    """BERT's output block: ``LayerNorm(dense(h) + residual)``."""

    def __init__(self, inner: int, width: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(inner, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class _Attention(nn.Module):
    """Multi-head (cross-)attention with a post-LN residual; keys and values from ``context``."""

    def __init__(self, width: int, heads: int, eps: float, context_width: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.attention = _QKV(width, context_width or width)
        self.output = _AddNorm(width, width, eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        ctx = x if context is None else context
        b, n, w = x.shape
        d = w // self.heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, t.shape[1], self.heads, d).transpose(1, 2)

        qkv = self.attention
        q, k, v = heads(qkv.query(x)), heads(qkv.key(ctx)), heads(qkv.value(ctx))
        att = ((q @ k.transpose(-2, -1)) * d**-0.5).softmax(dim=-1) @ v
        return self.output(att.transpose(1, 2).reshape(b, n, w), x)


class _FeedForward(nn.Module):
    def __init__(self, width: int, inner: int, act: str) -> None:
        super().__init__()
        self.dense = nn.Linear(width, inner)
        self.act = _activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class QFormerLayer(nn.Module):
    """Joint self-attention over queries and text; queries also cross-attend to the image."""

    def __init__(self, cfg: QFormerConfig, index: int) -> None:
        super().__init__()
        self.attention = _Attention(cfg.width, cfg.heads, cfg.eps)
        self.crossattention = (_Attention(cfg.width, cfg.heads, cfg.eps, cfg.vision_width)
                               if index % cfg.cross_every == 0 else None)
        self.intermediate_query = _FeedForward(cfg.width, cfg.mlp, cfg.act)
        self.output_query = _AddNorm(cfg.mlp, cfg.width, cfg.eps)
        self.intermediate = _FeedForward(cfg.width, cfg.mlp, cfg.act)
        self.output = _AddNorm(cfg.mlp, cfg.width, cfg.eps)

    def forward(self, x: torch.Tensor, image: torch.Tensor, queries: int) -> torch.Tensor:
        x = self.attention(x)
        q, text = x[:, :queries], x[:, queries:]
        if self.crossattention is not None:
            q = self.crossattention(q, image)
        q = self.output_query(self.intermediate_query(q), q)
        text = self.output(self.intermediate(text), text)
        return torch.cat([q, text], dim=1)


class _TextEmbeddings(nn.Module):
    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.width)
        self.LayerNorm = nn.LayerNorm(cfg.width, eps=cfg.eps)


class _ProjLayer(nn.Module):
    """``x + dense2(quick_gelu(dense1(LayerNorm(x))))`` (BLIP-Diffusion's projection)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.dense1 = nn.Linear(width, 4 * width)
        self.act = QuickGELU()
        self.dense2 = nn.Linear(4 * width, width)
        self.LayerNorm = nn.LayerNorm(width, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dense2(self.act(self.dense1(self.LayerNorm(x))))


class _Stack(nn.Module):
    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(cfg, i) for i in range(cfg.layers))


class QFormer(nn.Module):
    """Images ``(B, 3, 224, 224)``, CLIP-normalized, to query tokens ``(B, queries, width)``.

    Parameter names follow diffusers' ``Blip2QFormerModel`` except the vision encoder's, which
    use OpenAI CLIP's (converted by :func:`diffusers_to_ours`).
    """

    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        if max(cfg.text_ids) >= cfg.vocab_size or len(cfg.text_ids) > cfg.max_positions:
            raise ValueError(f"text ids {cfg.text_ids} do not fit a vocabulary of {cfg.vocab_size}")
        self.cfg = cfg
        self.visual_encoder = BlipVisionEncoder(cfg)
        self.embeddings = _TextEmbeddings(cfg)
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.queries, cfg.width))
        self.encoder = _Stack(cfg)
        self.proj_layer = _ProjLayer(cfg.width)
        self.register_buffer("text_ids", torch.tensor(cfg.text_ids), persistent=False)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.cfg.image_size, self.cfg.image_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) != self.input_size:
            raise ValueError(f"the Q-Former takes {self.input_size} images, got {tuple(images.shape[-2:])}")
        image = self.visual_encoder(images)
        b = images.shape[0]
        emb = self.embeddings
        n_text = self.text_ids.shape[0]
        text = emb.word_embeddings(self.text_ids) + emb.position_embeddings.weight[:n_text]
        x = torch.cat([self.query_tokens, text[None]], dim=1).expand(b, -1, -1)
        x = emb.LayerNorm(x)
        for layer in self.encoder.layer:
            x = layer(x, image, self.cfg.queries)
        return self.proj_layer(x[:, :self.cfg.queries])


_VISION_NAMES = {"self_attn.projection": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                 "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def diffusers_to_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers / transformers BLIP-2 vision names to this module's (OpenAI CLIP's).

    Older checkpoints store the attention bias as ``q_bias`` and ``v_bias`` (keys unbiased);
    newer transformers as one ``qkv.bias``. Keys not under ``visual_encoder.`` pass through.
    """
    out: dict[str, torch.Tensor] = {}
    pre = "visual_encoder."
    for k, v in sd.items():
        if not k.startswith(pre):
            out[k] = v
            continue
        name = k[len(pre):]
        if name == "embeddings.class_embedding":
            out[pre + "class_embedding"] = v.reshape(-1)
        elif name == "embeddings.position_embedding":
            out[pre + "positional_embedding"] = v.reshape(-1, v.shape[-1])
        elif name == "embeddings.patch_embedding.weight":
            out[pre + "conv1.weight"] = v
        elif name.startswith(("pre_layernorm.", "post_layernorm.")):
            out[pre + name.replace("pre_layernorm", "ln_pre").replace("post_layernorm", "ln_post")] = v
        elif name.startswith("encoder.layers."):
            i, rest = name[len("encoder.layers."):].split(".", 1)
            block = f"{pre}transformer.resblocks.{i}."
            if rest == "self_attn.qkv.weight":
                out[block + "attn.in_proj_weight"] = v
            elif rest == "self_attn.qkv.bias":
                out[block + "attn.in_proj_bias"] = v
            elif rest in ("self_attn.q_bias", "self_attn.v_bias"):
                continue  # merged below
            else:
                for theirs, ours in _VISION_NAMES.items():
                    if rest.startswith(theirs + "."):
                        rest = ours + rest[len(theirs):]
                        break
                out[block + rest] = v
        else:
            out[k] = v  # unknown: reported by check_keys
    for k, q_bias in sd.items():
        if k.startswith(pre + "encoder.layers.") and k.endswith("self_attn.q_bias"):
            i = k[len(pre + "encoder.layers."):].split(".", 1)[0]
            v_bias = sd[k.replace("q_bias", "v_bias")]
            out[f"{pre}transformer.resblocks.{i}.attn.in_proj_bias"] = torch.cat(
                [q_bias, torch.zeros_like(q_bias), v_bias])
    return out


def qformer_folder(path: str | Path) -> Path:
    """The ``qformer/`` folder of a ``BlipDiffusionPipeline`` folder, or the folder itself."""
    path = Path(path)
    if (path / "qformer" / "config.json").exists():
        return path / "qformer"
    if (path / "config.json").exists():
        return path
    raise WeightsFileError(f"{path}: no qformer/config.json or config.json; give the folder of a "
                           "diffusers BlipDiffusionPipeline (e.g. Salesforce/blipdiffusion) or its "
                           "qformer/ subfolder")


def load_qformer(path: str | Path, text_ids: tuple[int, ...] = OBJECT_TEXT_IDS) -> QFormer:
    """A frozen :class:`QFormer` in eval mode from a diffusers ``BlipDiffusionPipeline`` folder."""
    folder = qformer_folder(path)
    sd, _ = read_weights(folder)
    cfg = QFormerConfig.from_hf(json.loads((folder / "config.json").read_text()), folder / "config.json")
    cfg = QFormerConfig(**{**cfg.__dict__, "text_ids": tuple(text_ids)})
    sd = {k: v.float() for k, v in diffusers_to_ours(sd).items()
          if k not in ("embeddings.position_ids",)}
    with torch.device("meta"):
        expected = QFormer(cfg).state_dict()
    check_keys(expected, sd, folder, "BLIP-Diffusion Q-Former", None)
    model = QFormer(cfg)
    model.load_state_dict(sd)
    log.info("loaded the Q-Former (%d-block vision encoder, %d layers, %d queries) from %s",
             cfg.vision_layers, cfg.layers, cfg.queries, folder)
    return model.eval().requires_grad_(False)



def random_qformer(image_size: int, patch_size: int, width: int, seed: int = 0) -> QFormer:
    """A tiny random-weight Q-Former for tests and smoke runs (``head.qformer: random``):
    2 vision blocks of width 32, 2 layers of ``width`` (the CLIP text width), 8 queries, a
    10-token vocabulary with ``[CLS] object [SEP]`` at ids 3 6 4."""
    cfg = QFormerConfig(vision_width=32, vision_layers=2, vision_heads=4, vision_mlp=64,
                        patch_size=patch_size, image_size=image_size, width=width, layers=2,
                        heads=4, mlp=2 * width, vocab_size=10, max_positions=16, queries=8,
                        text_ids=(3, 6, 4))
    gen = torch.Generator().manual_seed(seed)
    model = QFormer(cfg)
    with torch.no_grad():  # the zero-initialized parameters get values, as trained ones have
        model.query_tokens.copy_(0.02 * torch.randn(model.query_tokens.shape, generator=gen))  # BLIP-2's init
        for p in (model.visual_encoder.class_embedding, model.visual_encoder.positional_embedding):
            p.copy_(torch.randn(p.shape, generator=gen))
    return model.eval().requires_grad_(False)
