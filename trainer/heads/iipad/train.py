"""IIPAD training: one prompt generator for all categories, from K normal shots of each.

Paper (A.1): Adam at 1e-3, 20 epochs, ``alpha = beta = 8`` (Eq. 12), sparsity 1/256. The
paper gives no batch size; the official code steps one image at a time (batch 1, the
default here). CLIP and the Q-Former are frozen and see no augmentation, so their outputs
are cached (``train.cache_features``).

Per batch (Eq. 6-12): ``F_j`` the normalized V-V patch tokens of each tap, ``F^a_j`` their
synthetic anomalous versions (Eq. 8, on the normalized tokens), then
``L = (L_s^n + L_s^a) + beta (L_f^n + L_f^a) + alpha L_t``, each term averaged over taps
and images, on plain cosines (``head.loss_temperature: 1``, as the paper prints them and
the official code trains). This is the paper's loss; the official code trains another one
(cosine pull/push toward two ensemble text anchors, ``L_text + 0.125 L_patch + L_fg``),
which is not offered: it needs the code's own template and defect-phrase lists (read in a
public copy of the code, handevmin/One-For-All-Few-Shot-Anomaly-Detection at 22325b9),
which we do not copy.

The official schedule (lr 1e-5, weight decay 1e-4, cosine annealing per epoch with
``eta_min = 0.05``, so the rate climbs to 0.05) is a switch of the train settings:
``train: {lr: 1.0e-5, weight_decay: 1.0e-4, schedule: cosine, eta_min: 0.05}``. Its model
selection on the test set is never done.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edge_inspect.trainer.heads.base import MethodTraining, TrainPhase
from edge_inspect.trainer.heads.iipad.losses import (
    semantic_alignment,
    synthetic_anomalous,
    textual_guidance,
    token_alignment,
)
from edge_inspect.trainer.heads.iipad.model import IipadHead

IIPAD_TRAINING = {"epochs": 20, "batch_size": 1, "lr": 1e-3, "betas": (0.9, 0.999)}


class IipadTraining(MethodTraining):
    defaults = IIPAD_TRAINING
    caches_features = True  # frozen CLIP and Q-Former, no augmentation

    def frozen_features(self, head: IipadHead, images: torch.Tensor, *planes: torch.Tensor):
        feats = head.encode(images)
        feats.pop("memory")  # the memory taps matter at inference only
        return feats

    def phases(self, head: IipadHead, datasets: list[str], settings: dict) -> list[TrainPhase]:
        params = [p for p in head.generator.parameters() if p.requires_grad]
        return [TrainPhase("generator", list(datasets), params, epochs=settings.get("epochs"),
                           steps=settings.get("steps"))]

    def loss(self, head: IipadHead, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
             masks: torch.Tensor, phase: TrainPhase) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = head.cfg
        tau = cfg.loss_temperature
        e_n, e_a, tok_n, tok_a = head.prompt_embeddings(inputs["g"], inputs.get("z"))
        normal = [F.normalize(inputs["patches"][:, j].float(), dim=-1) for j in range(len(cfg.taps))]
        synthetic = synthetic_anomalous(normal, cfg.synthetic_noise)

        def over_taps(fn, feats) -> torch.Tensor:
            return torch.stack([fn(f) for f in feats]).mean(dim=0)

        parts = {
            "semantic_normal": over_taps(lambda f: semantic_alignment(f, e_n, e_a, tau), normal),
            "semantic_abnormal": over_taps(lambda f: semantic_alignment(f, e_a, e_n, tau), synthetic),
            "token_normal": over_taps(lambda f: token_alignment(tok_n, f, cfg.sparsity, tau), normal),
            "token_abnormal": over_taps(lambda f: token_alignment(tok_a, f, cfg.sparsity, tau), synthetic),
            "textual": textual_guidance(e_n, e_a, *head.manual_features(), tau),
        }
        total = (parts["semantic_normal"] + parts["semantic_abnormal"]
                 + cfg.beta * (parts["token_normal"] + parts["token_abnormal"])
                 + cfg.alpha * parts["textual"]).mean()
        return total, {k: v.mean().item() for k, v in parts.items()}
