"""CLIP ViT (OpenAI / open_clip architecture), image and text towers.

Parameter names follow the OpenAI state dict exactly (``visual.conv1.weight``,
``visual.transformer.resblocks.0.attn.in_proj_weight``, ``text_projection``...), so OpenAI
and open_clip checkpoints load without renaming; Hugging Face ``CLIPModel`` folders are
converted in :mod:`trainer.backbones.clip_weights`.

What the heads need beyond stock CLIP:

* taps: the residual stream (CLS + patches) after any blocks, before ``ln_post``, and
  :meth:`ClipVisionTower.project` to apply ``ln_post`` + ``proj`` to any tokens;
* the V-V dual path with AnomalyCLIP semantics (research/official_code.md section 2): from
  block ``vv_from`` on, each block's qkv of ``ln_1(x_ori)`` also feeds
  ``softmax(v v^T / sqrt(d)) v`` through the same ``out_proj``; the V-V stream starts as the
  output of block ``vv_from - 1``, adds only these attention outputs (no MLP), and never
  feeds back into the original path;
* positional embeddings resized once for the input size (:meth:`ClipVisionTower.set_input_size`)
  and stored as the parameter, so nothing interpolates at run time;
* text prompts with learnable context vectors inserted before SOT (AF-CLIP) or after SOT
  (AnomalyCLIP), read at the EOT position.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from edge_inspect.trainer.backbones.base import OPENAI_CLIP_NORM, Backbone
from edge_inspect.trainer.backbones.pos_embed import resize_grid_embedding


@dataclass(frozen=True)
class ClipConfig:
    """Architecture of a CLIP ViT. ``image_size`` is the size the weights were trained at."""

    name: str
    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    embed_dim: int
    text_width: int
    text_layers: int
    text_heads: int
    context_length: int = 77
    vocab_size: int = 49408
    mlp_ratio: float = 4.0
    act: str = "quick_gelu"  # OpenAI weights: quick_gelu; most open_clip LAION weights: gelu

    @property
    def head_width(self) -> int:
        return self.width // self.heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def describe(self) -> str:
        return (f"{self.name}: width {self.width}, {self.layers} blocks, {self.heads} heads of "
                f"{self.head_width}, patch {self.patch_size}, input {self.image_size}, embed "
                f"{self.embed_dim}, text width {self.text_width} ({self.text_heads} heads), {self.act}")


CLIP_CONFIGS: dict[str, ClipConfig] = {
    c.name: c
    for c in (
        ClipConfig("ViT-B-32", 224, 32, 768, 12, 12, 512, 512, 12, 8),
        ClipConfig("ViT-B-16", 224, 16, 768, 12, 12, 512, 512, 12, 8),
        ClipConfig("ViT-L-14", 224, 14, 1024, 24, 16, 768, 768, 12, 12),
        ClipConfig("ViT-L-14-336", 336, 14, 1024, 24, 16, 768, 768, 12, 12),
        # open_clip ViT-H-14 (LAION-2B, DFN): 32 blocks of 16 heads of width 80 (not 1280 / 64),
        # GELU; the DFN weights use QuickGELU (arch ViT-H-14-quickgelu). CMAD's backbone.
        ClipConfig("ViT-H-14", 224, 14, 1280, 32, 16, 1024, 1024, 24, 16, act="gelu"),
        # Tiny random-init configs for tests: they differ in patch size and width.
        ClipConfig("tiny-p16-w64", 64, 16, 64, 3, 4, 32, 48, 2, 4),
        ClipConfig("tiny-p8-w96", 48, 8, 96, 4, 6, 40, 64, 2, 4),
    )
}


def get_clip_config(name: str, act: str | None = None) -> ClipConfig:
    """Look up an architecture by name (``ViT-L-14-336``); ``-quickgelu`` suffix accepted."""
    base = name.replace("/", "-").replace("@336px", "-336").removesuffix("-quickgelu")
    if base not in CLIP_CONFIGS:
        raise KeyError(f"unknown CLIP architecture {name!r}; known: {', '.join(CLIP_CONFIGS)}")
    cfg = CLIP_CONFIGS[base]
    if name.endswith("-quickgelu"):
        cfg = replace(cfg, act="quick_gelu")
    return replace(cfg, act=act) if act else cfg


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation, ``x * sigmoid(1.702 x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh")


def _activation(name: str) -> nn.Module:
    """``quick_gelu`` (OpenAI), ``gelu`` (exact, open_clip LAION), ``gelu_tanh`` (the tanh
    approximation Hugging Face calls ``gelu_new`` / ``gelu_pytorch_tanh``)."""
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    raise ValueError(f"activation {name!r} unknown; use one of {ACTIVATIONS}")


class MultiheadSelfAttention(nn.Module):
    """Self-attention with ``nn.MultiheadAttention``'s parameter names, batch-first.

    Written out (not ``nn.MultiheadAttention``) so the V-V path can reuse q/k/v, and so the
    ONNX graph is plain MatMul/Softmax.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        scale = q.shape[-1] ** -0.5
        logits = (q * scale) @ k.transpose(-2, -1)
        if mask is not None:
            logits = logits + mask
        out = logits.softmax(dim=-1) @ v  # (B, H, N, d)
        b, h, n, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * d))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self._split(x)
        return self._attend(q, k, v, mask)

    def forward_dual(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Original ``softmax(q k^T) v`` and V-V ``softmax(v v^T) v`` from one projection."""
        q, k, v = self._split(x)
        return self._attend(q, k, v, None), self._attend(v, v, v, None)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block with OpenAI CLIP's names (ln_1, attn, ln_2, mlp.c_fc/c_proj)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act: str) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = MultiheadSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, hidden)),
            ("gelu", _activation(act)),
            ("c_proj", nn.Linear(hidden, width)),
        ]))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))

    def forward_dual(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next original-path state and this block's V-V attention output."""
        ori, vv = self.attn.forward_dual(self.ln_1(x))
        x = x + ori
        return x + self.mlp(self.ln_2(x)), vv


class Transformer(nn.Module):
    """A stack of blocks under OpenAI's name ``resblocks``."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, act: str) -> None:
        super().__init__()
        self.width = width
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, act) for _ in range(layers)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, mask)
        return x


class ClipVisionTower(Backbone):
    """CLIP's image encoder with taps and the V-V dual path."""

    normalization = OPENAI_CLIP_NORM

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        scale = w**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.grid**2 + 1, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.act)
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(scale * torch.randn(w, cfg.embed_dim))
        self.input_size = (cfg.image_size, cfg.image_size)
        self.grid = (cfg.grid, cfg.grid)
        self.num_layers = cfg.layers

    def tap_dim(self, layer: int) -> int:
        return self.cfg.width

    def set_input_size(self, size: int | tuple[int, int], mode: str = "bilinear",
                       antialias: bool = False) -> None:
        """Resize the positional embedding for ``size`` once and keep it as the parameter.

        AF-CLIP and AnomalyCLIP use bilinear (518 from a 24x24 grid); open_clip uses bicubic
        with antialias. Sizes must be multiples of the patch size.
        """
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        p = self.cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"input size {(h, w)} is not a multiple of the patch size {p}")
        with torch.no_grad():
            new = resize_grid_embedding(self.positional_embedding.data, (h // p, w // p), 1,
                                        mode=mode, antialias=antialias)
        self.positional_embedding = nn.Parameter(new, requires_grad=False)
        self.input_size = (h, w)
        self.grid = (h // p, w // p)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patchify, prepend CLS, add positions, ``ln_pre``: the input of block 1."""
        self.check_input(images)
        x = self.conv1(images).flatten(2).transpose(1, 2)  # (B, N, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def forward_taps(self, images: torch.Tensor, layers: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """Residual stream (CLS + patches, before ``ln_post``) after each block in ``layers``."""
        self.check_layers(layers)
        x = self.embed(images)
        out: dict[int, torch.Tensor] = {}
        last = max(layers)
        for i, block in enumerate(self.transformer.resblocks, start=1):
            x = block(x)
            if i in layers:
                out[i] = x
            if i == last:
                break
        return out

    def forward_dual_taps(
        self, images: torch.Tensor, layers: tuple[int, ...], vv_from: int = 6
    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], torch.Tensor]:
        """Original-path taps, V-V-path taps, and the final original-path tokens.

        ``x_vv(L) = x(vv_from - 1) + sum_{l=vv_from..L} VV_l(ln_1(x_ori(l - 1)))``. For taps
        below ``vv_from`` both paths are the same tokens. The last return value is the
        original path after the last block (AnomalyCLIP's global feature is its CLS ``@ proj``
        without ``ln_post``).
        """
        self.check_layers(layers)
        if not 1 <= vv_from <= self.num_layers:
            raise ValueError(f"vv_from must be in 1..{self.num_layers}, got {vv_from}")
        x = self.embed(images)
        x_vv = x if vv_from == 1 else None
        ori, vv = {}, {}
        for i, block in enumerate(self.transformer.resblocks, start=1):
            if i >= vv_from:
                x, vv_attn = block.forward_dual(x)
                x_vv = x_vv + vv_attn
            else:
                x = block(x)
                if i == vv_from - 1:
                    x_vv = x
            if i in layers:
                ori[i] = x
                vv[i] = x_vv if i >= vv_from else x
        return ori, vv, x

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """``ln_post`` then ``@ proj``: map any tap's tokens into the joint embedding space."""
        return self.ln_post(tokens) @ self.proj

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Image embedding: ``ln_post(CLS after the last block) @ proj``."""
        x = self.transformer(self.embed(images))
        return self.project(x[:, 0])


class ClipModel(nn.Module):
    """CLIP with both towers; parameter names match the OpenAI state dict."""

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual = ClipVisionTower(cfg)
        tw = cfg.text_width
        self.token_embedding = nn.Embedding(cfg.vocab_size, tw)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(cfg.context_length, tw))
        self.transformer = Transformer(tw, cfg.text_layers, cfg.text_heads, cfg.mlp_ratio, cfg.act)
        self.ln_final = nn.LayerNorm(tw)
        self.text_projection = nn.Parameter(tw**-0.5 * torch.randn(tw, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))  # log(1 / 0.07)

    def causal_mask(self, n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask: position i attends to positions <= i."""
        return torch.full((n, n), float("-inf"), device=device, dtype=dtype).triu(1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)

    def _text_states(self, x: torch.Tensor) -> torch.Tensor:
        """``ln_final`` of the text transformer's output for embedded tokens ``x``."""
        x = x + self.positional_embedding[: x.shape[1]].to(x.dtype)
        return self.ln_final(self.transformer(x, self.causal_mask(x.shape[1], x.device, x.dtype)))

    def _encode_embedded(self, x: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        x = self._text_states(x)
        return x[torch.arange(x.shape[0], device=x.device), eot_index] @ self.text_projection

    def encode_prompt_tokens(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode ``[SOT][context][EOT]`` (padded with token 0, as ``tokenize("")`` pads) for
        a batch of generated prompts ``(P, n, text_width)``.

        Returns the EOT feature ``(P, embed_dim)`` and the output at each context position
        ``(P, n, embed_dim)``, both ``ln_final`` then ``@ text_projection`` (IIPAD's prompt
        embedding ``e`` and token embeddings ``p_1..p_T'``, Eq. 5).
        """
        p, n, width = context.shape
        if width != self.cfg.text_width or n + 2 > self.cfg.context_length:
            raise ValueError(f"prompts {tuple(context.shape)} do not fit the text encoder "
                             f"(width {self.cfg.text_width}, at most {self.cfg.context_length - 2} tokens)")
        ends = self.token_embedding.weight.new_tensor([49406, 49407]).long()
        sot, eot = self.token_embedding(ends).to(context.dtype)
        pad = self.token_embedding.weight[0].to(context.dtype)
        x = torch.cat([sot.expand(p, 1, -1), context, eot.expand(p, 1, -1),
                       pad.expand(p, self.cfg.context_length - n - 2, -1)], dim=1)
        states = self._text_states(x) @ self.text_projection
        return states[:, n + 1], states[:, 1:n + 1]

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text embedding at the EOT token (the largest id, 49407 in OpenAI's vocabulary)."""
        return self._encode_embedded(self.token_embedding(tokens), tokens.argmax(dim=-1))

    def encode_text_with_context(self, tokens: torch.Tensor, context: torch.Tensor,
                                 position: str = "before_sot") -> torch.Tensor:
        """Encode prompts with learnable context vectors spliced into the token embeddings.

        Args:
            tokens: ``(P, context_length)`` tokenized prompts (e.g. "with defect.").
            context: ``(n_ctx, text_width)`` shared by all prompts, or ``(P, n_ctx, width)``.
            position: ``before_sot`` -- [ctx][SOT][words][EOT] as AF-CLIP does;
                ``after_sot`` -- [SOT][ctx][words][EOT] as AnomalyCLIP does.

        The sequence is truncated back to ``context_length`` and read at the shifted EOT.
        """
        if position not in ("before_sot", "after_sot"):
            raise ValueError(f"position must be before_sot or after_sot, got {position!r}")
        p = tokens.shape[0]
        ctx = context.expand(p, -1, -1) if context.ndim == 2 else context
        if ctx.shape[0] != p or ctx.shape[-1] != self.cfg.text_width:
            raise ValueError(f"context {tuple(context.shape)} does not fit {p} prompts of "
                             f"width {self.cfg.text_width}")
        n_ctx = ctx.shape[1]
        eot = tokens.argmax(dim=-1) + n_ctx
        if int(eot.max()) >= self.cfg.context_length:
            raise ValueError(f"prompt plus {n_ctx} context vectors exceeds "
                             f"{self.cfg.context_length} tokens; shorten the prompt")
        emb = self.token_embedding(tokens)
        if position == "before_sot":
            x = torch.cat([ctx.to(emb.dtype), emb], dim=1)
        else:
            x = torch.cat([emb[:, :1], ctx.to(emb.dtype), emb[:, 1:]], dim=1)
        return self._encode_embedded(x[:, : self.cfg.context_length], eot)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image and text embeddings (OpenAI's ``CLIP.forward`` minus the logits)."""
        return self.encode_image(images), self.encode_text(tokens)
