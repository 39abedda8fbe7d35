"""CMAD: cross-modal anomaly detection with visual prototypes (CVPR 2025; seeds/CMAD.txt):
the model. Training (Eq. 3-5, prototype initialisation) is in ``train.py``, the
registration in ``spec.py``.

Written from the paper's equations and checked against the official code (Kerio99/CMAD,
earlier commits; research/official_code.md section 4). Defaults are the code's values,
except where the code's choice cannot stream (harmonization per test batch).

* Features: the global embedding ``f_g`` is CLIP's image embedding (``ln_post(CLS) @
  proj``). Local features of tap ``t`` live in the **width space** as the code's (1280-d
  for its ViT-H/14): ``local_space: width`` (raw tokens, default), ``width_ln`` (after
  ``ln_post``; whether the code applied it cannot be told from the release) or ``joint``
  (``ln_post`` + ``proj``, the embedding space, our earlier reading of the paper).
* Transferable Visual Prototypes (Eq. 1): per auxiliary dataset ``m`` a global pair
  ``(p_g^n, p_g^a)`` and a local pair ``(p_l^n, p_l^a)``, the local pair shared by all taps.
  Initialised N(0, 0.02^2) as the code (``prototype_init: class_mean`` starts them at the
  class means of the dataset's first batches instead).
* Anomaly score (Eq. 2): ``S(f, p) = softmax(<p^n, f> / tau, <p^a, f> / tau)[abnormal]``,
  cosine similarities, tau = 0.07.
* Training (Eq. 3-5) in ``train.py``: 2-class CE of the global logits + per tap focal
  (gamma 2) + dice(abnormal, G) + dice(normal, 1 - G) on the local map upsampled to the
  input; one prototype set per auxiliary dataset, 1500 Adam steps (lr 1e-3, betas (0.5,
  0.999)) of balanced 8 normal + 8 anomalous batches.
* Prototype Harmonization (Eq. 6-11): ``d_m = max(<p_g,m^n, f_g>, <p_g,m^a, f_g>)``,
  ``w = softmax(d / tau')`` with tau' = 0.04, the same weights for global and local,
  ``s_z = lambda s_g + (1 - lambda) Topk(s_l)`` with lambda = 0.8 and the mean of the 50
  largest pixels of the upsampled local map. ``harmonization: per_image`` (default) uses
  each image's own ``f_g`` as Eq. 7 writes it, so a score depends on that image only;
  ``per_batch`` reproduces the code, which weights with the normalized mean ``f_g`` of the
  whole test batch (16, unshuffled, normals first): a score then depends on its batch
  neighbours, so such a head cannot be exported for streaming.
* Visual Discrepancy Inference (Eq. 12-14): local features of K normal shots per tap in a
  memory, ``q = mean_t (1 - <f, NN(f)>) / 2`` on the patch grid; ``vdi_score: grid_max``
  (default, the code) takes the maximum of the grid, ``topk_map`` the Topk of the
  upsampled map (Eq. 14 read literally); ``s_f = lambda' s_z + (1 - lambda') q_img`` with
  lambda' = 0.5. The code produces no few-shot map; ours is ``lambda' s_l + (1 - lambda') q``.

Ablations (paper Tables 3-4) are config switches: ``components`` = both | global | local;
``aggregation`` = harmonized (PTH) | max (the set with the largest ``d_m``) | mean (equal
weights) | best (evaluate every set alone and report the best; the evaluator runs the
variants) | ``set:<name>`` (one set).

The paper and the code name taps "5, 15, 25"; block 25 exists in the code's ViT-H/14 (32
blocks), so the default is (5, 15, 25) as 1-indexed block outputs. On a 24-block ViT-L,
set ``taps``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edge_inspect.trainer.backbones.clip import ClipModel
from edge_inspect.trainer.heads.base import AnomalyHead, BankMemory
from edge_inspect.trainer.memory import nearest_cosine_distance

COMPONENTS = ("both", "global", "local")
AGGREGATIONS = ("harmonized", "max", "mean", "best")
LOCAL_SPACES = ("width", "width_ln", "joint")
VDI_SCORES = ("grid_max", "topk_map")
HARMONIZATIONS = ("per_image", "per_batch")
PROTOTYPE_INITS = ("normal", "class_mean")


@dataclass
class CmadConfig:
    """CMAD hyperparameters; defaults are the official code's (module docstring)."""

    taps: tuple[int, ...] = (5, 15, 25)
    tau: float = 0.07
    tau_prime: float = 0.04
    lam: float = 0.8
    lam_prime: float = 0.5
    topk: int = 50
    beta: float = 1.0
    focal_gamma: float = 2.0
    components: str = "both"
    aggregation: str = "harmonized"
    local_space: str = "width"
    vdi_score: str = "grid_max"
    harmonization: str = "per_image"
    prototype_init: str = "normal"
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for key, allowed in (("components", COMPONENTS), ("local_space", LOCAL_SPACES),
                             ("vdi_score", VDI_SCORES), ("harmonization", HARMONIZATIONS),
                             ("prototype_init", PROTOTYPE_INITS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"CMAD {key} {getattr(self, key)!r} unknown; choose one of {allowed}")


def prototype_logits(f: torch.Tensor, prototypes: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 2's logits for every set: ``f (..., E)``, ``prototypes (M, 2, E)`` -> ``(..., M, 2)``."""
    cos = F.normalize(f, dim=-1) @ F.normalize(prototypes, dim=-1).reshape(-1, f.shape[-1]).T
    return cos.reshape(*f.shape[:-1], prototypes.shape[0], 2).float() / tau  # fp32 under autocast


def prototype_score(f: torch.Tensor, prototypes: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 2 for every prototype set: ``f (..., E)``, ``prototypes (M, 2, E)`` -> ``(..., M)``."""
    return torch.softmax(prototype_logits(f, prototypes, tau), dim=-1)[..., 1]


def topk_mean(maps: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the ``k`` largest values of each ``(B, ...)`` map."""
    flat = maps.flatten(1)
    return flat.topk(min(k, flat.shape[1]), dim=1).values.mean(1)


class CmadHead(BankMemory, AnomalyHead):
    """CMAD on a frozen CLIP image encoder; one prototype set per auxiliary dataset."""

    method = "cmad"
    memory_name = "CMAD"

    def __init__(self, clip: ClipModel, prototype_sets: list[str], cfg: CmadConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or CmadConfig()
        if not prototype_sets:
            raise ValueError("CMAD needs at least one auxiliary dataset (one prototype set each)")
        self.set_names = list(prototype_sets)
        self.backbone = clip.visual.eval().requires_grad_(False)
        self.backbone.check_layers(tuple(cfg.taps))
        self._aggregation = self._check_aggregation(cfg.aggregation)
        e, m = clip.cfg.embed_dim, len(prototype_sets)
        local_dim = e if cfg.local_space == "joint" else clip.cfg.width
        self.global_prototypes = nn.Parameter(torch.randn(m, 2, e) * cfg.init_std)
        self.local_prototypes = nn.Parameter(torch.randn(m, 2, local_dim) * cfg.init_std)
        self.bank: torch.Tensor | None = None  # (taps, K * N, E) normalized, few-shot only

    def _check_aggregation(self, name: str) -> str:
        if name in AGGREGATIONS:
            return name
        if name.startswith("set:") and name[4:] in self.set_names:
            return name
        raise ValueError(f"aggregation {name!r} unknown; choose one of {AGGREGATIONS} or "
                         f"set:<name> with a name in {self.set_names}")

    def train(self, mode: bool = True) -> CmadHead:
        super().train(mode)
        self.backbone.eval()
        return self

    # -- features ----------------------------------------------------------------------------
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Global embedding ``(B, E)`` and the local patch features ``(B, N, C)`` per tap
        (``C``: the width, or the embedding size for ``local_space: joint``)."""
        last = self.backbone.num_layers
        taps = self.backbone.forward_taps(images, tuple(sorted({*self.cfg.taps, last})))
        f_g = self.backbone.project(taps[last][:, 0])
        return f_g, [self._local(taps[t][:, 1:]) for t in self.cfg.taps]

    def _local(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cfg.local_space == "joint":
            return self.backbone.project(tokens)
        if self.cfg.local_space == "width_ln":
            return self.backbone.ln_post(tokens)
        return tokens

    @property
    def scores_depend_on_batch(self) -> bool:
        """True for the code's per-test-batch harmonization (not streamable)."""
        return self.cfg.harmonization == "per_batch"

    def check_exportable(self) -> None:
        if self.scores_depend_on_batch:
            raise ValueError("CMAD with head.harmonization=per_batch scores an image by its batch "
                             "neighbours; a streaming bundle needs per_image (export with "
                             "--set head.harmonization=per_image)")

    def _upsample(self, patch_scores: torch.Tensor) -> torch.Tensor:
        rows, cols = self.backbone.grid
        x = patch_scores.reshape(-1, 1, rows, cols)
        return F.interpolate(x, size=self.backbone.input_size, mode="bilinear",
                             align_corners=False).squeeze(1)

    # -- harmonization -----------------------------------------------------------------------
    def set_weights(self, f_g: torch.Tensor) -> torch.Tensor:
        """Eq. 7-8 (or the ablation's rule): ``(B, M)`` weights over prototype sets, rows sum to 1."""
        m = len(self.set_names)
        agg = self._aggregation
        if agg == "mean":
            return torch.full((f_g.shape[0], m), 1.0 / m, device=f_g.device)
        if agg.startswith("set:"):
            index = torch.full((f_g.shape[0],), self.set_names.index(agg[4:]), device=f_g.device)
            return F.one_hot(index, m).float()
        d = self.relevance(f_g)
        if agg == "max":
            return F.one_hot(d.argmax(dim=1), m).float()
        if agg == "best":
            raise ValueError("aggregation 'best' is evaluated set by set; the evaluator "
                             "runs the variants (see evaluation_variants)")
        return torch.softmax(d.float() / self.cfg.tau_prime, dim=1)

    def relevance(self, f_g: torch.Tensor) -> torch.Tensor:
        """Eq. 7: ``d_m = max(<p_g,m^n, f_g>, <p_g,m^a, f_g>)`` as ``(B, M)``; with
        per-batch harmonization every row is that of the normalized batch-mean ``f_g``."""
        if self.cfg.harmonization == "per_batch":
            f_g = f_g.mean(0, keepdim=True).expand_as(f_g)
        cos = F.normalize(f_g, dim=-1).unsqueeze(1).unsqueeze(2) * F.normalize(
            self.global_prototypes, dim=-1).unsqueeze(0)
        return cos.sum(-1).amax(-1)

    def zero_shot(self, f_g: torch.Tensor, f_l: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 9-11: ``s_z (B,)`` and the upsampled local map ``(B, H, W)``."""
        w = self.set_weights(f_g)
        s_g = (w * prototype_score(f_g, self.global_prototypes, self.cfg.tau)).sum(1)
        s_l = torch.stack([(w.unsqueeze(1) * prototype_score(f, self.local_prototypes,
                                                             self.cfg.tau)).sum(-1) for f in f_l]).mean(0)
        local_map = self._upsample(s_l)
        if self.cfg.components == "global":
            s_z = s_g
        elif self.cfg.components == "local":
            s_z = topk_mean(local_map, self.cfg.topk)
        else:
            s_z = self.cfg.lam * s_g + (1 - self.cfg.lam) * topk_mean(local_map, self.cfg.topk)
        return s_z, local_map

    def forward_with_features(self, images: torch.Tensor):
        """Scores, maps, and the local features per tap ``features (T, B, N, C)`` that the
        Visual Discrepancy memory stores (normalized)."""
        f_g, f_l = self.features(images)
        s_z, local_map = self.zero_shot(f_g, f_l)
        features = {"features": torch.stack(f_l)}
        if self.bank is None:
            return s_z, local_map, features
        q = torch.stack([nearest_cosine_distance(f, self.bank[i]) for i, f in enumerate(f_l)]).mean(0)
        q_map = self._upsample(q)
        q_img = q.amax(1) if self.cfg.vdi_score == "grid_max" else topk_mean(q_map, self.cfg.topk)
        lp = self.cfg.lam_prime
        return lp * s_z + (1 - lp) * q_img, lp * local_map + (1 - lp) * q_map, features

    # -- evaluation variants (the "Best" ablation) ---------------------------------------------
    def evaluation_variants(self) -> list[str | None]:
        if self._aggregation == "best":
            return [f"set:{name}" for name in self.set_names]
        return [None]

    def set_variant(self, variant: str | None) -> None:
        self._aggregation = self._check_aggregation(variant or self.cfg.aggregation)

    # -- few-shot memory (Visual Discrepancy Inference) ----------------------------------------
    def enroll(self, shots: torch.Tensor) -> None:
        with torch.no_grad():
            _, f_l = self.features(shots)
        self.set_bank(f_l)

    def memory_sets(self) -> int:
        return len(self.cfg.taps)
