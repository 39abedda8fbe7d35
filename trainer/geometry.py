"""Surface normals from raw 3D planes, in plain torch ops (they go inside the exported graph).

PIRN sees geometry as "point clouds converted into 3-channel surface normal maps". A camera
sends the raw plane -- an organized point cloud ``xyz`` (MVTec 3D-AD TIFFs: metres, a
missing point is all-zero) or a ``depth`` map with pinhole intrinsics -- and training,
export and the runtime compute the same normals because they run this module:

* ``depth`` -> ``xyz``: ``x = (u - cx) z / fx``, ``y = (v - cy) z / fy`` at pixel centres
  ``u, v = 0, 1, ...`` of the plane as it reaches the model (intrinsics are those of that
  resolution); depth 0 or not finite is a missing point;
* ``xyz`` -> normals: the cross product of the central differences of each point's 4
  neighbours, unit length, oriented towards the camera (``n . p < 0``), as
  :func:`trainer.data.render3d.normals_from_xyz` (the rendering CMAD's configs use, tested
  equal). A point is **invalid** when it or one of its 4 neighbours is missing (zero or
  NaN / inf), on the plane's outer ring, or when the cross product vanishes; invalid
  normals are 0 and their pixels black (0) in the image the encoder sees, as in the
  rendering. ``fill_invalid`` (0 = off) instead fills each invalid normal from its valid
  3x3 neighbours, repeated that many times (the mean of the valid neighbours' normals,
  renormalized; a pixel with none stays black): isolated sensor dropouts otherwise print a
  black cross of 5 pixels each, which a model must learn as normal.
* Background removal (optional, ``background_plane``): the MVTec 3D-AD literature (BTF,
  M3DM) fits a plane to the scene's border points and drops points within a distance of
  it; here the plane is fitted by least squares (``z = a x + b y + c``) to the valid points
  of the outer ``border`` pixels, and points within ``background_distance`` of it are
  marked missing before the normals are taken. Least squares, not RANSAC, so the graph is
  deterministic and exportable; an object that touches the border biases the fit.
"""

from __future__ import annotations

import torch
from torch import nn

MODALITIES_3D = ("xyz", "depth")


