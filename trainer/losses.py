"""Losses of the seed methods, written from the papers' formulas."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def binary_focal_loss(p: torch.Tensor, target: torch.Tensor, gamma: float = 4.0) -> torch.Tensor:
    """Focal loss on probabilities, no class weight alpha (AF-CLIP: gamma 4).

    ``-(1 - p)^g * y * log p - p^g * (1 - y) * log(1 - p)``, averaged over elements, as
    ``BCE(p, y) * (1 - p_t)^g`` like the official code. No clamp of ``p``: torch's BCE caps
    the log at -100, so a saturated wrong probability still gets its (large) gradient,
    where clamping to ``[eps, 1 - eps]`` would give it none.
    """
    with torch.autocast(p.device.type, enabled=False):  # BCE is fp32-only under autocast
        p = p.float()
        y = target.to(p.dtype)
        pt = p * y + (1 - p) * (1 - y)
        return (F.binary_cross_entropy(p, y, reduction="none") * (1 - pt) ** gamma).mean()


def binary_focal_loss_official_gradient(p: torch.Tensor, target: torch.Tensor,
                                        gamma: float = 4.0) -> torch.Tensor:
    """:func:`binary_focal_loss`'s value with the gradient AF-CLIP's official code produces.

    The official loss writes -1 into the normal pixels of the target after the focal term
    saved it (``copy.copy`` shares storage), so backward evaluates BCE's and ``p_t``'s
    derivatives with ``y' = -1`` on normal pixels: ``dBCE/dp = (p - y') / (p (1 - p))`` and
    ``dp_t/dp = y' - (1 - y) = -2`` there, while every forward value stays the paper's. On
    a normal pixel that is 2.1x the paper's gradient at p = 0.9 and 22x at p = 0.01
    (research/official_code.md 1e). Anomalous pixels (y' = y = 1) are unchanged.
    """
    with torch.autocast(p.device.type, enabled=False):
        return _official_gradient_focal(p.float(), target, gamma)


def _official_gradient_focal(p: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    y = target.to(p.dtype)
    pt = p * y + (1 - p) * (1 - y)
    ce = F.binary_cross_entropy(p, y, reduction="none")
    value = ce * (1 - pt) ** gamma
    with torch.no_grad():
        y_saved = 2 * y - 1  # what backward reads: 1 on anomalous pixels, -1 on normal ones
        d_ce = (p - y_saved) / (p * (1 - p)).clamp_min(1e-12)  # torch's BCE backward
        d_pt = y_saved - (1 - y)
        grad = d_ce * (1 - pt) ** gamma - ce * gamma * (1 - pt) ** (gamma - 1) * d_pt
    surrogate = value.detach() + grad * (p - p.detach())  # value as forward, grad as backward
    return surrogate.mean()


def softmax_focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
                       eps: float = 1e-6) -> torch.Tensor:
    """Focal loss (Lin et al., gamma 2) on class probabilities ``(B, K, H, W)``.

    ``target`` holds class indices ``(B, H, W)``; the loss is ``-(1 - p_t)^g log p_t``.
    """
    pt = probs.float().gather(1, target.long().unsqueeze(1)).squeeze(1).clamp(eps, 1.0)
    return (-(1 - pt) ** gamma * torch.log(pt)).mean()


def dice_loss(p: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``1 - (2 |P.G| + s) / (|P| + |G| + s)`` per image, averaged (soft Dice, s = 1)."""
    p = p.float().flatten(1)
    g = target.to(p.dtype).flatten(1)
    dice = (2 * (p * g).sum(1) + smooth) / (p.sum(1) + g.sum(1) + smooth)
    return (1 - dice).mean()


def patch_alignment_loss(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """AF-CLIP Eq. 14 for one token set: pairs within each image, pooled over the batch.

    ``max(0, sum_i S_na(i) / sum_i Nn_i Na_i - sum_i (S_nn(i) + S_aa(i)) / sum_i (Nn_i^2 + Na_i^2))``
    where ``S_xy(i)`` sums the cosine similarities of image ``i``'s patch pairs (self-pairs
    included, as in the official per-image ``b x l x l`` mask). Patches of different
    images are never paired. Since the features are L2-normalized, a pair sum is a dot
    product of per-image class sums (``sum_jk <z_j, z_k> = |sum_j z_j|^2``): exact, O(N).

    Args:
        z: ``(B, N, C)`` patch features (normalized here).
        labels: ``(B, N)`` patch labels in {0, 1}.

    Returns 0 when no image has both normal and anomalous patches (the official code's
    empty mean is NaN, which its hinge turns into 0).
    """
    z = F.normalize(z.float(), dim=-1)
    a = labels.to(z.dtype)
    n = 1 - a
    n_a, n_n = a.sum(1), n.sum(1)  # (B,)
    cross_pairs = (n_a * n_n).sum()
    if cross_pairs == 0:
        return z.sum() * 0.0
    s_a = (a.unsqueeze(-1) * z).sum(1)  # (B, C) per-image class sums
    s_n = (n.unsqueeze(-1) * z).sum(1)
    cross = (s_n * s_a).sum() / cross_pairs
    same = ((s_n * s_n).sum() + (s_a * s_a).sum()) / (n_n**2 + n_a**2).sum()
    return torch.clamp(cross - same, min=0.0)
