"""DINOv2 ViT (B/14, with and without registers) with taps and a baked positional embedding.

Parameter names follow the official checkpoints (``dinov2_vitb14_pretrain.pth``,
``dinov2_vitb14_reg4_pretrain.pth``): ``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``register_tokens``, ``blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,
ls2.gamma}``, ``norm``. Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` folders
are converted on load.

Token order inside the model is [CLS, registers, patches]; taps return [CLS, patches]
(registers dropped, as INP-Former does) so every backbone offers the same token layout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edge_inspect.trainer.backbones.base import IMAGENET_NORM, Backbone
from edge_inspect.trainer.backbones.checkpoint_io import WeightsFileError, check_keys, read_weights
from edge_inspect.trainer.backbones.pos_embed import resize_grid_embedding

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dinov2Config:
    """Architecture; ``image_size`` is the size of the stored positional table (518)."""

    name: str
    image_size: int = 518
    patch_size: int = 14
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    num_registers: int = 0
    layer_norm_eps: float = 1e-6

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def describe(self) -> str:
        return (f"{self.name}: width {self.width}, {self.layers} blocks, patch {self.patch_size}, "
                f"{self.num_registers} registers, position table for {self.image_size}")


DINOV2_CONFIGS: dict[str, Dinov2Config] = {
    c.name: c
    for c in (
        Dinov2Config("dinov2_vitb14"),
        Dinov2Config("dinov2_vitb14_reg4", num_registers=4),
        Dinov2Config("tiny-dinov2", image_size=56, patch_size=14, width=64, layers=3, heads=4),
        Dinov2Config("tiny-dinov2-reg", image_size=56, patch_size=14, width=64, layers=3, heads=4,
                     num_registers=4),
    )
}


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: Dinov2Config) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.width, cfg.heads)
        self.ls1 = LayerScale(cfg.width)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg.width, int(cfg.width * cfg.mlp_ratio))
        self.ls2 = LayerScale(cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Dinov2Backbone(Backbone):
    """DINOv2 ViT; ``forward_taps`` gives block outputs before the final ``norm``."""

    normalization = IMAGENET_NORM

    def __init__(self, cfg: Dinov2Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.width)
        self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.width) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.grid**2 + 1, cfg.width) * 0.02)
        if cfg.num_registers:
            self.register_tokens = nn.Parameter(torch.randn(1, cfg.num_registers, cfg.width) * 0.02)
        else:
            self.register_tokens = None
        self.mask_token = nn.Parameter(torch.zeros(1, cfg.width))  # unused; kept for loading
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.input_size = (cfg.image_size, cfg.image_size)
        self.grid = (cfg.grid, cfg.grid)
        self.num_layers = cfg.layers

    def tap_dim(self, layer: int) -> int:
        return self.cfg.width

    def set_input_size(self, size: int | tuple[int, int], mode: str = "bicubic",
                       scale_offset: float = 0.0, antialias: bool = False) -> None:
        """Resize the positional table for ``size`` once (bicubic, as DINOv2 does).

        ``scale_offset=0`` matches Hugging Face (interpolate to the size); the official
        repository interpolates by scale factor with ``interpolate_offset=0.1`` and no
        antialias; Hugging Face's with-registers model uses ``antialias=True`` (torch then
        uses a different cubic kernel, so the choice changes the numbers).
        """
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        p = self.cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"input size {(h, w)} is not a multiple of the patch size {p}")
        with torch.no_grad():
            new = resize_grid_embedding(self.pos_embed.data[0], (h // p, w // p), 1, mode=mode,
                                        antialias=antialias, scale_offset=scale_offset)
        self.pos_embed = nn.Parameter(new[None], requires_grad=False)
        self.input_size = (h, w)
        self.grid = (h // p, w // p)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[CLS, registers, patches] with positions added (registers get none)."""
        self.check_input(images)
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        if self.register_tokens is not None:
            regs = self.register_tokens.expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], regs, x[:, 1:]], dim=1)
        return x

    def _drop_registers(self, x: torch.Tensor) -> torch.Tensor:
        r = self.cfg.num_registers
        return torch.cat([x[:, :1], x[:, 1 + r:]], dim=1) if r else x

    def forward_all(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Embedding output then every block's output, registers included (for parity tests)."""
        x = self.embed(images)
        states = [x]
        for block in self.blocks:
            x = block(x)
            states.append(x)
        return states

    def forward_taps(self, images: torch.Tensor, layers: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """[CLS, patches] after each block in ``layers`` (1-indexed), before ``norm``."""
        self.check_layers(layers)
        x = self.embed(images)
        out = {}
        for i, block in enumerate(self.blocks[: max(layers)], start=1):
            x = block(x)
            if i in layers:
                out[i] = self._drop_registers(x)
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized CLS token of the last block (DINOv2's image embedding)."""
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


def _first(sd: dict[str, torch.Tensor], *names: str) -> torch.Tensor:
    """The tensor under the first of ``names`` present (HF renamed keys in transformers 5)."""
    for name in names:
        if name in sd:
            return sd[name]
    raise KeyError(names[0])


def hf_dinov2_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` state dict.

    Accepts both the hub files' names (``attention.attention.query``) and the names
    transformers >= 5 uses (``attention.q_proj``).
    """
    sd = {k.removeprefix("dinov2."): v for k, v in sd.items()}
    e = "embeddings."
    out = {
        "cls_token": sd[e + "cls_token"],
        "mask_token": sd[e + "mask_token"].reshape(1, -1),
        "pos_embed": sd[e + "position_embeddings"],
        "patch_embed.proj.weight": sd[e + "patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd[e + "patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    if e + "register_tokens" in sd:
        out["register_tokens"] = sd[e + "register_tokens"]
    layers = {int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer.")}
    for i in sorted(layers):
        s, d = f"encoder.layer.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            out[d + f"attn.qkv.{part}"] = torch.cat([
                _first(sd, s + f"attention.attention.{old}.{part}", s + f"attention.{new}.{part}")
                for old, new in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"))])
            out[d + f"attn.proj.{part}"] = _first(
                sd, s + f"attention.output.dense.{part}", s + f"attention.o_proj.{part}")
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[d + f"{n}.{part}"] = sd[s + f"{n}.{part}"]
        out[d + "ls1.gamma"] = sd[s + "layer_scale1.lambda1"]
        out[d + "ls2.gamma"] = sd[s + "layer_scale2.lambda1"]
    return out


def infer_dinov2_config(sd: dict[str, torch.Tensor]) -> Dinov2Config:
    """Architecture from the shapes of an official-layout state dict (heads = width / 64)."""
    w = sd["patch_embed.proj.weight"]
    width, patch = w.shape[0], w.shape[-1]
    grid = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
    layers = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    regs = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    cfg = Dinov2Config("inferred", grid * patch, patch, width, layers, max(1, width // 64),
                       sd["blocks.0.mlp.fc1.weight"].shape[0] / width, regs)
    for known in DINOV2_CONFIGS.values():
        if Dinov2Config("inferred", known.image_size, known.patch_size, known.width, known.layers,
                        cfg.heads, known.mlp_ratio, known.num_registers) == cfg:
            return known
    return cfg


def load_dinov2(path: str | Path, arch: str | None = None,
                input_size: int | tuple[int, int] | None = None,
                scale_offset: float = 0.0, antialias: bool = False) -> Dinov2Backbone:
    """Build a frozen fp32 :class:`Dinov2Backbone` from an official checkpoint or HF folder.

    Args:
        path: ``dinov2_vitb14[_reg4]_pretrain.pth`` / .safetensors or a Hugging Face folder.
        arch: expected architecture name; inferred from the file when None.
        input_size: bake the positional table for this size (e.g. 392 for INP-Former, 224 for PIRN).
        scale_offset: 0.1 reproduces the official repository's interpolation.
        antialias: torch's antialias flag for the bicubic resize (see ``set_input_size``).
    """
    path = Path(path)
    sd, hf_config = read_weights(path)
    if "embeddings.patch_embeddings.projection.weight" in sd or \
            "dinov2.embeddings.patch_embeddings.projection.weight" in sd:
        try:
            sd = hf_dinov2_to_official(sd)
        except KeyError as exc:
            raise WeightsFileError(f"{path}: Hugging Face DINOv2 layout without key {exc}") from exc
    if "patch_embed.proj.weight" not in sd:
        raise WeightsFileError(f"{path}: not a DINOv2 checkpoint (no patch_embed.proj.weight); "
                               "CLIP files load with trainer.backbones.clip_weights.load_clip")
    sd = {k: v.float() for k, v in sd.items()}
    inferred = infer_dinov2_config(sd)
    if hf_config and "num_attention_heads" in hf_config:
        heads = hf_config["num_attention_heads"]
        if inferred.name == "inferred" or inferred.heads != heads:
            inferred = Dinov2Config(inferred.name, inferred.image_size, inferred.patch_size,
                                    inferred.width, inferred.layers, heads, inferred.mlp_ratio,
                                    inferred.num_registers, hf_config.get("layer_norm_eps", 1e-6))
    if arch is not None and arch not in DINOV2_CONFIGS:
        raise KeyError(f"unknown DINOv2 architecture {arch!r}; known: {', '.join(DINOV2_CONFIGS)}")
    cfg = DINOV2_CONFIGS[arch] if arch else inferred
    model = Dinov2Backbone(cfg)
    check_keys(model.state_dict(), sd, path, cfg.name, inferred.describe())
    model.load_state_dict(sd)
    log.info("loaded DINOv2 %s from %s", cfg.name, path)
    if input_size is not None:
        model.set_input_size(input_size, scale_offset=scale_offset, antialias=antialias)
    return model.eval().requires_grad_(False)
