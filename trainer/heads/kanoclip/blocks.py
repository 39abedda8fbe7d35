"""KAnoCLIP's learned blocks (section 2.4): Bi-CMCI's parts and the Conv-Adapter.

Written out with plain MatMul / Softmax / GridSample so the exported graph is what runs
here. Each block is tested against a direct, formula-level computation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _split(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, N, C)`` -> ``(B, heads, N, C / heads)``."""
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """``(B, heads, N, d)`` -> ``(B, N, heads * d)``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _check_heads(dim: int, heads: int) -> None:
    if heads < 1 or dim % heads:
        raise ValueError(f"Bi-CMCI width {dim} is not divisible by {heads} heads; set "
                         "head.bicmci_heads to a divisor of the CLIP embedding width")


class BiCrossAttention(nn.Module):
    """Bi-directional cross-attention (BiXT, the paper's [11]) between patches and text tokens.

    One similarity matrix ``A = R_v R_t^T / sqrt(d)`` from shared reference projections of
    both sides serves both directions: softmax over the text tokens refines each patch with
    the text (text-to-visual), softmax over the patches refines each text token with the
    image (visual-to-text). Pre-LayerNorm, residual outputs.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        _check_heads(dim, heads)
        self.heads = heads
        self.norm_visual, self.norm_text = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ref_visual, self.ref_text = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.value_visual, self.value_text = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out_visual, self.out_text = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, visual: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``visual (B, N, C)``, ``text (B, T, C)`` -> both refined, same shapes."""
        v, t = self.norm_visual(visual), self.norm_text(text)
        rv, rt = _split(self.ref_visual(v), self.heads), _split(self.ref_text(t), self.heads)
        sim = (rv * rv.shape[-1] ** -0.5) @ rt.transpose(-2, -1)  # (B, H, N, T)
        to_visual = sim.softmax(dim=-1) @ _split(self.value_text(t), self.heads)  # (B, H, N, d)
        to_text = sim.softmax(dim=-2).transpose(-2, -1) @ _split(self.value_visual(v), self.heads)
        return (visual + self.out_visual(_merge(to_visual)),
                text + self.out_text(_merge(to_text)))


class SelfAttention(nn.Module):
    """Pre-LayerNorm multi-head self-attention with a residual (Bi-CMCI's text side)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        _check_heads(dim, heads)
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_split(t, self.heads) for t in self.qkv(self.norm(x)).chunk(3, dim=-1))
        attn = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        return x + self.out(_merge(attn @ v))


class DeformableSelfAttention(nn.Module):
    """Single-scale deformable self-attention (Deformable DETR, the paper's [12]) on patches.

    Each patch (a query at its grid position) predicts, per head, ``points`` sampling
    offsets (in patches) and their softmax weights; values are read there by bilinear
    sampling with zeros outside the grid (``grid_sample``, ``align_corners=False``, as
    Deformable DETR). Offsets start as Deformable DETR's: zero weights, a bias that points
    head ``h`` along direction ``2 pi h / heads`` at distances 1..points; attention weights
    start uniform. Pre-LayerNorm, residual output.
    """

    def __init__(self, dim: int, heads: int, points: int) -> None:
        super().__init__()
        _check_heads(dim, heads)
        if points < 1:
            raise ValueError(f"deformable attention needs >= 1 sampling point, got {points}")
        self.heads, self.points = heads, points
        self.norm = nn.LayerNorm(dim)
        self.offsets = nn.Linear(dim, heads * points * 2)
        self.weights = nn.Linear(dim, heads * points)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.zeros_(self.offsets.weight)
        theta = torch.arange(self.heads, dtype=torch.float64) * (2 * math.pi / self.heads)
        direction = torch.stack([theta.cos(), theta.sin()], dim=-1)
        direction = direction / direction.abs().max(dim=-1, keepdim=True).values
        steps = torch.arange(1, self.points + 1, dtype=torch.float64).view(1, -1, 1)
        with torch.no_grad():
            self.offsets.bias.copy_((direction[:, None, :] * steps).flatten().float())
        nn.init.zeros_(self.weights.weight)
        nn.init.zeros_(self.weights.bias)
        for layer in (self.value, self.out):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def sampling(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized sampling locations ``(B, N, H, P, 2)`` in [0, 1] (x, y) and weights
        ``(B, N, H, P)`` of the LayerNormed queries ``x``."""
        b, n, _ = x.shape
        rows, cols = grid
        ys = (torch.arange(rows, device=x.device, dtype=x.dtype) + 0.5) / rows
        xs = (torch.arange(cols, device=x.device, dtype=x.dtype) + 0.5) / cols
        ref = torch.stack([xs.repeat(rows), ys.repeat_interleave(cols)], dim=-1)  # (N, 2)
        scale = torch.tensor([cols, rows], device=x.device, dtype=x.dtype)
        offsets = self.offsets(x).view(b, n, self.heads, self.points, 2)
        loc = ref.view(1, n, 1, 1, 2) + offsets / scale
        weights = self.weights(x).view(b, n, self.heads, self.points).softmax(dim=-1)
        return loc, weights

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``(B, rows * cols, C)`` patch tokens -> refined, same shape."""
        b, n, c = x.shape
        rows, cols = grid
        q = self.norm(x)
        loc, weights = self.sampling(q, grid)
        d = c // self.heads
        value = self.value(q).view(b, rows, cols, self.heads, d).permute(0, 3, 4, 1, 2)
        value = value.reshape(b * self.heads, d, rows, cols)
        where = (2 * loc - 1).permute(0, 2, 1, 3, 4).reshape(b * self.heads, n, self.points, 2)
        sampled = F.grid_sample(value, where, mode="bilinear", padding_mode="zeros",
                                align_corners=False)  # (B * H, d, N, P)
        w = weights.permute(0, 2, 1, 3).reshape(b * self.heads, 1, n, self.points)
        out = (sampled * w).sum(dim=-1).view(b, self.heads, d, n).permute(0, 3, 1, 2)
        return x + self.out(out.reshape(b, n, c))


VISUAL_SA = ("deformable", "standard", "none")


class BiCmciStage(nn.Module):
    """Bi-CMCI at one tap: BiCA, then self-attention on the text tokens and (deformable)
    self-attention on the patches. ``visual_sa``: ``deformable`` (the paper), ``standard``
    (plain self-attention over all patches) or ``none``."""

    def __init__(self, dim: int, heads: int, points: int, visual_sa: str = "deformable") -> None:
        super().__init__()
        if visual_sa not in VISUAL_SA:
            raise ValueError(f"head.visual_sa {visual_sa!r} unknown; choose one of {VISUAL_SA}")
        self.visual_sa = visual_sa
        self.cross = BiCrossAttention(dim, heads)
        self.text_sa = SelfAttention(dim, heads)
        if visual_sa == "deformable":
            self.visual_attn = DeformableSelfAttention(dim, heads, points)
        elif visual_sa == "standard":
            self.visual_attn = SelfAttention(dim, heads)

    def forward(self, visual: torch.Tensor, text: torch.Tensor,
                grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        visual, text = self.cross(visual, text)
        text = self.text_sa(text)
        if self.visual_sa == "deformable":
            visual = self.visual_attn(visual, grid)
        elif self.visual_sa == "standard":
            visual = self.visual_attn(visual)
        return visual, text


class ConvAdapter(nn.Module):
    """Eq. 11: ``I_c = ReLU(LN(I) W_down) W_up`` on the global feature.

    The paper calls it a depthwise separable convolution bottleneck; on one global vector
    the pointwise convolutions are these two matrices (no biases, as printed) and a depthwise
    convolution is a per-channel scale, which the LayerNorm's affine already is.
    """

    def __init__(self, dim: int, latent: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, latent, bias=False)
        self.up = nn.Linear(latent, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.down(self.norm(x))))
