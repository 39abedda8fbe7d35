"""Frames -> the bundle's input plane, with OpenCV and numpy (no torch).

The trainer fits images with these same functions, so training, export parity and the
runtime see identical pixels: ``resize`` is a bicubic resize (CLIP-style models),
``center_crop`` crops without resampling (the texture backbone: resampling blurs
pixel-scale defects).
"""

from __future__ import annotations

import cv2
import numpy as np

FIT_MODES = ("resize", "center_crop")
# A plane's manifest ``interpolation`` -> OpenCV flag ("none": the plane is never resampled).
INTERPOLATIONS = {"bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA,
                  "nearest": cv2.INTER_NEAREST}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def fit_image(image: np.ndarray, size: tuple[int, int], mode: str = "resize",
              interpolation: str = "bicubic") -> np.ndarray:
    """Bring ``(H, W, C)`` to ``size`` (H, W); an image smaller than a crop is an error.

    ``interpolation`` is the plane's (bicubic for RGB by default; geometry planes name
    ``nearest`` or ``bilinear``, never bicubic); ``none`` refuses to resample.
    """
    h, w = size
    if mode == "resize":
        if image.shape[:2] == (h, w):
            return image
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"cannot resize a plane with interpolation {interpolation!r}; "
                             f"choose one of {list(INTERPOLATIONS)}")
        out = cv2.resize(image, (w, h), interpolation=INTERPOLATIONS[interpolation])
        return out if out.ndim == image.ndim else out[..., None]
    if mode == "center_crop":
        ih, iw = image.shape[:2]
        if ih < h or iw < w:
            raise ValueError(f"image {iw}x{ih} is smaller than the {w}x{h} crop; use "
                             "fit: resize or a smaller input_size")
        top, left = (ih - h) // 2, (iw - w) // 2
        return image[top:top + h, left:left + w]
    raise ValueError(f"fit mode {mode!r} unknown; choose one of {FIT_MODES}")


def read_rgb(path) -> np.ndarray:
    """An image file as ``(H, W, 3)`` uint8 RGB (gray expanded), or a clear error."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cannot read image {path}: missing, unreadable or corrupt")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
