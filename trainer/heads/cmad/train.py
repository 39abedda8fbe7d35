"""CMAD training (Eq. 3-5): one phase per auxiliary dataset, each training its own
prototype set on that dataset only.

As the official code: Adam lr 1e-3, betas (0.5, 0.999), 1500 steps per set, batches of
8 normal + 8 anomalous images (``train.sampling: balanced``), prototypes from N(0, 0.02^2)
(``head.prototype_init: class_mean`` starts them at the dataset's class means), the
global term a 2-class cross-entropy of ``cos / tau``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edge_inspect.trainer.heads.base import MethodTraining, TrainPhase
from edge_inspect.trainer.heads.cmad.model import CmadHead, prototype_logits, prototype_score
from edge_inspect.trainer.losses import dice_loss, softmax_focal_loss

CMAD_TRAINING = {"steps": 1500, "batch_size": 16, "lr": 1e-3, "betas": (0.5, 0.999),
                 "sampling": "balanced"}


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
        """With ``prototype_init: class_mean``, start set ``m`` at its dataset's mean normal /
        abnormal embeddings (the code keeps the N(0, 0.02^2) start: the default).

        Class means of the dataset's first batches (global: image embeddings by label;
        local: patch features by mask, all taps) put each set where its data is; a
        prototype whose class is absent from those batches keeps its random start.
        """
        if head.cfg.prototype_init != "class_mean":
            return
        m = phase.context["set"]
        device = head.global_prototypes.device
        g_sum = torch.zeros(2, head.global_prototypes.shape[-1], device=device)
        l_sum = torch.zeros(2, head.local_prototypes.shape[-1], device=device)
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
        logits = prototype_logits(f_g, head.global_prototypes[m:m + 1], head.cfg.tau)[:, 0]
        l_global = F.cross_entropy(logits, labels.long())
        g = masks.float()
        l_local = l_global.new_zeros(())
        for f in f_l:
            s_l = head._upsample(prototype_score(f, head.local_prototypes[m:m + 1], head.cfg.tau)[..., 0])
            probs = torch.stack([1 - s_l, s_l], dim=1)
            l_local = l_local + (softmax_focal_loss(probs, g, head.cfg.focal_gamma)
                                 + dice_loss(1 - s_l, 1 - g) + dice_loss(s_l, g))
        total = l_global + head.cfg.beta * l_local
        return total, {"global": l_global.item(), "local": l_local.item()}
