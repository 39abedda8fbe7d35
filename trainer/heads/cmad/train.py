"""CMAD training (Eq. 3-5): one phase per auxiliary dataset, each training its own
prototype set on that dataset only; prototypes start at the dataset's class means.

Defaults (not given in the paper, see the model's docstring): Adam lr 1e-3, batch 16,
1500 steps per set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edge_inspect.trainer.heads.base import MethodTraining, TrainPhase
from edge_inspect.trainer.heads.cmad.model import CmadHead, prototype_score
from edge_inspect.trainer.losses import dice_loss, softmax_focal_loss

CMAD_TRAINING = {"steps": 1500, "batch_size": 16, "lr": 1e-3, "betas": (0.9, 0.999)}


class CmadTraining(MethodTraining):
    defaults = CMAD_TRAINING
    caches_features = True  # frozen global and local embeddings, no augmentation

    def frozen_features(self, head: CmadHead, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f_g, f_l = head.features(images)
        return {"global": f_g, **{f"local{i}": f for i, f in enumerate(f_l)}}

    def phases(self, head: CmadHead, datasets: list[str], settings: dict) -> list[TrainPhase]:
        if list(datasets) != head.set_names:
            raise ValueError(f"CMAD prototype sets {head.set_names} do not match the auxiliary "
                             f"datasets {list(datasets)}")
        return [TrainPhase(f"prototypes:{name}", [name],
                           [head.global_prototypes, head.local_prototypes],
                           epochs=settings.get("epochs"), steps=settings.get("steps"),
                           context={"set": i})
                for i, name in enumerate(head.set_names)]

    @torch.no_grad()
    def begin_phase(self, head: CmadHead, phase: TrainPhase, batches: list[tuple[torch.Tensor, ...]]) -> None:
        """Start set ``m`` at its dataset's mean normal / abnormal embeddings.

        The paper does not say how prototypes are initialised. Starting from the class means
        of the dataset's first batches (global: image embeddings by label; local: patch
        embeddings by mask, all taps) puts each set where its data is, which is what the
        harmonization weights (Eq. 7-8) rely on; a prototype whose class is absent from
        those batches keeps its random start.
        """
        m = phase.context["set"]
        device = head.global_prototypes.device
        g_sum = torch.zeros(2, head.global_prototypes.shape[-1], device=device)
        l_sum = torch.zeros_like(g_sum)
        g_n, l_n = torch.zeros(2, device=device), torch.zeros(2, device=device)
        rows, cols = head.backbone.grid
        for images, labels, masks in batches:
            f_g, f_l = head.features(images)
            f_g = F.normalize(f_g, dim=-1)
            patch_labels = (F.interpolate(masks.float().unsqueeze(1), size=(rows, cols),
                                          mode="bilinear", align_corners=False) > 0.5).flatten(1)
            for c in (0, 1):
                sel = labels == c
                g_sum[c] += f_g[sel].sum(0)
                g_n[c] += sel.sum()
                for f in f_l:
                    f = F.normalize(f, dim=-1)
                    psel = patch_labels == bool(c)
                    l_sum[c] += f[psel].sum(0)
                    l_n[c] += psel.sum()
        for c in (0, 1):
            if g_n[c]:
                head.global_prototypes[m, c] = g_sum[c] / g_n[c]
            if l_n[c]:
                head.local_prototypes[m, c] = l_sum[c] / l_n[c]

    def loss(self, head: CmadHead, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
             masks: torch.Tensor, phase: TrainPhase) -> tuple[torch.Tensor, dict[str, float]]:
        """Eq. 3-5 for the prototype set of ``phase`` (the other sets get no gradient)."""
        m = phase.context["set"]
        f_g = inputs["global"]
        f_l = [inputs[f"local{i}"] for i in range(len(head.cfg.taps))]
        s_g = prototype_score(f_g, head.global_prototypes[m:m + 1], head.cfg.tau)[:, 0]
        l_global = F.binary_cross_entropy(s_g.clamp(1e-6, 1 - 1e-6), labels.float())
        g = masks.float()
        l_local = s_g.new_zeros(())
        for f in f_l:
            s_l = head._upsample(prototype_score(f, head.local_prototypes[m:m + 1], head.cfg.tau)[..., 0])
            probs = torch.stack([1 - s_l, s_l], dim=1)
            l_local = l_local + (softmax_focal_loss(probs, g, head.cfg.focal_gamma)
                                 + dice_loss(1 - s_l, 1 - g) + dice_loss(s_l, g))
        total = l_global + head.cfg.beta * l_local
        return total, {"global": l_global.item(), "local": l_local.item()}
