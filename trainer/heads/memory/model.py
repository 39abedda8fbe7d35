"""Few-shot memory head: K normal images for the patch memory, any backbone.

Two detectors, each scaled by its own threshold and fused by their maximum:

* local -- a :class:`~trainer.memory.PatchMemory` over the patch tokens of ``local_taps``;
  a patch's score is its nearest-neighbour distance, divided by the memory's fold
  reference (the typical image maximum of a normal image, estimated from the shots), so a
  normal image's maximum is about 1; the detector score is that maximum;
* global -- texture statistics of ``global_taps``, about 1 for normal images and growing
  with a shift, entering as ``1 + log(statistic)``:

  - ``global_detector: shift`` (default) -- :class:`~trainer.memory.ImageShift`, the
    Mahalanobis distance of the image-mean feature from a Gaussian fitted on
    ``shift_reference`` held-out normal images (taken first from the calibration normals);
  - ``global_detector: window`` -- :class:`~trainer.memory.WindowGaussian`, a Gaussian of
    sliding-window means fitted on the K shots alone (no other image needed, but it missed
    up to half of the textile global defects at 1 % false alarms).

Image score = ``max_d(detector_d / threshold_d)``; the per-detector thresholds come from
calibration normals, each given a share of the false-alarm budget (``local_share`` to the
local detector), so the fused decision is ``score > 1`` and its false-alarm rate is at most
the sum of the shares. The local threshold is by default the quantile of a Gumbel fitted
to the calibration scores (``local_tail: gumbel``; the image maximum of many patch
distances is extreme-value distributed), the global one the conformal order statistic.
Until calibrated the thresholds are 1 (each detector is about 1 on normal images). Why
per-detector thresholds: with one threshold on the fused score the detector with the
heavier normal tail sets it and the other detector's misses swing with the draw
(``benchmarks/textile_operating_point.py``).

The map is the local patch scores on the grid, upsampled bilinearly to the input size.
``global_ignore`` drops named channels from the global detector: for the texture backbone,
the mean intensity, because brightness legitimately varies between good images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edge_inspect.runtime.calibration import TAILS
from edge_inspect.trainer.backbones.base import Backbone
from edge_inspect.trainer.heads.base import AnomalyHead
from edge_inspect.trainer.memory import ImageShift, PatchMemory, WindowGaussian


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
    global_detector: str = "shift"
    shift_reference: int = 100
    local_share: float = 0.7
    local_tail: str = "gumbel"

    GLOBAL_DETECTORS = ("shift", "window")

    def __post_init__(self) -> None:
        if self.global_detector not in self.GLOBAL_DETECTORS:
            raise ValueError(f"head.global_detector {self.global_detector!r} unknown; choose one "
                             f"of {self.GLOBAL_DETECTORS}")
        if self.local_tail not in TAILS:
            raise ValueError(f"head.local_tail {self.local_tail!r} unknown; choose one of {TAILS}")
        if self.use_global and not 0 < self.local_share < 1:
            raise ValueError(f"head.local_share must be in (0, 1), got {self.local_share}")


# The texture backbone's defaults, chosen on the textile images (benchmarks/textile_fewshot.py).
TEXTURE_MEMORY = MemoryHeadConfig(global_ignore=("mean",))


class MemoryHead(AnomalyHead):
    """Backbone + few-shot memory (method ``memory``); nothing to train, enroll K shots
    (and, for the shift detector, fit its reference on held-out normals).

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
        if self.reference_normals and cfg.shift_reference <= self.global_channels.numel() + 1:
            raise ValueError(f"head.shift_reference = {cfg.shift_reference} normal images cannot "
                             f"estimate the {self.global_channels.numel()}-d covariance of the "
                             f"shift detector; set it above {self.global_channels.numel() + 1}")
        self.detectors = ("local", "global") if cfg.use_global else ("local",)
        self.detector_shares = ((cfg.local_share, 1.0 - cfg.local_share) if cfg.use_global
                                else (1.0,))
        self.detector_tails = (cfg.local_tail, "conformal")[:len(self.detectors)]
        self.local: PatchMemory | None = None
        self.glob: WindowGaussian | ImageShift | None = None
        # a buffer, so .to(device) moves a loaded memory's thresholds with the model
        self.register_buffer("detector_threshold", torch.ones(len(self.detectors)), persistent=False)
        if shot_taps is not None:
            self.enroll_taps(shot_taps)

    @property
    def reference_normals(self) -> int:
        """Held-out normal images the shift detector's reference needs (0: none)."""
        shift = self.cfg.use_global and self.cfg.global_detector == "shift"
        return self.cfg.shift_reference if shift else 0

    @classmethod
    def fit(cls, backbone: Backbone, cfg: MemoryHeadConfig, shots: torch.Tensor,
            reference: torch.Tensor | None = None) -> MemoryHead:
        """Build the memory from K normal images ``(K, 3, H, W)`` (normalized input), and the
        shift reference from other normal images when the config uses it."""
        head = cls(backbone, cfg)
        head.enroll(shots)
        if head.reference_normals:
            if reference is None:
                raise ValueError("the shift detector needs reference normal images "
                                 "(or head.global_detector: window)")
            head.fit_reference([reference])
        return head

    def enroll(self, shots: torch.Tensor) -> None:
        with torch.no_grad():
            self.enroll_taps(self.backbone.forward_taps(shots, self.taps))

    def enroll_taps(self, shot_taps: dict[int, torch.Tensor]) -> None:
        """Build the patch memory (and the window Gaussian) from the shots' backbone taps;
        the shift reference stays unset until :meth:`fit_reference`, thresholds reset to 1."""
        missing = set(self.taps) - set(shot_taps)
        if missing:
            raise ValueError(f"shot features lack taps {sorted(missing)}")
        with torch.no_grad():
            local, glob = self._features(shot_taps)
            self.local = PatchMemory(local, self.cfg.metric)
            self.local_reference = self.local.fold_reference(self.backbone.grid)
            self.glob = None
            if self.cfg.use_global and self.cfg.global_detector == "window":
                self.glob = WindowGaussian(glob, self.cfg.window, self.cfg.stride)
            self.detector_threshold = torch.ones(len(self.detectors), device=local.device)

    @torch.no_grad()
    def fit_reference(self, batches) -> None:
        """Fit the shift detector on held-out normal images (an iterable of image batches)."""
        if not self.reference_normals:
            return
        means = []
        for images in batches:
            taps = self.backbone.forward_taps(images, self.taps)
            means.append(ImageShift.image_means(self._features(taps)[1]))
        self.glob = ImageShift(torch.cat(means))

    @torch.no_grad()
    def detector_scores(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, len(detectors))`` unscaled detector scores (what calibration thresholds)."""
        return self._detectors(*self._features(self.backbone.forward_taps(images, self.taps)))[0]

    def set_detector_thresholds(self, thresholds: torch.Tensor) -> None:
        """Per-detector thresholds from calibration: the image score becomes
        ``max_d(detector_d / threshold_d)``, so 1 is the decision threshold."""
        t = torch.as_tensor(thresholds, dtype=torch.float32).to(self.local_reference.device)
        if t.shape != (len(self.detectors),) or not bool((t > 0).all()):
            raise ValueError(f"detector thresholds must be {len(self.detectors)} positive numbers, "
                             f"got {t.tolist()}")
        self.detector_threshold = t

    def clear_memory(self) -> None:
        self.local, self.glob = None, None

    def memory_state(self) -> dict[str, torch.Tensor]:
        if self.local is None:
            return {}
        state = {f"local.{k}": v for k, v in self.local.state_dict().items()}
        state["local_reference"] = self.local_reference
        if self.glob is not None:
            state |= {f"global.{k}": v for k, v in self.glob.state_dict().items()}
        state["detector_threshold"] = self.detector_threshold
        return state

    def load_memory_state(self, state: dict[str, torch.Tensor]) -> None:
        """Use stored memory tensors as they are (an exported graph binds its inputs here)."""
        if not state:
            self.clear_memory()
            return
        want = {"local.bank", "local.mean", "local.std", "local_reference", "detector_threshold"}
        if self.cfg.use_global:
            want |= {"global.mean", "global.precision"}
        if set(state) != want:
            raise ValueError(f"memory head state needs {sorted(want)}, got {sorted(state)}; a "
                             "memory enrolled by an older edge-inspect must be enrolled again "
                             "(edge-inspect eval)")
        self.local = PatchMemory.from_state(state["local.bank"], state["local.mean"],
                                            state["local.std"], self.cfg.metric)
        self.local_reference = state["local_reference"]
        self.detector_threshold = state["detector_threshold"]
        if self.cfg.use_global and self.cfg.global_detector == "window":
            self.glob = WindowGaussian.from_state(state["global.mean"], state["global.precision"],
                                                  self.cfg.window, self.cfg.stride)
        elif self.cfg.use_global:
            self.glob = ImageShift.from_state(state["global.mean"], state["global.precision"])

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

    def _detectors(self, local: torch.Tensor,
                   glob: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled detector scores ``(B, D)`` and local patch scores ``(B, N)``."""
        if self.local is None:
            raise RuntimeError("the memory head has no memory yet: enroll K normal images first")
        if self.cfg.use_global and self.glob is None:
            raise RuntimeError(f"the shift detector has no reference yet: fit_reference with "
                               f"{self.cfg.shift_reference} held-out normal images")
        patch = self.local(local) / self.local_reference
        scores = [patch.amax(dim=1)]
        if self.glob is not None:
            scores.append(1.0 + torch.log(self.glob(glob).clamp(min=1e-6)))
        return torch.stack(scores, dim=1), patch

    def _fuse(self, detectors: torch.Tensor) -> torch.Tensor:
        """The image score: each detector over its threshold, the largest of them."""
        return (detectors / self.detector_threshold).amax(dim=1)

    def score_taps(self, taps: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores and patch-grid maps from backbone taps (lets callers cache features)."""
        detectors, patch = self._detectors(*self._features(taps))
        rows, cols = self.backbone.grid
        return self._fuse(detectors), patch.reshape(-1, rows, cols)

    def forward_with_features(self, images: torch.Tensor):
        """Scores, maps (bilinear to the input size), and features: what enrollment fits
        (``local (B, N, C)``, ``global (B, C', rows, cols)``) and what calibration
        thresholds (``detectors (B, D)``, unscaled)."""
        local, glob = self._features(self.backbone.forward_taps(images, self.taps))
        detectors, patch = self._detectors(local, glob)
        score = self._fuse(detectors)
        rows, cols = self.backbone.grid
        up = F.interpolate(patch.reshape(-1, 1, rows, cols), size=self.backbone.input_size,
                           mode="bilinear", align_corners=False)
        features = {"local": local, "detectors": detectors}
        if glob is not None:
            features["global"] = glob
        return score, up.squeeze(1), features
