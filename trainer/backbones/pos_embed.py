"""Resize a ViT's learned positional embedding once, so nothing interpolates at run time."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

INTERPOLATION_MODES = ("bilinear", "bicubic")


def resize_grid_embedding(
    pos: torch.Tensor,
    new_grid: tuple[int, int],
    num_prefix: int = 1,
    mode: str = "bicubic",
    antialias: bool = False,
    scale_offset: float = 0.0,
) -> torch.Tensor:
    """Resize a ``(num_prefix + g*g, C)`` positional table to ``new_grid``.

    Args:
        pos: the table; the first ``num_prefix`` rows (CLS) are kept as they are.
        new_grid: target (rows, cols) of patch tokens.
        mode: ``bilinear`` (AF-CLIP, AnomalyCLIP) or ``bicubic`` (open_clip, DINOv2).
        antialias: torch's antialias flag (open_clip uses it when shrinking).
        scale_offset: DINOv2's official ``interpolate_offset`` (0.1): interpolate by scale
            factor ``(new + offset) / old`` instead of by size. 0 means by size, as
            Hugging Face does.

    Returns:
        The resized table, same dtype, ``(num_prefix + rows*cols, C)``.
    """
    if mode not in INTERPOLATION_MODES:
        raise ValueError(f"interpolation {mode!r} unknown; choose one of {INTERPOLATION_MODES}")
    prefix, grid = pos[:num_prefix], pos[num_prefix:]
    n, dim = grid.shape
    old = int(math.isqrt(n))
    if old * old != n:
        raise ValueError(f"positional table has {n} patch rows, not a square grid")
    if (old, old) == tuple(new_grid):
        return pos.clone()
    src = grid.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    if scale_offset:
        sy = (new_grid[0] + scale_offset) / old
        sx = (new_grid[1] + scale_offset) / old
        out = F.interpolate(src, scale_factor=(sy, sx), mode=mode, antialias=antialias,
                            align_corners=False)
    else:
        out = F.interpolate(src, size=tuple(new_grid), mode=mode, antialias=antialias,
                            align_corners=False)
    if tuple(out.shape[-2:]) != tuple(new_grid):
        raise ValueError(f"interpolation gave grid {tuple(out.shape[-2:])}, wanted {new_grid}")
    out = out.permute(0, 2, 3, 1).reshape(-1, dim).to(pos.dtype)
    return torch.cat([prefix, out], dim=0)
