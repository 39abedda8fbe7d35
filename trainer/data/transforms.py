"""Images (uint8 RGB arrays) -> normalized model input, the same way in training and export.

Fitting to the input size is :func:`runtime.preprocess.fit_image`, shared with the runtime.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from edge_inspect.runtime.preprocess import FIT_MODES, fit_image
from edge_inspect.trainer.backbones.base import Normalization

__all__ = ["FIT_MODES", "fit_image", "fit_mask", "to_batch"]


def to_batch(images: list[np.ndarray], size: tuple[int, int], normalization: Normalization,
             mode: str = "resize", interpolation: str = "bicubic") -> torch.Tensor:
    """Stack uint8 RGB images into a normalized float ``(B, 3, H, W)`` tensor."""
    fitted = np.stack([fit_image(im, size, mode, interpolation) for im in images])
    x = torch.from_numpy(fitted).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(normalization.mean).view(1, 3, 1, 1)
    std = torch.tensor(normalization.std).view(1, 3, 1, 1)
    return (x - mean) / std


def fit_mask(mask: np.ndarray, size: tuple[int, int], mode: str = "resize") -> np.ndarray:
    """Bring a {0, 1} mask to ``size`` like its image: bilinear resize then > 0.5, or crop
    (``short_side_crop``: the same geometry as the image, so the mask stays aligned)."""
    if mode == "center_crop":
        return fit_image(mask[..., None], size, mode)[..., 0]
    if mode == "short_side_crop":
        soft = fit_image(mask.astype(np.float32)[..., None], size, mode, "bilinear")[..., 0]
        return (soft > 0.5).astype(np.uint8)
    if mask.shape[:2] == tuple(size):
        return mask
    resized = cv2.resize(mask.astype(np.float32), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return (resized > 0.5).astype(np.uint8)
