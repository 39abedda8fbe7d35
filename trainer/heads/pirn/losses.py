"""PIRN's training loss: intra-modal cosine reconstruction with soft mining (INP-Former).

The paper trains "end-to-end using an intra-modal feature reconstruction loss (e.g., a soft
mining loss [INP-Former])" between each modality's encoder tokens ``E`` and ``Z_rec``. As
INP-Former's ``global_cosine_hm_adaptive`` (research/official_code.md section 5 (e)):
per modality, ``1 - cos`` of each image's flattened ``E`` and ``Z_rec`` (one global cosine
per image), averaged over the batch; the backward pass multiplies the gradient reaching
each token of ``Z_rec`` by ``(d_n / mean(d)) ** y`` with ``d_n = 1 - cos(E_n, Z_rec_n)``
(detached; mean over the batch's tokens, ``y = 3``), so hard-to-reconstruct normal tokens
weigh more. Modalities are averaged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_mining_loss(encoded: dict[str, torch.Tensor], reconstructed: dict[str, torch.Tensor],
                     y: float = 3.0) -> torch.Tensor:
    """``{modality: (B, N, C)}`` encoder tokens and reconstructions -> the scalar loss."""
    if not encoded or set(encoded) != set(reconstructed):
        raise ValueError(f"soft mining needs the same modalities, got {sorted(encoded)} and "
                         f"{sorted(reconstructed)}")
    total = 0.0
    for m, target in encoded.items():
        target, rec = target.detach(), reconstructed[m]
        with torch.no_grad():
            dist = 1.0 - F.cosine_similarity(target.float(), rec.detach().float(), dim=-1)
            factor = (dist / dist.mean().clamp(min=1e-12)).pow(y)[..., None]
        if rec.requires_grad:
            rec.register_hook(lambda grad, f=factor: grad * f.to(grad.dtype))
        total = total + (1.0 - F.cosine_similarity(target.flatten(1), rec.flatten(1), dim=1)).mean()
    return total / len(encoded)
