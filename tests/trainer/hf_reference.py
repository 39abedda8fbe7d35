"""Random-weight Hugging Face reference models for parity tests."""

from __future__ import annotations

import torch


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Overwrite every floating parameter with noise, so no init symmetry hides a bug.

    LayerNorm weights get 1 + noise (not pure noise) to keep activations in range.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight") or "lambda1" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("logit_scale"):
                p.fill_(2.6592)
            else:
                p.copy_(0.05 * noise)
