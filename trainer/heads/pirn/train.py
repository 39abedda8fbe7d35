"""PIRN training: the K shots of the target, intra-modal reconstruction with soft mining.

As the paper (Implementation Details): Adam at 1e-4, 80 epochs few-shot (30 all-shot: set
``train.epochs``), the encoders frozen; the loss is :func:`.losses.soft_mining_loss` on
each modality's tokens and ``Z_rec``. The paper gives no batch size: 16 (INP-Former's), so
K <= 16 shots make one step per epoch. The encoders see no augmentation, so their tokens
are cached (``train.cache_features``) and computed once per shot.

``head.carried_training`` (for bundles exported with ``--carry-state``; not in the paper)
averages that loss with the loss of reconstructing the batch from carried prototypes
(:meth:`PirnHead.carried_start`, 1-3 hops, drawn per step).
"""

from __future__ import annotations

import torch

from edge_inspect.trainer.heads.base import MethodTraining, TrainPhase
from edge_inspect.trainer.heads.pirn.losses import soft_mining_loss
from edge_inspect.trainer.heads.pirn.model import PirnHead

PIRN_TRAINING = {"epochs": 80, "batch_size": 16, "lr": 1e-4, "betas": (0.9, 0.999)}


class PirnTraining(MethodTraining):
    defaults = PIRN_TRAINING
    caches_features = True  # frozen encoders, no augmentation

    def frozen_features(self, head: PirnHead, images: torch.Tensor,
                        *planes: torch.Tensor) -> dict[str, torch.Tensor]:
        return head.encode(images, planes[0] if planes else None)

    def phases(self, head: PirnHead, datasets: list[str], settings: dict) -> list[TrainPhase]:
        params = [p for p in head.parameters() if p.requires_grad]
        return [TrainPhase("decoder", list(datasets), params, epochs=settings.get("epochs"),
                           steps=settings.get("steps"))]

    def loss(self, head: PirnHead, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
             masks: torch.Tensor, phase: TrainPhase) -> tuple[torch.Tensor, dict[str, float]]:
        reconstructed, _ = head.decode(inputs)
        parts = {m: soft_mining_loss({m: inputs[m]}, {m: reconstructed[m]}) for m in head.cfg.modalities}
        total = torch.stack(list(parts.values())).mean()
        logged = {m: v.item() for m, v in parts.items()}
        if head.cfg.carried_training and inputs["rgb"].shape[0] > 1:  # carried from other shots
            hops = int(torch.randint(1, 4, ()))
            carried, _ = head.decode(inputs, head.carried_start(inputs, hops))
            loss = torch.stack([soft_mining_loss({m: inputs[m]}, {m: carried[m]})
                                for m in head.cfg.modalities]).mean()
            logged["carried"] = loss.item()
            total = (total + loss) / 2
        return total, logged
