"""Few-shot memory head: K normal images for the patch memory, any backbone.

Two detectors, each scaled by its own threshold and fused by their maximum:

* local -- a :class:`~trainer.memory.PatchMemory` over the patch tokens of ``local_taps``;
  a patch's score is its nearest-neighbour distance, divided by the memory's fold
  reference (the typical image maximum of a normal image, estimated from the shots), so a
  normal image's maximum is about 1, and by its border-ring scale (below); the detector
  score is that maximum, or with ``local_top: k`` the mean of the ``k`` largest patch
  scores. A normal image's largest patch score is often one odd patch; a defect raises
  several neighbouring ones, so the top-3 mean lowers the normal tail more than the
  defects' scores. On the textile images (``benchmarks/textile_local_score.py``) it brought
  the worst test false-alarm rate of shot draws 60-79, where it was chosen, from 2.42 % to
  1.21 % at the same 1 % target; on draws 80-99, scored only after the choice, every draw
  met issue 13's targets with it (worst 1.41 % false alarms, 1.6 % local misses; the largest
  patch score met them there too, at a mean of 0.79 % false alarms against 0.46 %). The
  textile config sets 3; the default is 1;
* global -- texture statistics of ``global_taps``, about 1 for normal images and growing
  with a shift, entering as ``1 + log(statistic)``:

  - ``global_detector: shift`` (default) -- :class:`~trainer.memory.ImageShift`, the
    Mahalanobis distance of the image-mean feature from a Gaussian fitted on
    ``shift_reference`` held-out normal images (taken first from the calibration normals);
  - ``global_detector: window`` -- :class:`~trainer.memory.WindowGaussian`, a Gaussian of
    sliding-window means fitted on the K shots alone (no other image needed, but it missed
    up to half of the textile global defects at 1 % false alarms).

Border rings: patches on the outermost ``border_rings`` rings of the grid see the image
edge (padding, cut textures), so their normal distances run higher: on the textile images
a third of the normal images have their largest patch score on the outermost ring (against
8 of 500 local defects), and that ring's 99.9 % quantile is about 1.15x the interior's.
Each border ring's scores are divided by its ``border_quantile`` quantile over the
reference normals' patches, relative to the interior's (interior scale 1), so an edge
patch must be as unusual as an interior one to raise the score. Stored as
``local.position_scale`` (one divisor per patch).

Shot turns: ``shot_turns: 4`` adds each shot turned by 90, 180 and 270 degrees to the patch
memory (``2``: by 180 degrees; ``1``, the default: the shots as they are), the few-shot
augmentation of INP-Former's code. For textures whose orientation carries no meaning (the
textile images) it gives the memory the patch appearances a K = 4 draw lacks: the weakest
held-out draw's local misses fell from 5.2 % to 4.6 %
(``benchmarks/textile_operating_point.py``). Not for objects whose orientation is fixed (a
turned part is a defect there). Flips were tried and change nothing on the texture
backbone (its features are mirror-invariant). The fold reference stays that of the
unturned shots, so the scale of the scores does not depend on the turns.

Image score = ``max_d(detector_d / threshold_d)``; the per-detector thresholds come from
calibration normals, each given a share of the false-alarm budget (``local_share`` to the
local detector), so the fused decision is ``score > 1`` and its false-alarm rate is at most
the sum of the shares. Both thresholds are by default the quantile of a Gumbel fitted to
the calibration scores (``local_tail`` / ``global_tail: gumbel``): the image maximum of
many patch distances is extreme-value distributed, and the global score (a log of a
chi-square-like distance) has a lighter tail than a Gumbel, so its Gumbel threshold is
conservative. The conformal order statistic (``conformal``) needs no model, but at the
global detector's 0.35 % from 400 normals it is the largest calibration score, whose
false-alarm rate swings from draw to draw (Beta(1, 400)). Until calibrated the thresholds
are 1 (each detector is about 1 on normal images). Why per-detector thresholds: with one
threshold on the fused score the detector with the heavier normal tail sets it and the
other detector's misses swing with the draw (``benchmarks/textile_operating_point.py``).

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
    border_rings: int = 1
    border_quantile: float = 0.999
    local_share: float = 0.65
    local_tail: str = "gumbel"
    global_tail: str = "gumbel"
    shot_turns: int = 1
    local_top: int = 1  # the local detector: mean of the k largest patch scores

    GLOBAL_DETECTORS = ("shift", "window")
    SHOT_TURNS = (1, 2, 4)

    def __post_init__(self) -> None:
        if self.global_detector not in self.GLOBAL_DETECTORS:
            raise ValueError(f"head.global_detector {self.global_detector!r} unknown; choose one "
                             f"of {self.GLOBAL_DETECTORS}")
        for key in ("local_tail", "global_tail"):
            if getattr(self, key) not in TAILS:
                raise ValueError(f"head.{key} {getattr(self, key)!r} unknown; choose one of {TAILS}")
        if self.border_rings < 0 or not 0 < self.border_quantile < 1:
            raise ValueError(f"head.border_rings must be >= 0 and head.border_quantile in (0, 1), "
                             f"got {self.border_rings} and {self.border_quantile}")
        if self.shot_turns not in self.SHOT_TURNS:
            raise ValueError(f"head.shot_turns must be one of {self.SHOT_TURNS} (quarter turns of each "
                             f"shot in the memory), got {self.shot_turns}")
        if self.local_top < 1:
            raise ValueError(f"head.local_top must be >= 1 (patch scores averaged into the local "
                             f"detector), got {self.local_top}")
        if self.use_global and not 0 < self.local_share < 1:
            raise ValueError(f"head.local_share must be in (0, 1), got {self.local_share}")


# The texture backbone's defaults, chosen on the textile images (benchmarks/textile_fewshot.py).
TEXTURE_MEMORY = MemoryHeadConfig(global_ignore=("mean",))


class MemoryHead(AnomalyHead):
    """Backbone + few-shot memory (method ``memory``); nothing to train, enroll K shots
    (and fit its reference -- shift detector, border-ring scales -- on held-out normals).

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
        if self._uses_shift and cfg.shift_reference <= self.global_channels.numel() + 1:
            raise ValueError(f"head.shift_reference = {cfg.shift_reference} normal images cannot "
                             f"estimate the {self.global_channels.numel()}-d covariance of the "
                             f"shift detector; set it above {self.global_channels.numel() + 1}")
        self.detectors = ("local", "global") if cfg.use_global else ("local",)
        self.detector_shares = ((cfg.local_share, 1.0 - cfg.local_share) if cfg.use_global
                                else (1.0,))
        self.detector_tails = (cfg.local_tail, cfg.global_tail)[:len(self.detectors)]
        rows, cols = backbone.grid
        if cfg.shot_turns == 4 and (rows != cols or backbone.input_size[0] != backbone.input_size[1]):
            raise ValueError(f"head.shot_turns: 4 turns the shots by 90 degrees, which needs a square "
                             f"input; {tuple(backbone.input_size)} is not: use head.shot_turns: 2 or 1")
        if cfg.local_top > rows * cols:
            raise ValueError(f"head.local_top = {cfg.local_top} exceeds the {rows}x{cols} patch grid")
        if 2 * cfg.border_rings >= min(rows, cols):
            raise ValueError(f"head.border_rings = {cfg.border_rings} leaves no interior in the "
                             f"{rows}x{cols} patch grid; set it below {(min(rows, cols) + 1) // 2}")
        self.local: PatchMemory | None = None
        self.reference_fitted = False
        self.glob: WindowGaussian | ImageShift | None = None
        # a buffer, so .to(device) moves a loaded memory's thresholds with the model
        self.register_buffer("detector_threshold", torch.ones(len(self.detectors)), persistent=False)
        self.register_buffer("position_scale", torch.ones(rows * cols), persistent=False)
        if shot_taps is not None:
            self.enroll_taps(shot_taps)

    @property
    def _uses_shift(self) -> bool:
        return self.cfg.use_global and self.cfg.global_detector == "shift"

    @property
    def reference_normals(self) -> int:
        """Held-out normal images the reference (shift detector, border-ring scales) needs
        (0: none)."""
        return self.cfg.shift_reference if self._uses_shift or self.cfg.border_rings else 0

    @classmethod
    def fit(cls, backbone: Backbone, cfg: MemoryHeadConfig, shots: torch.Tensor,
            reference: torch.Tensor | None = None) -> MemoryHead:
        """Build the memory from K normal images ``(K, 3, H, W)`` (normalized input), and the
        shift reference from other normal images when the config uses it."""
        head = cls(backbone, cfg)
        head.enroll(shots)
        if head.reference_normals:
            if reference is None:
                raise ValueError("the memory head needs reference normal images for its shift "
                                 "detector and border-ring scales (or head.global_detector: "
                                 "window with head.border_rings: 0)")
            head.fit_reference([reference])
        return head

    def enroll(self, shots: torch.Tensor) -> None:
        """Build the memory from K normal images ``(K, 3, H, W)``, with their turns
        (``shot_turns``)."""
        with torch.no_grad():
            turned = quarter_turns(shots, self.cfg.shot_turns)
            self.enroll_taps(self.backbone.forward_taps(turned, self.taps), shots=shots.shape[0])

    def enroll_taps(self, shot_taps: dict[int, torch.Tensor], shots: int | None = None) -> None:
        """Build the patch memory (and the window Gaussian) from the shots' backbone taps
        (with :func:`quarter_turns`, the unturned ``shots`` first: they alone give the fold
        reference and the window Gaussian); the shift reference stays unset until
        :meth:`fit_reference`, border scales and thresholds reset to 1."""
        missing = set(self.taps) - set(shot_taps)
        if missing:
            raise ValueError(f"shot features lack taps {sorted(missing)}")
        with torch.no_grad():
            local, glob = self._features(shot_taps)
            self.local = PatchMemory(local, self.cfg.metric)
            self.local_reference = self.local.fold_reference(self.backbone.grid, shots)
            self.glob = None
            if self.cfg.use_global and self.cfg.global_detector == "window":
                self.glob = WindowGaussian(glob[:shots], self.cfg.window, self.cfg.stride)
            self.detector_threshold = torch.ones(len(self.detectors), device=local.device)
            self.position_scale = torch.ones(local.shape[1], device=local.device)
            self.reference_fitted = False

    @torch.no_grad()
    def fit_reference(self, batches) -> None:
        """Fit the shift detector and the border-ring scales on held-out normal images (an
        iterable of image batches); call after :meth:`enroll`."""
        if not self.reference_normals:
            return
        if self.local is None:
            raise RuntimeError("enroll the shots before fitting the reference")
        means, patches = [], []
        for images in batches:
            local, glob = self._features(self.backbone.forward_taps(images, self.taps))
            patches.append(self.local(local) / self.local_reference)
            if self._uses_shift:
                means.append(ImageShift.image_means(glob))
        if self._uses_shift:
            self.glob = ImageShift(torch.cat(means))
        if self.cfg.border_rings:
            self.position_scale = border_scale(torch.cat(patches), self.backbone.grid,
                                               self.cfg.border_rings, self.cfg.border_quantile)
        self.reference_fitted = True

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
        state["local.position_scale"] = self.position_scale
        if self.glob is not None:
            state |= {f"global.{k}": v for k, v in self.glob.state_dict().items()}
        state["detector_threshold"] = self.detector_threshold
        return state

    def load_memory_state(self, state: dict[str, torch.Tensor]) -> None:
        """Use stored memory tensors as they are (an exported graph binds its inputs here)."""
        if not state:
            self.clear_memory()
            return
        want = {"local.bank", "local.mean", "local.std", "local_reference", "detector_threshold",
                "local.position_scale"}
        if self.cfg.use_global:
            want |= {"global.mean", "global.precision"}
        if set(state) != want:
            raise ValueError(f"memory head state needs {sorted(want)}, got {sorted(state)}; a "
                             "memory enrolled by an older edge-inspect must be enrolled again "
                             "(edge-inspect eval)")
        self.local = PatchMemory.from_state(state["local.bank"], state["local.mean"],
                                            state["local.std"], self.cfg.metric)
        self.local_reference = state["local_reference"]
        self.position_scale = state["local.position_scale"]
        self.reference_fitted = True
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
        if self.reference_normals and not self.reference_fitted:
            raise RuntimeError("the memory head has no reference yet: fit_reference with "
                               f"{self.cfg.shift_reference} held-out normal images")
        patch = self.local(local) / self.local_reference / self.position_scale
        k = self.cfg.local_top
        scores = [patch.amax(dim=1) if k == 1 else patch.topk(k, dim=1).values.mean(dim=1)]
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


