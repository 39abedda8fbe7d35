"""Fitting frames to a plane: PIL's antialiased bicubic (what the AF-CLIP and CMAD code
resize with) and torchvision's short-side resize + centre crop, reproduced without PIL."""

import cv2
import numpy as np
import pytest
from PIL import Image

from edge_inspect.runtime.preprocess import (
    fit_image,
    resize_bicubic_antialias,
    resize_bicubic_antialias_numpy,
)


def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A fine texture: where antialiasing matters (noise plus a 2-pixel weave)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    weave = 100 * (((yy // 2) + (xx // 2)) % 2)
    noise = rng.integers(0, 120, (h, w, 3))
    return np.clip(weave[..., None] + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("src,dst", [((1024, 1024), (518, 518)), ((250, 250), (518, 518)),
                                     ((300, 451), (224, 224)), ((37, 53), (100, 20)),
                                     ((700, 1000), (518, 518))])
def test_antialiased_bicubic_equals_pillow(src, dst):
    image = _texture(*src, seed=src[0])
    want = np.asarray(Image.fromarray(image).resize(dst[::-1], Image.BICUBIC))
    assert np.array_equal(resize_bicubic_antialias(image, dst), want)
    assert np.array_equal(resize_bicubic_antialias_numpy(image, dst), want)  # without Pillow
    gray = image[..., 0]
    assert np.array_equal(resize_bicubic_antialias_numpy(gray, dst),
                          np.asarray(Image.fromarray(gray).resize(dst[::-1], Image.BICUBIC)))
    want_gray = np.asarray(Image.fromarray(gray).resize(dst[::-1], Image.BICUBIC))
    assert np.array_equal(resize_bicubic_antialias(gray, dst), want_gray)
    assert np.array_equal(fit_image(image, dst, "resize", "bicubic_antialias"), want)


def test_opencv_bicubic_is_not_what_the_papers_code_saw():
    """Why the mode exists: OpenCV's INTER_CUBIC neither antialiases nor uses PIL's kernel."""
    image = _texture(1024, 1024)
    pil = np.asarray(Image.fromarray(image).resize((518, 518), Image.BICUBIC)).astype(float)
    ocv = fit_image(image, (518, 518), "resize", "bicubic").astype(float)
    assert np.abs(ocv - pil).mean() > 3.0


def _torchvision_resize_crop(image: np.ndarray, size: int) -> np.ndarray:
    """torchvision's Resize(size) + CenterCrop(size) on a PIL image, written out."""
    h, w = image.shape[:2]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(size * long / short)
    new_h, new_w = (size, new_long) if h <= w else (new_long, size)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return resized[top:top + size, left:left + size]


@pytest.mark.parametrize("shape", [(300, 451), (451, 300), (224, 224), (800, 600), (300, 455),
                                   (457, 300), (440, 550), (110, 165)])
def test_short_side_crop_is_resize_then_centre_crop(shape):
    image = _texture(*shape, seed=shape[1])
    got = fit_image(image, (224, 224), "short_side_crop", "bicubic_antialias")
    assert got.shape == (224, 224, 3)
    assert np.array_equal(got, _torchvision_resize_crop(image, 224))


def test_float_planes_resample_without_rounding():
    depth = np.random.default_rng(1).random((90, 120, 1)).astype(np.float32)
    out = resize_bicubic_antialias(depth, (45, 60))
    assert np.array_equal(resize_bicubic_antialias(depth[..., 0].copy(), (45, 60)), out[..., 0])
    assert out.dtype == np.float32 and out.shape == (45, 60, 1)
    # A constant plane stays constant (the weights of each output pixel sum to 1).
    assert np.allclose(resize_bicubic_antialias(np.full((90, 120), 0.25, np.float32), (31, 47)), 0.25)
    area = cv2.resize(depth, (60, 45), interpolation=cv2.INTER_AREA)
    assert abs(float(out.mean()) - float(area.mean())) < 0.01
