"""Frames -> the bundle's input plane, with OpenCV and numpy (no torch).

The trainer fits images with these same functions, so training, export parity and the
runtime see identical pixels: ``resize`` is a bicubic resize (CLIP-style models; OpenCV's
or, with ``bicubic_antialias``, PIL's), ``short_side_crop`` resizes the short side and
crops the centre, ``center_crop`` crops without resampling (the texture backbone:
resampling blurs pixel-scale defects).
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

FIT_MODES = ("resize", "center_crop", "short_side_crop")
# A plane's manifest ``interpolation`` -> OpenCV flag ("none": the plane is never resampled).
INTERPOLATIONS = {"bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA,
                  "nearest": cv2.INTER_NEAREST}
# Resampling that OpenCV does not offer, done here in numpy.
ANTIALIAS = "bicubic_antialias"
RESAMPLERS = (*INTERPOLATIONS, ANTIALIAS)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def resize(image: np.ndarray, size: tuple[int, int], interpolation: str = "bicubic") -> np.ndarray:
    """``(H, W[, C])`` to ``size`` (H, W) with a named interpolation, channels kept."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    if interpolation == ANTIALIAS:
        return resize_bicubic_antialias(image, size)
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"cannot resize a plane with interpolation {interpolation!r}; "
                         f"choose one of {list(RESAMPLERS)}")
    out = cv2.resize(image, (w, h), interpolation=INTERPOLATIONS[interpolation])
    return out if out.ndim == image.ndim else out[..., None]


def fit_image(image: np.ndarray, size: tuple[int, int], mode: str = "resize",
              interpolation: str = "bicubic") -> np.ndarray:
    """Bring ``(H, W, C)`` to ``size`` (H, W); an image smaller than a crop is an error.

    ``resize`` squashes to the size; ``center_crop`` crops without resampling;
    ``short_side_crop`` scales the short side to the size then crops the centre
    (torchvision's ``Resize(s)`` + ``CenterCrop(s)``, CMAD's preprocessing).
    ``interpolation`` is the plane's (bicubic for RGB by default; ``bicubic_antialias``
    is PIL's bicubic, which the AF-CLIP and CMAD code use; geometry planes name
    ``nearest`` or ``bilinear``, never bicubic); ``none`` refuses to resample.
    """
    h, w = size
    if mode == "resize":
        return resize(image, size, interpolation)
    if mode == "short_side_crop":
        ih, iw = image.shape[:2]
        if h != w:
            raise ValueError(f"short_side_crop needs a square size, got {w}x{h}")
        # torchvision's Resize(s): the short side becomes s, the long int(s * long / short)
        if ih <= iw:
            new = (h, int(h * iw / ih))
        else:
            new = (int(h * ih / iw), h)
        image = resize(image, new, interpolation)
        top, left = int(round((new[0] - h) / 2.0)), int(round((new[1] - w) / 2.0))  # torchvision's
        return image[top:top + h, left:left + w]
    if mode == "center_crop":
        ih, iw = image.shape[:2]
        if ih < h or iw < w:
            raise ValueError(f"image {iw}x{ih} is smaller than the {w}x{h} crop; use "
                             "fit: resize or a smaller input_size")
        top, left = (ih - h) // 2, (iw - w) // 2
        return image[top:top + h, left:left + w]
    raise ValueError(f"fit mode {mode!r} unknown; choose one of {FIT_MODES}")


def _bicubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """PIL's bicubic kernel (a = -0.5; OpenCV's INTER_CUBIC uses -0.75)."""
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


_PRECISION_BITS = 32 - 8 - 2  # PIL's fixed-point coefficients for 8-bit images


