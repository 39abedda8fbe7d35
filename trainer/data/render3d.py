"""3D data rendered as images, for methods that see other modalities through a 2D encoder.

CMAD's "3D modality" is MVTec 3D-AD depth maps and Eyecandies surface-normal maps shown to
CLIP as images (research/official_code.md section 4; the authors' rendering is not
released). The renderings chosen here, from each dataset's own files:

* **depth** (MVTec 3D-AD ``xyz/*.tiff``: an organized point cloud, metres, missing points
  all-zero): the z channel of the valid points, min-max normalized per image and
  inverted so nearer is brighter, mapped to grey levels 32..255; missing points are 0
  (black), so the background never looks like the farthest surface. Grey in 3 channels.
  Eyecandies ``<id>_depth.png`` (16-bit, normalized per image by the dataset; a rendered
  scene has depth everywhere, so every pixel counts) is rendered the same way.
* **normals** (MVTec 3D-AD): the unit normal of each point from the cross product of the
  central differences of its 4 neighbours, oriented towards the camera, encoded as
  ``RGB = round((n + 1) / 2 * 255)``; points with a missing neighbour are 0. Eyecandies
  ships exactly this encoding (``<id>_normals.png``, ``n = RGB / 127.5 - 1``), used as is.

Eyecandies as a point map (PIRN's 3D plane, :func:`eyecandies_xyz`): the 16-bit depth
``d`` is metric as ``d / 65535 * (max - min) + min`` with ``normalization`` ``min`` / ``max``
from ``<id>_info_depth.yaml``, back-projected through the dataset's pinhole camera (focal
length 711.11 px, principal point at the image centre; the dataset's own tooling,
``eyecandies/stages/depth.py``) into camera-frame ``x, y, z`` as MVTec 3D-AD's point maps
are. A rendered scene has depth everywhere: no point is missing (16-bit 0 is ``min``).
"""

from __future__ import annotations

import numpy as np

RENDERINGS = ("rgb", "depth", "normals")


def valid_points(xyz: np.ndarray) -> np.ndarray:
    """``(H, W)`` True where the point cloud has a point (finite, not all-zero)."""
    return np.isfinite(xyz).all(-1) & (xyz != 0).any(-1)


def depth_image(z: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``(H, W)`` depth -> ``(H, W, 3)`` uint8: nearer brighter (32..255), missing black."""
    out = np.zeros(z.shape, np.uint8)
    if valid.any():
        near, far = float(z[valid].min()), float(z[valid].max())
        span = far - near if far > near else 1.0
        out[valid] = np.round(32 + 223 * (far - z[valid]) / span).astype(np.uint8)
    return np.repeat(out[..., None], 3, axis=2)


EYECANDIES_FOCAL = 711.11  # pixels, principal point at the image centre


def eyecandies_xyz(depth: np.ndarray, near: float, far: float,
                   focal: float = EYECANDIES_FOCAL) -> np.ndarray:
    """An Eyecandies 16-bit depth image -> ``(H, W, 3)`` float32 camera-frame point map."""
    h, w = depth.shape
    z = depth.astype(np.float64) / 65535.0 * (far - near) + near
    u, v = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    xyz = np.stack([(u - w / 2) * z / focal, (v - h / 2) * z / focal, z], axis=-1)
    return xyz.astype(np.float32)


def depth_from_xyz(xyz: np.ndarray) -> np.ndarray:
    """MVTec 3D-AD point map -> depth image (z of the valid points)."""
    return depth_image(xyz[..., 2], valid_points(xyz))


def normals_from_xyz(xyz: np.ndarray) -> np.ndarray:
    """MVTec 3D-AD point map -> normals image (central differences, towards the camera)."""
    valid = valid_points(xyz)
    p = xyz.astype(np.float64)
    dx = np.zeros_like(p)
    dy = np.zeros_like(p)
    dx[:, 1:-1] = p[:, 2:] - p[:, :-2]
    dy[1:-1] = p[2:] - p[:-2]
    ok = valid.copy()
    ok[:, 1:-1] &= valid[:, 2:] & valid[:, :-2]
    ok[1:-1] &= valid[2:] & valid[:-2]
    ok[:, [0, -1]] = False
    ok[[0, -1], :] = False
    n = np.cross(dx, dy)
    norm = np.linalg.norm(n, axis=-1)
    ok &= norm > 0
    n[ok] /= norm[ok, None]
    flip = (n * p).sum(-1) > 0  # a normal facing the camera points against the view ray
    n[flip] *= -1
    out = np.zeros(xyz.shape, np.uint8)
    out[ok] = np.round((n[ok] + 1) / 2 * 255).astype(np.uint8)
    return out
