"""The exported graph: uint8 RGB frames (+ raw 3D planes, + few-shot memory) -> score, map,
features.

Normalization moves into the graph (``/255``, ``-mean``, ``/std`` in the order
``trainer.data.transforms.to_batch`` uses), so the runtime only fits frames to the input
size. Few-shot memories are graph *inputs* (``memory.<name>``), fed from the bundle's
``memory.npz``: enrollment can replace them without rebuilding the graph. A head's further
planes (``head.planes``: PIRN's ``xyz`` / ``depth``) are inputs after the image, float32
``(B, H, W, C)`` as the camera measured them; what the model derives from them (surface
normals) is computed in the graph. The features the
memory is built from are extra outputs (``feature.<name>``). A head's carried state (PIRN's
prototypes, ``carry_state``) is the last input (``state.<name>``) and the last output
(``next.<name>``). Positional embeddings, text
features (AF-CLIP), the Gaussian kernels and the map smoothing are constants or ops inside
the graph, identical to the torch evaluation (the parity gate checks it).
"""

from __future__ import annotations

import torch
from torch import nn

from edge_inspect.trainer.heads.base import AnomalyHead


class ExportGraph(nn.Module):
    """Wraps a head for ``torch.onnx.export``; ``memory_names`` order the memory inputs."""

    def __init__(self, head: AnomalyHead, memory_names: list[str], feature_names: list[str],
                 carry_state: bool = False) -> None:
        super().__init__()
        self.carry_state = carry_state
        self.head = head.eval()
        head.freeze_constants()
        self.memory_names = list(memory_names)
        self.feature_names = list(feature_names)
        norm = head.backbone.normalization
        self.register_buffer("mean", torch.tensor(norm.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(norm.std).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``image`` uint8 NHWC, then one float32 NHWC input per ``head.planes``, then the
        memory tensors in ``memory_names`` order, then the carried state when ``carry_state``."""
        n = len(self.head.planes)
        planes = [p.permute(0, 3, 1, 2).float() for p in inputs[:n]]
        memory = inputs[n:n + len(self.memory_names)]
        x = image.permute(0, 3, 1, 2).float() / 255.0
        x = (x - self.mean) / self.std
        if self.memory_names:
            self.head.load_memory_state(dict(zip(self.memory_names, memory, strict=True)))
        if self.carry_state:  # a stateful head has no memory features (checked by the exporter)
            return self.head.forward_carried(x, *planes, state=inputs[-1])
        score, amap, features = self.head.forward_with_features(x, *planes)
        return (score, amap, *[features[k] for k in self.feature_names])


def batch_axes(head: AnomalyHead, images: torch.Tensor,
               planes: tuple[torch.Tensor, ...] = ()) -> dict[str, int]:
    """Which axis of each feature output is the batch, found by running one and two images."""
    with torch.no_grad():
        one = head.forward_with_features(images[:1], *[p[:1] for p in planes])[2]
        two = head.forward_with_features(images[:1].repeat(2, 1, 1, 1),
                                         *[p[:1].repeat(2, 1, 1, 1) for p in planes])[2]
    axes = {}
    for name in one:
        diff = [i for i, (a, b) in enumerate(zip(one[name].shape, two[name].shape, strict=True)) if a != b]
        if len(diff) != 1:
            raise ValueError(f"feature {name!r}: cannot tell its batch axis from shapes "
                             f"{tuple(one[name].shape)} and {tuple(two[name].shape)}")
        axes[name] = diff[0]
    return axes
