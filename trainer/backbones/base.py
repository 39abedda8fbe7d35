"""The interface every backbone offers the heads: token grids at chosen taps."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Normalization:
    """Per-channel input normalization, ``(x / 255 - mean) / std`` on RGB planes.

    Recorded in the bundle manifest so the runtime preprocesses exactly like training.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


OPENAI_CLIP_NORM = Normalization(
    mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711)
)
IMAGENET_NORM = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


class Backbone(nn.Module):
    """A frozen image encoder that exposes intermediate token grids.

    Subclasses set ``input_size`` (H, W), ``grid`` (rows, cols of patch tokens),
    ``normalization`` and ``num_layers``, and implement :meth:`forward_taps`.
    Layers are 1-indexed: tap ``k`` is the residual stream after block ``k``.
    """

    input_size: tuple[int, int]
    grid: tuple[int, int]
    normalization: Normalization
    num_layers: int

    def tap_dim(self, layer: int) -> int:
        """Channel width of the tokens at ``layer``."""
        raise NotImplementedError

    def feature_names(self, layer: int) -> tuple[str, ...] | None:
        """Names of the token channels when they mean something on their own (else None)."""
        return None

    def forward_taps(self, images: torch.Tensor, layers: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """Tokens ``(B, 1 + rows * cols, C)`` (CLS first, then patches row-major) per layer."""
        raise NotImplementedError

    def check_layers(self, layers: tuple[int, ...]) -> None:
        """Raise a clear error for taps outside ``1..num_layers``."""
        bad = [k for k in layers if not 1 <= k <= self.num_layers]
        if bad:
            raise ValueError(
                f"{type(self).__name__} has blocks 1..{self.num_layers}; taps {bad} do not "
                "exist (taps are 1-indexed block outputs)."
            )

    def check_input(self, images: torch.Tensor) -> None:
        """Raise a clear error for a batch that does not match the baked input size."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != tuple(self.input_size):
            raise ValueError(
                f"{type(self).__name__} is baked for input {self.input_size}, got "
                f"{tuple(images.shape[-2:])}; resize the images or rebuild the backbone "
                "with that input_size."
            )

    def patch_tokens_as_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, 1 + N, C)`` -> ``(B, C, rows, cols)`` patch grid (CLS dropped)."""
        b, _, c = tokens.shape
        rows, cols = self.grid
        return tokens[:, 1:].transpose(1, 2).reshape(b, c, rows, cols)
