"""Losses of the seed methods, written from the papers' formulas."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def binary_focal_loss(p: torch.Tensor, target: torch.Tensor, gamma: float = 4.0,
                      eps: float = 1e-6) -> torch.Tensor:
    """Focal loss on probabilities, no class weight alpha (AF-CLIP: gamma 4).

    ``-(1 - p)^g * y * log p - p^g * (1 - y) * log(1 - p)``, averaged over elements.
    """
    p = p.clamp(eps, 1.0 - eps)
    y = target.to(p.dtype)
    loss = -(1 - p) ** gamma * y * torch.log(p) - p**gamma * (1 - y) * torch.log(1 - p)
    return loss.mean()


def softmax_focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
                       eps: float = 1e-6) -> torch.Tensor:
    """Focal loss (Lin et al., gamma 2) on class probabilities ``(B, K, H, W)``.

    ``target`` holds class indices ``(B, H, W)``; the loss is ``-(1 - p_t)^g log p_t``.
    """
    pt = probs.gather(1, target.long().unsqueeze(1)).squeeze(1).clamp(eps, 1.0)
    return (-(1 - pt) ** gamma * torch.log(pt)).mean()


def dice_loss(p: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``1 - (2 |P.G| + s) / (|P| + |G| + s)`` per image, averaged (soft Dice, s = 1)."""
    p = p.flatten(1)
    g = target.to(p.dtype).flatten(1)
    dice = (2 * (p * g).sum(1) + smooth) / (p.sum(1) + g.sum(1) + smooth)
    return (1 - dice).mean()


def patch_alignment_loss(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """AF-CLIP Eq. 14 for one token set, pooled over the batch.

    ``max(0, mean <z_n, z_a> - (sum <z_n, z_n'> + sum <z_a, z_a'>) / (Nn^2 + Na^2))``
    with cosine similarities over all patch pairs. Since the features are L2-normalized,
    the pair sums are dot products of the class sums (``sum_ij <z_i, z_j> = |sum_i z_i|^2``),
    which is exact and O(N) instead of O(N^2) memory.

    Args:
        z: ``(B, N, C)`` patch features (normalized here).
        labels: ``(B, N)`` patch labels in {0, 1}.

    Returns 0 when the batch lacks normal or anomalous patches (the pair means are empty).
    """
    z = F.normalize(z.float(), dim=-1).reshape(-1, z.shape[-1])
    a = labels.reshape(-1).bool()
    n_a, n_n = int(a.sum()), int((~a).sum())
    if n_a == 0 or n_n == 0:
        return z.sum() * 0.0
    s_a, s_n = z[a].sum(0), z[~a].sum(0)
    cross = (s_n @ s_a) / (n_n * n_a)
    same = (s_n @ s_n + s_a @ s_a) / (n_n**2 + n_a**2)
    return torch.clamp(cross - same, min=0.0)
