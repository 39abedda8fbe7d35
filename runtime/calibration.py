"""Decision thresholds from normal images only (the runtime recalibrates after enrollment).

The threshold that flags a target fraction of held-out normal images (the false-alarm
rate an operator can live with). With ``n`` normals the smallest reachable rate is about
``1 / n``; asking for less is an error, not a silent threshold above every normal. The
F1-optimal threshold for labelled defects is in :mod:`trainer.calibration`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


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

    def as_dict(self) -> dict:
        return asdict(self)

    def is_anomalous(self, scores: np.ndarray) -> np.ndarray:
        """Decision rule: ``score > threshold``."""
        return np.asarray(scores) > self.threshold


def calibrate_false_alarm_rate(normal_scores: np.ndarray, target: float = 0.01) -> Calibration:
    """Threshold so that a fraction ``target`` of normal images scores above it.

    The threshold is the ``ceil(n * (1 - target))``-th smallest normal score, so at most
    ``floor(n * target)`` calibration normals exceed it; on new normals from the same
    distribution the expected false-alarm rate is then at most about ``target``
    (conformal argument, exchangeable scores).
    """
    scores = np.sort(np.asarray(normal_scores, dtype=np.float64).ravel())
    n = scores.size
    if not 0 < target < 1:
        raise ValueError(f"target false-alarm rate must be in (0, 1), got {target}")
    if n == 0 or not np.isfinite(scores).all():
        raise ValueError("calibration needs finite scores of at least one normal image")
    if n * target < 1:
        raise ValueError(f"{n} normal images cannot calibrate a false-alarm rate of {target}: "
                         f"give at least {math.ceil(1 / target)} held-out normal images")
    k = math.ceil(n * (1 - target))  # 1-based rank of the threshold
    threshold = float(scores[k - 1])
    return Calibration(threshold, "normal_false_alarm_rate", target,
                       float((scores > threshold).mean()), n)
