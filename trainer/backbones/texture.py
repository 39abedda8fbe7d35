"""``texture``: a weight-free filter-bank backbone, so the product runs with no downloads.

An image pyramid (gray, then 2x average pooling per level) is filtered at every level with
the same fixed Gaussian-derivative bank (sigma 1 px: smoothing, d/dx, d/dy, d2/dx2,
d2/dxdy, d2/dy2) plus a 3x3 Laplacian. Per patch cell the backbone reports local
statistics: the log RMS of each derivative response, the mean intensity and the log
standard deviation of intensity.
Level ``k`` is tap ``k`` (tap 1 = finest), and every level is pooled onto the same patch
grid, so the tokens line up across taps just as a ViT's do. The CLS token is the mean of
the patch tokens: the image's global texture statistics.

Everything is conv / pad / pool / log, so it exports to ONNX with any opset >= 11.

Feed it images cropped or padded to ``input_size``, not resampled: a resize by a
non-integer factor (250 -> 256) blurs pixel-scale detail by an amount that varies across
the image, which drowns the speckle defects of the textile set
(tests/trainer/test_texture.py measures both ways on the real textile images).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from edge_inspect.trainer.backbones.base import Backbone, Normalization

# Inputs are scaled to [0, 1]: mean 0, std 1 on x / 255.
UNIT_NORM = Normalization(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
_EPS = 1e-6


def gaussian_derivative_bank(sigma: float = 1.0) -> torch.Tensor:
    """``(7, 1, k, k)`` kernels: G, Gx, Gy, Gxx, Gxy, Gyy, L with ``k = 2 * ceil(3 sigma) + 1``.

    G..Gyy are Gaussian derivatives at ``sigma``; L is the 3x3 discrete Laplacian (centred),
    which keeps the pixel-scale detail that sigma-1 smoothing removes (speckle defects of a
    few pixels live there). The smoothing kernel sums to 1; every other kernel has zero
    mean, so flat regions give zero response.
    """
    r = math.ceil(3 * sigma)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    g1 = -t / sigma**2 * g
    g2 = (t**2 / sigma**4 - 1 / sigma**2) * g
    g2 = g2 - g2.mean()
    outer = torch.outer
    kernels = [outer(g, g), outer(g, g1), outer(g1, g), outer(g, g2), outer(g1, g1), outer(g2, g)]
    laplacian = torch.zeros(2 * r + 1, 2 * r + 1, dtype=torch.float64)
    laplacian[r - 1:r + 2, r - 1:r + 2] = torch.tensor([[0, 1, 0], [1, -4, 1], [0, 1, 0]])
    kernels.append(laplacian)
    return torch.stack(kernels).unsqueeze(1).float()


class TextureBackbone(Backbone):
    """Fixed filter bank on an image pyramid; tokens ``(B, 1 + rows*cols, 8)`` per tap."""

    normalization = UNIT_NORM
    FEATURES = ("log_rms_dx", "log_rms_dy", "log_rms_dxx", "log_rms_dxy", "log_rms_dyy",
                "log_rms_laplacian", "mean", "log_std")

    def __init__(self, input_size: int | tuple[int, int] = 256, patch_size: int = 8,
                 levels: int = 3, sigma: float = 1.0) -> None:
        super().__init__()
        h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if patch_size % (2 ** (levels - 1)):
            raise ValueError(f"patch_size {patch_size} must be divisible by 2^(levels-1) = "
                             f"{2 ** (levels - 1)} so every level pools onto the same grid")
        if h % patch_size or w % patch_size:
            raise ValueError(f"input size {(h, w)} is not a multiple of patch_size {patch_size}")
        self.input_size = (h, w)
        self.patch_size = patch_size
        self.grid = (h // patch_size, w // patch_size)
        self.num_layers = levels
        self.register_buffer("bank", gaussian_derivative_bank(sigma), persistent=False)
        self.register_buffer("to_gray", torch.full((1, 3, 1, 1), 1.0 / 3.0), persistent=False)

    def tap_dim(self, layer: int) -> int:
        return len(self.FEATURES)

    def feature_names(self, layer: int) -> tuple[str, ...]:
        return self.FEATURES

    def _level_tokens(self, gray: torch.Tensor, cell: int) -> torch.Tensor:
        pad = self.bank.shape[-1] // 2
        resp = F.conv2d(F.pad(gray, (pad, pad, pad, pad), mode="reflect"), self.bank)
        smooth, deriv = resp[:, :1], resp[:, 1:]
        energy = F.avg_pool2d(deriv * deriv, cell)
        mean = F.avg_pool2d(smooth, cell)
        # Two-pass variance per cell: E[x^2] - E[x]^2 cancels badly in fp32.
        cell_mean = F.avg_pool2d(gray, cell)
        centred = gray - F.interpolate(cell_mean, scale_factor=cell, mode="nearest")
        var = F.avg_pool2d(centred * centred, cell)
        feats = torch.cat([0.5 * torch.log(energy + _EPS), mean,
                           0.5 * torch.log(var + _EPS)], dim=1)  # (B, 8, rows, cols)
        patches = feats.flatten(2).transpose(1, 2)
        return torch.cat([patches.mean(dim=1, keepdim=True), patches], dim=1)

    def forward_taps(self, images: torch.Tensor, layers: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """Tokens per pyramid level in ``layers`` (1 = full resolution)."""
        self.check_layers(layers)
        self.check_input(images)
        gray = F.conv2d(images, self.to_gray)
        out = {}
        for level in range(1, max(layers) + 1):
            if level > 1:
                gray = F.avg_pool2d(gray, 2)
            if level in layers:
                out[level] = self._level_tokens(gray, self.patch_size // 2 ** (level - 1))
        return out
