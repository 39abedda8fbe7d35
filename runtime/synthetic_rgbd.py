"""A generated RGB-D scene where each defect kind is visible in one plane only (numpy only:
the runtime's synthetic RGB-D camera and the trainer's dataset draw the same scenes).

Why two planes matter, measurably: a printed sheet (a coloured stripe pattern, unshaded,
so colour does not depend on geometry) lies on a gently curved, tilted support seen by a
pinhole camera about 0.5 m away; every image draws its pattern phase, tilt and curvature.

* ``dent``: a smooth depression of the surface (6-10 mm deep, 8-14 px radius at 112 px) with the
  colour unchanged -- only the point cloud (and so the normals) shows it;
* ``stain``: a brownish blotch on the print with the geometry unchanged -- only the RGB
  plane shows it.

Masks are the pixels where the dent is deeper than a fifth of its depth, or the stain's
opacity above 0.2. A scene is ``image`` (RGB uint8), ``xyz`` (float32 metres, ``(H, W, 3)``)
and the mask; ``dropout`` of the points go missing (all-zero) at random, as real sensors
drop them, 0 by default: each missing point blackens a cross of 5 normals, and on a tiny
random encoder at 112 px a 0.2 % dropout cut the normals branch's dent pixel AUROC from
0.99 to 0.66 (``SurfaceNormals(fill_invalid=2)`` brought it back to 0.995).
"""

from __future__ import annotations

import numpy as np

KINDS = ("dent", "stain")
FOCAL = 1.2  # focal length in image widths (fx = fy = FOCAL * size)


def intrinsics(size: int) -> tuple[float, float, float, float]:
    """``(fx, fy, cx, cy)`` of the generated camera at ``size`` pixels."""
    f = FOCAL * size
    c = (size - 1) / 2
    return f, f, c, c


def render(size: int, rng: np.random.Generator, kind: str,
           dropout: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scene: ``(image uint8 (H, W, 3), xyz float32 (H, W, 3), mask uint8 (H, W))``."""
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    s = u / size - 0.5, v / size - 0.5
    # support: a tilted, gently curved surface, depth in metres along each pixel's ray
    tilt = rng.uniform(-0.08, 0.08, 2)
    curve = rng.uniform(0.02, 0.05)
    z = 0.5 + tilt[0] * s[0] + tilt[1] * s[1] + curve * (s[0] ** 2 + s[1] ** 2)
    # the print: stripes of two colours at a drawn angle and phase, plus fine noise
    angle, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    t = 0.5 + 0.5 * np.sin(2 * np.pi * 6 * (np.cos(angle) * s[0] + np.sin(angle) * s[1]) + phase)
    a, b = np.array([200.0, 180, 60]), np.array([40.0, 90, 170])
    rgb = t[..., None] * a + (1 - t[..., None]) * b + rng.normal(0, 4, (size, size, 3))
    mask = np.zeros((size, size), np.uint8)
    if kind in KINDS:
        cu, cv = rng.uniform(0.25, 0.75, 2) * size
        r = rng.uniform(8, 14) * size / 112
        d2 = ((u - cu) ** 2 + (v - cv) ** 2) / r**2
        bump = np.exp(-2.0 * d2)
        if kind == "dent":
            z = z + rng.uniform(0.006, 0.010) * bump  # farther from the camera: a depression
            mask = (bump > 0.2).astype(np.uint8)
        else:
            opacity = 0.85 * bump * (1 + 0.2 * rng.normal(size=bump.shape)).clip(0.5, 1.5)
            rgb = rgb * (1 - opacity[..., None]) + opacity[..., None] * np.array([110.0, 70, 30])
            mask = (opacity > 0.2).astype(np.uint8)
    fx, fy, cx, cy = intrinsics(size)
    xyz = np.stack([(u - cx) * z / fx, (v - cy) * z / fy, z], axis=-1).astype(np.float32)
    xyz[rng.random((size, size)) < dropout] = 0.0  # sensor dropouts: missing points are all-zero
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8), xyz, mask
