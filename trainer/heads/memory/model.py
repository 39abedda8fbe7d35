"""Few-shot memory head: K normal images, no training, any backbone.

Two detectors, fused into one image score and one map:

* local -- a :class:`~trainer.memory.PatchMemory` over the patch tokens of ``local_taps``;
  a patch's score is its nearest-neighbour distance, divided by the memory's fold
  reference (the typical image maximum of a normal image, estimated from the shots), so a
  normal image's maximum is about 1;
* global -- a :class:`~trainer.memory.WindowGaussian` over ``global_taps``: texture
  statistics of sliding windows; about 1 for normal images, growing quadratically with a
  shift, so it enters the fusion as ``1 + log(G)``.

Image score = ``max(max_patch local, 1 + log(G))``; map = local patch scores on the grid,
upsampled bilinearly to the input size by ``forward``.
``global_ignore`` drops named channels from the global detector: for the texture backbone,
the mean intensity, because brightness legitimately varies between good images and would
otherwise dominate a covariance estimated from a few shots.
The two scores are on the same footing (about 1 for normal images) without any data but
the K shots, which keeps the K-shot protocol honest. Why two: small defects change a few
patches (local), while a texture whose statistics drift slightly everywhere shows only in
aggregates (global).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edge_inspect.trainer.backbones.base import Backbone
from edge_inspect.trainer.heads.base import AnomalyHead
from edge_inspect.trainer.memory import PatchMemory, WindowGaussian


@dataclass
class MemoryHeadConfig:
    """Which taps feed which detector, and the detectors' settings."""

    local_taps: tuple[int, ...] = (1,)
    global_taps: tuple[int, ...] = (1, 2, 3)
    metric: str = "standardized"
    use_global: bool = True
    window: int = 8
    stride: int = 2
    global_ignore: tuple[str, ...] = ()


# The texture backbone's defaults, chosen on the textile images (benchmarks/textile_fewshot.py).
TEXTURE_MEMORY = MemoryHeadConfig(global_ignore=("mean",))


class MemoryHead(AnomalyHead):
    """Backbone + few-shot memory (method ``memory``); nothing to train, enroll K shots.

    ``forward`` gives ``(image_score (B,), map (B, H, W))``; :meth:`score_taps` the same from
    cached backbone taps with the map on the patch grid.
    """

    method = "memory"

    def __init__(self, backbone: Backbone, cfg: MemoryHeadConfig,
                 shot_taps: dict[int, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        used = set(cfg.local_taps) | (set(cfg.global_taps) if cfg.use_global else set())
        self.taps = tuple(sorted(used))
        backbone.check_layers(self.taps)
        self.register_buffer("global_channels", self._global_channels(), persistent=False)
        self.local: PatchMemory | None = None
        self.glob: WindowGaussian | None = None
        if shot_taps is not None:
            self.enroll_taps(shot_taps)

    @classmethod
    def fit(cls, backbone: Backbone, cfg: MemoryHeadConfig, shots: torch.Tensor) -> MemoryHead:
        """Build the memory from K normal images ``(K, 3, H, W)`` (normalized input)."""
        head = cls(backbone, cfg)
        head.enroll(shots)
        return head

    def enroll(self, shots: torch.Tensor) -> None:
        with torch.no_grad():
            self.enroll_taps(self.backbone.forward_taps(shots, self.taps))

    def enroll_taps(self, shot_taps: dict[int, torch.Tensor]) -> None:
        """Build both detectors from the shots' backbone taps."""
        missing = set(self.taps) - set(shot_taps)
        if missing:
            raise ValueError(f"shot features lack taps {sorted(missing)}")
        with torch.no_grad():
            local, glob = self._features(shot_taps)
            self.local = PatchMemory(local, self.cfg.metric)
            self.local_reference = self.local.fold_reference(self.backbone.grid)
            self.glob = (WindowGaussian(glob, self.cfg.window, self.cfg.stride)
                         if self.cfg.use_global else None)

    def clear_memory(self) -> None:
        self.local, self.glob = None, None

    def memory_state(self) -> dict[str, torch.Tensor]:
        if self.local is None:
            return {}
        state = {f"local.{k}": v for k, v in self.local.state_dict().items()}
        state["local_reference"] = self.local_reference
        if self.glob is not None:
            state |= {f"global.{k}": v for k, v in self.glob.state_dict().items()}
        return state

    def load_memory_state(self, state: dict[str, torch.Tensor]) -> None:
        """Use stored memory tensors as they are (an exported graph binds its inputs here)."""
        if not state:
            self.clear_memory()
            return
        want = {"local.bank", "local.mean", "local.std", "local_reference"}
        if self.cfg.use_global:
            want |= {"global.mean", "global.precision"}
        if set(state) != want:
            raise ValueError(f"memory head state needs {sorted(want)}, got {sorted(state)}")
        self.local = PatchMemory.from_state(state["local.bank"], state["local.mean"],
                                            state["local.std"], self.cfg.metric)
        self.local_reference = state["local_reference"]
        if self.cfg.use_global:
            self.glob = WindowGaussian.from_state(state["global.mean"], state["global.precision"],
                                                  self.cfg.window, self.cfg.stride)

    def _global_channels(self) -> torch.Tensor:
        """Indices of the concatenated global-tap channels that the global detector uses."""
        keep, offset = [], 0
        for k in self.cfg.global_taps:
            names = self.backbone.feature_names(k)
            if self.cfg.global_ignore and names is None:
                raise ValueError(f"{type(self.backbone).__name__} has no named features; "
                                 "global_ignore must be empty")
            unknown = set(self.cfg.global_ignore) - set(names or ())
            if unknown:
                raise ValueError(f"global_ignore names unknown features {sorted(unknown)}; "
                                 f"tap {k} has {names}")
            dim = self.backbone.tap_dim(k)
            keep += [offset + i for i in range(dim)
                     if not names or names[i] not in self.cfg.global_ignore]
            offset += dim
        return torch.tensor(keep, dtype=torch.long)

    def _features(self, taps: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        local = torch.cat([taps[k][:, 1:] for k in self.cfg.local_taps], dim=-1)
        glob = None
        if self.cfg.use_global:
            tokens = torch.cat([taps[k] for k in self.cfg.global_taps], dim=-1)
            glob = self.backbone.patch_tokens_as_grid(tokens[..., self.global_channels])
        return local, glob

    def score_taps(self, taps: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores and patch-grid maps from backbone taps (lets callers cache features)."""
        if self.local is None:
            raise RuntimeError("the memory head has no memory yet: enroll K normal images first")
        local, glob = self._features(taps)
        patch = self.local(local) / self.local_reference
        score = patch.amax(dim=1)
        if self.glob is not None:
            score = torch.maximum(score, 1.0 + torch.log(self.glob(glob).clamp(min=1e-6)))
        rows, cols = self.backbone.grid
        return score, patch.reshape(-1, rows, cols)

    def forward_with_features(self, images: torch.Tensor):
        """Scores, maps (bilinear to the input size), and the detectors' input features
        (``local (B, N, C)``, ``global (B, C', rows, cols)``) that enrollment fits."""
        taps = self.backbone.forward_taps(images, self.taps)
        score, grid_map = self.score_taps(taps)
        up = F.interpolate(grid_map.unsqueeze(1), size=self.backbone.input_size, mode="bilinear",
                           align_corners=False)
        local, glob = self._features(taps)
        features = {"local": local} | ({"global": glob} if glob is not None else {})
        return score, up.squeeze(1), features
