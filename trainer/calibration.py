"""Decision thresholds, stored with the checkpoint and the bundle.

* From normal images only (in :mod:`runtime.calibration`, which the runtime uses after
  enrollment): the threshold that flags a target fraction of held-out normal
  images (the false-alarm rate an operator can live with). With ``n`` normals the
  smallest reachable rate is about ``1 / n``; asking for less is an error, not a silent
  threshold above every normal.
* With labelled defects: the F1-optimal threshold (``trainer.metrics.f1_max``).
"""

from __future__ import annotations

import numpy as np

from edge_inspect.runtime.calibration import (
    Calibration,
    calibrate_detectors,
    calibrate_false_alarm_rate,
    normals_needed,
)
from edge_inspect.trainer.metrics import f1_max

__all__ = ["Calibration", "calibrate_detectors", "calibrate_f1", "calibrate_false_alarm_rate",
           "normals_needed"]


def calibrate_f1(labels: np.ndarray, scores: np.ndarray) -> Calibration:
    """F1-optimal threshold; the rule ``score > threshold`` flags what ``>= t_f1`` flagged."""
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    f1, t = f1_max(labels, scores)
    below = scores[scores < t]
    threshold = float(below.max()) if below.size else float(np.nextafter(t, -np.inf))
    normal = scores[labels == 0]
    return Calibration(threshold, "f1_max", None, float((normal > threshold).mean()),
                       int((labels == 0).sum()), int((labels == 1).sum()), f1)