def missing_points(xyz: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` -> ``(B, H, W)`` True where there is no point (zero or not finite)."""
    finite = torch.isfinite(xyz).all(dim=1)
    return ~finite | (xyz == 0).all(dim=1)


def xyz_from_depth(depth: torch.Tensor, fx: float, fy: float, cx: float, cy: float) -> torch.Tensor:
    """``(B, 1, H, W)`` or ``(B, H, W)`` depth -> ``(B, 3, H, W)`` points; missing depth -> 0."""
    z = depth if depth.ndim == 3 else depth[:, 0]
    z = torch.where(torch.isfinite(z) & (z > 0), z, torch.zeros_like(z))
    h, w = z.shape[-2:]
    v = torch.arange(h, dtype=z.dtype, device=z.device)[:, None]
    u = torch.arange(w, dtype=z.dtype, device=z.device)[None, :]
    return torch.stack([(u - cx) * z / fx, (v - cy) * z / fy, z], dim=1)


def normals_from_xyz(xyz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, 3, H, W)`` points -> unit normals ``(B, 3, H, W)`` (0 where invalid) and the
    validity mask ``(B, H, W)``."""
    missing = missing_points(xyz)
    p = torch.where(missing[:, None], torch.zeros_like(xyz), xyz)
    dx = p[:, :, 1:-1, 2:] - p[:, :, 1:-1, :-2]
    dy = p[:, :, 2:, 1:-1] - p[:, :, :-2, 1:-1]
    n = torch.cross(dx, dy, dim=1)
    norm = n.norm(dim=1)
    ok = ~(missing[:, 1:-1, 1:-1] | missing[:, 1:-1, 2:] | missing[:, 1:-1, :-2]
           | missing[:, 2:, 1:-1] | missing[:, :-2, 1:-1]) & (norm > 0)
    n = n / norm.clamp(min=1e-12)[:, None]
    facing = (n * p[:, :, 1:-1, 1:-1]).sum(dim=1, keepdim=True) > 0
    n = torch.where(facing, -n, n)
    n = torch.where(ok[:, None], n, torch.zeros_like(n))
    n = nn.functional.pad(n, (1, 1, 1, 1))
    ok = nn.functional.pad(ok, (1, 1, 1, 1), value=False)
    return n, ok


def fill_invalid_normals(normals: torch.Tensor, valid: torch.Tensor,
                         iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill invalid normals from valid 3x3 neighbours, ``iterations`` times (each pass can
    grow the filled region by one pixel); returns the normals and the new validity."""
    ones = torch.ones(1, 1, 3, 3, dtype=normals.dtype, device=normals.device)
    for _ in range(iterations):
        w = valid[:, None].to(normals.dtype)
        total = nn.functional.conv2d((normals * w).reshape(-1, 1, *normals.shape[-2:]), ones,
                                     padding=1).reshape(normals.shape)
        count = nn.functional.conv2d(w, ones, padding=1)
        grown = (count[:, 0] > 0) & ~valid
        mean = total / total.norm(dim=1, keepdim=True).clamp(min=1e-12)
        normals = torch.where(grown[:, None], mean, normals)
        valid = valid | (grown & (total.norm(dim=1) > 0))
    return normals, valid


def remove_background_plane(xyz: torch.Tensor, border: int, distance: float) -> torch.Tensor:
    """Mark as missing (0) the points within ``distance`` of the least-squares plane
    ``z = a x + b y + c`` through the valid points of the outer ``border`` pixels."""
    b, _, h, w = xyz.shape
    ring = torch.ones(h, w, dtype=torch.bool, device=xyz.device)
    ring[border:h - border, border:w - border] = False
    missing = missing_points(xyz)
    use = (~missing & ring).to(xyz.dtype).reshape(b, -1, 1)
    pts = torch.where(missing[:, None], torch.zeros_like(xyz), xyz).reshape(b, 3, -1)
    x, y, z = pts[:, 0, :, None], pts[:, 1, :, None], pts[:, 2, :, None]
    design = torch.cat([x, y, torch.ones_like(x)], dim=2) * use  # (B, HW, 3)
    gram = design.transpose(1, 2) @ design + 1e-9 * torch.eye(3, dtype=xyz.dtype, device=xyz.device)
    coef = torch.linalg.solve(gram, design.transpose(1, 2) @ (z * use))  # (B, 3, 1)
    a, bb, c = coef[:, 0, :, None], coef[:, 1, :, None], coef[:, 2, :, None]
    p = pts.reshape(b, 3, h, w)
    off = (p[:, 2:3] - (a * p[:, 0:1] + bb * p[:, 1:2] + c)).abs() / torch.sqrt(a * a + bb * bb + 1)
    return torch.where(off < distance, torch.zeros_like(p), p)


class SurfaceNormals(nn.Module):
    """A raw 3D plane -> the 3-channel normals image a 2D encoder sees, ``(n + 1) / 2`` in
    ``[0, 1]`` and 0 where invalid (:mod:`trainer.data.render3d`'s encoding / 255, before
    its uint8 rounding).

    Args:
        modality: ``xyz`` (``(B, 3, H, W)`` points) or ``depth`` (``(B, 1, H, W)``).
        intrinsics: ``(fx, fy, cx, cy)`` in pixels of the plane as it reaches the model;
            required for ``depth``.
        background_plane: drop points near the border plane first (see module docstring).
        fill_invalid: passes of filling invalid normals from valid neighbours (0: off).
    """

    def __init__(self, modality: str = "xyz", intrinsics: tuple[float, float, float, float] | None = None,
                 background_plane: bool = False, border: int = 10,
                 background_distance: float = 0.005, fill_invalid: int = 0) -> None:
        super().__init__()
        if modality not in MODALITIES_3D:
            raise ValueError(f"3D plane modality {modality!r} unknown; choose one of {MODALITIES_3D}")
        if modality == "depth" and (intrinsics is None or len(intrinsics) != 4
                                    or min(intrinsics[0], intrinsics[1]) <= 0):
            raise ValueError("a depth plane needs intrinsics (fx, fy, cx, cy) with fx, fy > 0 "
                             "(pixels of the plane as it reaches the model)")
        self.modality = modality
        self.intrinsics = tuple(float(v) for v in intrinsics) if intrinsics else None
        self.background_plane, self.border = background_plane, int(border)
        self.background_distance = float(background_distance)
        self.fill_invalid = int(fill_invalid)

    def points(self, plane: torch.Tensor) -> torch.Tensor:
        xyz = xyz_from_depth(plane, *self.intrinsics) if self.modality == "depth" else plane
        if self.background_plane:
            xyz = remove_background_plane(xyz, self.border, self.background_distance)
        return xyz

    def forward(self, plane: torch.Tensor) -> torch.Tensor:
        normals, ok = normals_from_xyz(self.points(plane.float()))
        if self.fill_invalid:
            normals, ok = fill_invalid_normals(normals, ok, self.fill_invalid)
        return torch.where(ok[:, None], (normals + 1.0) / 2.0, torch.zeros_like(normals))