def quarter_turns(images: torch.Tensor, turns: int) -> torch.Tensor:
    """``(K, C, H, W)`` -> ``(turns * K, C, H, W)``: the images, then each turned by
    ``360 / turns`` degrees more (``turns`` in 1, 2, 4; the torch-free enrollment turns
    frames the same way, in the same order)."""
    step = 4 // turns
    return torch.cat([images.rot90(t * step, (-2, -1)) for t in range(turns)])


def border_rings(grid: tuple[int, int]) -> torch.Tensor:
    """``(rows * cols,)`` each patch's ring: its distance in patches to the grid's edge."""
    rows, cols = grid
    r, c = torch.arange(rows)[:, None], torch.arange(cols)[None, :]
    return torch.minimum(torch.minimum(r, rows - 1 - r), torch.minimum(c, cols - 1 - c)).flatten()


def border_scale(patch: torch.Tensor, grid: tuple[int, int], rings: int,
                 quantile: float) -> torch.Tensor:
    """``(n, N)`` patch scores of normal images -> ``(N,)`` divisors: for each of the
    outermost ``rings`` rings, its ``quantile`` over the images' patches relative to the
    interior's (float64, linear interpolation, as numpy's default); 1 inside, and 1 for a
    ring whose quantile or the interior's is 0 (reference images that repeat the shots:
    nothing to scale by, and a 0 would make every score NaN or infinite)."""
    ring = border_rings(grid).to(patch.device)
    x = patch.double()
    inner = float(torch.quantile(x[:, ring >= rings].flatten(), quantile))
    scale = torch.ones(ring.numel(), dtype=torch.float64, device=patch.device)
    for k in range(rings):
        edge = float(torch.quantile(x[:, ring == k].flatten(), quantile))
        if edge > 0 and inner > 0:
            scale[ring == k] = edge / inner
    return scale.float()
