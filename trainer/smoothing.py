"""Gaussian smoothing of anomaly maps with scipy's border rule, in plain torch ops.

AF-CLIP, AnomalyCLIP and IIPAD smooth the full-resolution map with
``scipy.ndimage.gaussian_filter(sigma=4)`` (truncate 4, so 33 taps; mode ``reflect``,
which repeats the edge sample: ``d c b a | a b c d``). ``torch``/ONNX ``reflect`` padding
does not repeat it, so the border would differ. This module pads by concatenating flipped
slices (ONNX Slice + Concat) and runs two 1-D convolutions, so the torch evaluation, the
exported graph and scipy agree to float precision everywhere, borders included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gaussian_kernel_1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy's kernel: radius ``int(truncate * sigma + 0.5)``, normalized to sum 1."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


def symmetric_pad(x: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    """Pad ``dim`` by ``pad`` samples on each side, mirroring with the edge repeated.

    Longer pads than the axis (tiny maps) repeat the mirroring, as scipy does.
    """
    while pad > 0:
        step = min(pad, x.shape[dim])
        head = x.narrow(dim, 0, step).flip(dim)
        tail = x.narrow(dim, x.shape[dim] - step, step).flip(dim)
        x = torch.cat([head, x, tail], dim=dim)
        pad -= step
    return x


class GaussianSmoothing(nn.Module):
    """Separable Gaussian blur of ``(B, H, W)`` maps matching ``scipy.ndimage.gaussian_filter``.

    ``sigma <= 0`` is the identity (methods without smoothing).
    """

    def __init__(self, sigma: float = 4.0, truncate: float = 4.0) -> None:
        super().__init__()
        self.sigma = float(sigma)
        kernel = gaussian_kernel_1d(sigma, truncate) if sigma > 0 else torch.ones(1)
        self.radius = kernel.numel() // 2
        self.register_buffer("kernel", kernel, persistent=False)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        if self.sigma <= 0:
            return maps
        x = maps.unsqueeze(1)
        k = self.kernel.to(x.dtype)
        x = F.conv2d(symmetric_pad(x, self.radius, 3), k.view(1, 1, 1, -1))
        x = F.conv2d(symmetric_pad(x, self.radius, 2), k.view(1, 1, -1, 1))
        return x.squeeze(1)
