"""AF-CLIP training (Eq. 11-15): one phase over all auxiliary data for adapter + prompt.

Loss: focal (gamma 4, no alpha) on p_CLS + lambda1 * (focal + L1) on the patch map against
the mask downsampled to the grid (bilinear, > 0.5) + lambda2 * patch alignment (Eq. 14) on
the projected features of each set (pairs within each image), averaged over sets. With
``head.seg_gradient: official`` the segmentation focal term keeps its value but takes the
gradient the official code's in-place target edit gives it. The backbone taps are computed
without gradients (the backbone is frozen). Defaults: Adam lr 1e-4, betas (0.5, 0.999),
batch 8, 2 epochs (the paper's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edge_inspect.trainer.heads.afclip.model import AfClipHead
from edge_inspect.trainer.heads.base import MethodTraining, TrainPhase
from edge_inspect.trainer.losses import (
    binary_focal_loss,
    binary_focal_loss_official_gradient,
    patch_alignment_loss,
)

AFCLIP_TRAINING = {"epochs": 2, "batch_size": 8, "lr": 1e-4, "betas": (0.5, 0.999)}


class AfClipTraining(MethodTraining):
    defaults = AFCLIP_TRAINING
    caches_features = True  # frozen taps, no augmentation

    def frozen_features(self, head: AfClipHead, images: torch.Tensor) -> dict[str, torch.Tensor]:
        taps = head.backbone.forward_taps(images, tuple(head.cfg.taps))
        return {f"tap{k}": taps[k] for k in head.cfg.taps}

    def phases(self, head: AfClipHead, datasets: list[str], settings: dict) -> list[TrainPhase]:
        params = [head.prompt_context, *head.adapter.parameters()]
        return [TrainPhase("adapter+prompt", list(datasets), params,
                           epochs=settings.get("epochs"), steps=settings.get("steps"))]

    def loss(self, head: AfClipHead, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
             masks: torch.Tensor, phase: TrainPhase) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = head.cfg
        with torch.no_grad():
            sets = head.sets_from_taps({k: inputs[f"tap{k}"] for k in cfg.taps})
        p, z = head.probabilities(sets)
        rows, cols = head.backbone.grid
        gt = F.interpolate(masks.float().unsqueeze(1), size=(rows, cols), mode="bilinear",
                           align_corners=False).flatten(1) > 0.5
        gt = gt.float()
        cls = binary_focal_loss(p[:, 0], labels.float(), cfg.focal_gamma)
        seg_focal = (binary_focal_loss_official_gradient if cfg.seg_gradient == "official"
                     else binary_focal_loss)
        seg = seg_focal(p[:, 1:], gt, cfg.focal_gamma) + (p[:, 1:] - gt).abs().mean()
        align = torch.stack([patch_alignment_loss(zs[:, 1:].float(), gt) for zs in z]).mean()
        total = cls + cfg.lambda_seg * seg + cfg.lambda_align * align
        return total, {"cls": cls.item(), "seg": seg.item(), "align": align.item()}