@lru_cache(maxsize=32)
def _resample_table(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices ``(n_out, k)``, float weights and PIL's fixed-point weights.

    PIL's ``precompute_coeffs``: the kernel is stretched by the downscale factor (that is
    the antialiasing), each output pixel's weights are normalized to sum 1.
    """
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    k = int(np.ceil(support)) * 2 + 1
    centre = (np.arange(n_out) + 0.5) * scale
    first = np.clip((centre - support + 0.5).astype(np.int64), 0, None)
    last = np.minimum((centre + support + 0.5).astype(np.int64), n_in)
    idx = first[:, None] + np.arange(k)[None, :]
    weights = _bicubic((idx - centre[:, None] + 0.5) / filterscale)
    weights = np.where(idx < last[:, None], weights, 0.0)
    total = weights.sum(1, keepdims=True)
    weights = weights / np.where(total == 0, 1.0, total)
    one = float(1 << _PRECISION_BITS)
    fixed = np.where(weights < 0, np.trunc(-0.5 + weights * one), np.trunc(0.5 + weights * one))
    return np.minimum(idx, n_in - 1), weights, fixed.astype(np.int64)


def _resample_axis(image: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    idx, weights, fixed = _resample_table(image.shape[axis], n_out)
    exact = image.dtype == np.uint8
    acc = np.zeros(image.shape[:axis] + (n_out,) + image.shape[axis + 1:],
                   np.int64 if exact else np.float64)
    shape = [1] * image.ndim
    shape[axis] = n_out
    for j in range(idx.shape[1]):
        w = (fixed if exact else weights)[:, j].reshape(shape)
        acc += w * np.take(image, idx[:, j], axis=axis)
    if exact:  # PIL: round half up in fixed point, clip to 8 bits after each pass
        return np.clip((acc + (1 << (_PRECISION_BITS - 1))) >> _PRECISION_BITS, 0, 255).astype(np.uint8)
    return acc.astype(image.dtype)


def resize_bicubic_antialias(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """PIL's ``Image.resize(BICUBIC)``: bicubic (a = -0.5) with the kernel widened when
    downscaling, so it antialiases; horizontal pass first, each rounded to 8 bits.

    This is what torchvision's ``Resize`` does to PIL images in the AF-CLIP and CMAD code
    (OpenCV's INTER_CUBIC neither antialiases nor uses the same kernel: 5.6/255 apart on
    a textured 1024 px image). uint8 results equal Pillow's; float planes use the same
    weights without rounding.
    """
    h, w = size
    pillow_fits = image.ndim == 2 or image.shape[2] in (1, 3)
    if image.dtype == np.uint8 and pillow_fits and _pillow() is not None:
        Image = _pillow()  # the same numbers, ~6x faster; Pillow is optional on the runtime
        plane = image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
        out = np.asarray(Image.fromarray(np.ascontiguousarray(plane)).resize((w, h), Image.BICUBIC))
        return out[..., None] if plane is not image else out
    return resize_bicubic_antialias_numpy(image, size)


def resize_bicubic_antialias_numpy(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """:func:`resize_bicubic_antialias` in numpy alone (also for float planes)."""
    h, w = size
    out = image
    if out.shape[1] != w:
        out = _resample_axis(out, w, 1)
    if out.shape[0] != h:
        out = _resample_axis(out, h, 0)
    return out


@lru_cache(maxsize=1)
def _pillow():
    try:
        from PIL import Image
    except ImportError:
        return None
    return Image


def read_xyz(path) -> np.ndarray:
    """Read an organized point map (an ``H x W x 3`` float TIFF, MVTec 3D-AD's ``xyz``) as
    float32 ``(H, W, 3)`` in the file's x, y, z order, interleaved or planar (tifffile:
    OpenCV reads a planar float TIFF without error but with its samples scrambled)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            xyz = tif.asarray()  # the whole series: a grey TIFF may hold one row per page
            if tif.pages[0].planarconfig == tifffile.PLANARCONFIG.SEPARATE and xyz.ndim == 3:
                xyz = xyz.transpose(1, 2, 0)
    except Exception as exc:  # tifffile raises many types for a missing or broken file
        raise ValueError(f"cannot read point map {path}: {exc}") from None
    if xyz.ndim != 3 or xyz.shape[2] != 3 or xyz.dtype.kind != "f":
        raise ValueError(f"point map {path} is {xyz.dtype} {xyz.shape}; expected a float (H, W, 3) TIFF")
    return np.ascontiguousarray(xyz, dtype=np.float32)


def read_rgb(path) -> np.ndarray:
    """An image file as ``(H, W, 3)`` uint8 RGB (gray expanded), or a clear error."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cannot read image {path}: missing, unreadable or corrupt")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def fit_files(paths, plane) -> np.ndarray:
    """Image files read and fitted to a bundle's input ``plane``: ``(N, H, W, 3)`` uint8, as
    the runtime fits camera frames (``enroll``, ``predict``)."""
    return np.stack([fit_image(read_rgb(p), (plane.height, plane.width), plane.fit, plane.interpolation)
                     for p in paths])
