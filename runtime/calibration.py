"""Decision thresholds from normal images only (the runtime recalibrates after enrollment).

The threshold that flags a target fraction of held-out normal images (the false-alarm
rate an operator can live with). With ``n`` normals the smallest reachable rate is about
``1 / n``; asking for less is an error, not a silent threshold above every normal. The
F1-optimal threshold for labelled defects is in :mod:`trainer.calibration`.

A head whose score is the maximum of several detectors (the memory head: local and global)
is calibrated per detector: each gets a share of the false-alarm budget and its own
threshold, the score is ``max_d(detector_d / threshold_d)`` and the decision threshold 1.
By the union bound the fused false-alarm rate is at most the sum of the shares, whatever
the detectors' correlation; and a detector with a heavy normal tail cannot raise the
threshold of the other one (:func:`calibrate_detectors`).

A detector's threshold is either the conformal order statistic above (distribution-free,
but at a rate of a few per mille it is the 2nd or 3rd largest of a few hundred normals, so
it swings from draw to draw) or, with ``tail: gumbel``, the quantile of a Gumbel
distribution fitted to all calibration scores by moments. The Gumbel is the limit law of a
maximum of many similar terms, which is what a memory's image score (the largest patch
distance of an image) is; fitting it uses every normal, not the few in the tail. On the
textile images it cut the spread of the local detector's misses over calibration draws by
more than half at the same mean false-alarm rate (the issue 13 note names the commands).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

TAILS = ("conformal", "gumbel")
GUMBEL_MIN_NORMALS = 30
EULER_GAMMA = 0.5772156649015329


@dataclass
class Calibration:
    """A threshold and how it was obtained (written into checkpoints and manifests)."""

    threshold: float
    method: str  # "normal_false_alarm_rate" or "f1_max"
    target_false_alarm_rate: float | None
    false_alarm_rate_on_calibration: float
    n_normal: int
    n_anomalous: int = 0
    f1: float | None = None
    # per-detector calibration: {name: {"threshold", "tail", "target_false_alarm_rate",
    # "false_alarm_rate_on_calibration"}}; the score is max(detector / threshold)
    detectors: dict | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def is_anomalous(self, scores: np.ndarray) -> np.ndarray:
        """Decision rule: ``score > threshold``."""
        return np.asarray(scores) > self.threshold


def calibrate_false_alarm_rate(normal_scores: np.ndarray, target: float = 0.01) -> Calibration:
    """Threshold so that a fraction ``target`` of normal images scores above it.

    The threshold is the ``ceil((n + 1) * (1 - target))``-th smallest of the ``n`` normal
    scores: a new normal image from the same distribution is equally likely to take any of
    the ``n + 1`` ranks, so it exceeds the threshold with probability at most ``target``
    (split-conformal quantile, exchangeable scores). The rank ``ceil(n * (1 - target))``
    used before allowed up to ``target + 1 / (n + 1)``: twice the target for 0.3 % from 400
    normals. Needs ``n >= (1 - target) / target`` normals.
    """
    scores = np.sort(np.asarray(normal_scores, dtype=np.float64).ravel())
    n = scores.size
    if not 0 < target < 1:
        raise ValueError(f"target false-alarm rate must be in (0, 1), got {target}")
    if n == 0 or not np.isfinite(scores).all():
        raise ValueError("calibration needs finite scores of at least one normal image")
    k = _conformal_rank(n, target)  # 1-based rank of the threshold
    if k > n:
        raise ValueError(f"{n} normal images cannot calibrate a false-alarm rate of {target}: "
                         f"give at least {conformal_normals(target)} held-out normal images")
    threshold = float(scores[k - 1])
    return Calibration(threshold, "normal_false_alarm_rate", target,
                       float((scores > threshold).mean()), n)


def _conformal_rank(n: int, target: float) -> int:
    # the small slack keeps float error in (n + 1) * (1 - target) from adding a rank
    return math.ceil((n + 1) * (1 - target) - 1e-9)


def conformal_normals(target: float) -> int:
    """The fewest normals whose conformal threshold at ``target`` exists (rank <= n)."""
    n = max(1, math.floor((1 - target) / target) - 1)
    while _conformal_rank(n, target) > n:
        n += 1
    return n


def gumbel_threshold(normal_scores: np.ndarray, target: float) -> float:
    """The ``1 - target`` quantile of a Gumbel fitted to ``normal_scores`` by moments
    (scale ``sd * sqrt(6) / pi``, location ``mean - 0.5772 * scale``)."""
    x = np.asarray(normal_scores, dtype=np.float64).ravel()
    if x.size < GUMBEL_MIN_NORMALS or not np.isfinite(x).all():
        raise ValueError(f"a Gumbel tail needs finite scores of at least {GUMBEL_MIN_NORMALS} normal "
                         f"images, got {x.size}")
    scale = float(x.std(ddof=1)) * math.sqrt(6) / math.pi
    location = float(x.mean()) - EULER_GAMMA * scale
    return location - scale * math.log(-math.log1p(-target))


def normals_needed(target: float, shares=(1.0,), tails=None) -> int:
    """Calibration normals that per-detector thresholds at ``target`` split by ``shares``
    need: :func:`conformal_normals` of its rate for a conformal one (about ``1 / rate``),
    :data:`GUMBEL_MIN_NORMALS` for a Gumbel one."""
    tails = tails or ["conformal"] * len(shares)
    return max(conformal_normals(target * s) if t == "conformal" else GUMBEL_MIN_NORMALS
               for s, t in zip(shares, tails, strict=True))


def calibrate_detectors(normal_scores: np.ndarray, names: list[str] | tuple[str, ...],
                        shares: list[float] | tuple[float, ...], target: float = 0.01,
                        tails: list[str] | tuple[str, ...] | None = None) -> Calibration:
    """Per-detector thresholds for ``(n, D)`` unscaled detector scores of normal images.

    Detector ``d`` gets a threshold for a false-alarm rate of ``target * shares[d]``: the
    conformal one of :func:`calibrate_false_alarm_rate`, or with ``tails[d] == "gumbel"``
    :func:`gumbel_threshold`. The returned calibration has threshold 1 for the fused score
    ``max_d(score_d / threshold_d)`` and records each detector's threshold and rates.
    """
    tails = list(tails or ["conformal"] * len(names))
    unknown = set(tails) - set(TAILS)
    if unknown or len(tails) != len(names):
        raise ValueError(f"detector tails {tails} for detectors {list(names)}: one of {TAILS} each")
    scores = np.asarray(normal_scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] != len(names) or len(shares) != len(names):
        raise ValueError(f"detector scores {scores.shape} do not match detectors {list(names)} "
                         f"with shares {list(shares)}")
    if not 0 < target < 1 or abs(sum(shares) - 1) > 1e-9 or min(shares) <= 0:
        raise ValueError(f"target {target} and shares {list(shares)}: need 0 < target < 1 and "
                         "positive shares summing to 1")
    n = scores.shape[0]
    need = normals_needed(target, shares, tails)
    if n < need:
        raise ValueError(f"{n} normal images cannot calibrate a false-alarm rate of {target} split "
                         f"{'/'.join(f'{s:g}' for s in shares)} over detectors {list(names)}: give at "
                         f"least {need} held-out normal images")
    per = {}
    for j, (name, share, tail) in enumerate(zip(names, shares, tails, strict=True)):
        if tail == "gumbel":
            t = gumbel_threshold(scores[:, j], target * share)
        else:
            t = calibrate_false_alarm_rate(scores[:, j], target * share).threshold
        if not t > 0:
            raise ValueError(f"detector {name!r}: threshold {t:.4g} is not positive; "
                             "its scores cannot be scaled by it")
        per[name] = {"threshold": t, "tail": tail, "target_false_alarm_rate": target * share,
                     "false_alarm_rate_on_calibration": float((scores[:, j] > t).mean())}
    thresholds = np.array([per[k]["threshold"] for k in names])
    fused = (scores / thresholds).max(axis=1)
    return Calibration(1.0, "per_detector_false_alarm_rate", target, float((fused > 1).mean()), n,
                       detectors=per)
