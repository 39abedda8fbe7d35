"""Anomaly-detection metrics: image AUROC / AP / F1-max, pixel AUROC / AP, AUPRO.

Plain numpy (and scipy for connected components), so results do not depend on a metrics
library's version. Conventions follow the field's reference code:

* AUROC: area under the ROC curve with ties handled as one threshold (equals the
  Mann-Whitney statistic), as scikit-learn's ``roc_auc_score``.
* AP: step-wise sum ``sum_n (R_n - R_{n-1}) P_n`` over distinct thresholds, as
  scikit-learn's ``average_precision_score`` (no interpolation).
* F1-max: best F1 over all distinct thresholds.
* AUPRO: per-region overlap (PRO) against the false-positive rate on normal pixels,
  regions are 8-connected components of each ground-truth mask; integrated with the
  trapezoid rule up to FPR 0.3 (the curve is interpolated at 0.3) and divided by 0.3 so
  a perfect detector scores 1 (MVTec AD's evaluation protocol). :func:`aupro_afclip` is
  AF-CLIP's official variant (200 thresholds, normalized by the largest FPR kept).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# numpy >= 2 renamed trapz to trapezoid.
_trapezoid = getattr(np, "trapezoid", None) or np.trapz


def _check_binary(y: np.ndarray, name: str) -> np.ndarray:
    y = np.asarray(y).ravel()
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"{name} must hold only 0 and 1")
    return y.astype(bool)


def _curve_counts(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True/false positive counts at each distinct threshold, high to low, and thresholds."""
    y = _check_binary(y_true, "labels")
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tp = np.cumsum(y)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    return tp.astype(np.float64), fp.astype(np.float64), s[last_of_tie]


def _need_both_classes(y_true: np.ndarray, what: str) -> None:
    y = np.asarray(y_true).ravel()
    if y.size == 0 or y.min() == y.max():
        raise ValueError(f"{what} needs both normal and anomalous samples")


def roc_curve(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates from (0, 0) to (1, 1), one point per distinct score."""
    _need_both_classes(y_true, "ROC")
    tp, fp, _ = _curve_counts(y_true, scores)
    return np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]]


def auroc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve."""
    _need_both_classes(y_true, "AUROC")
    tp, fp, _ = _curve_counts(y_true, scores)
    tpr = np.r_[0.0, tp / tp[-1]]
    fpr = np.r_[0.0, fp / fp[-1]]
    return float(_trapezoid(tpr, fpr))


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Average precision (area under the step-wise precision-recall curve)."""
    _need_both_classes(y_true, "AP")
    tp, fp, _ = _curve_counts(y_true, scores)
    precision = tp / (tp + fp)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def f1_max(y_true: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 over thresholds ``score >= t``, and that threshold."""
    _need_both_classes(y_true, "F1-max")
    tp, fp, thresholds = _curve_counts(y_true, scores)
    fn = tp[-1] - tp
    f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1e-12)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def _label_regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    from scipy import ndimage

    return ndimage.label(mask, structure=np.ones((3, 3), dtype=int))


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Normalized area under the PRO curve up to ``fpr_limit``.

    Args:
        masks: ``(N, H, W)`` binary ground truth.
        maps: ``(N, H, W)`` anomaly maps, same shape.
        fpr_limit: integrate PRO over FPR in ``[0, fpr_limit]``; the result is divided by it.

    Exact: every distinct map value is a threshold. A normal pixel above the threshold adds
    ``1 / #normal pixels`` to the FPR; an anomalous pixel adds ``1 / (#regions * region
    size)`` to the mean per-region overlap.
    """
    masks = np.asarray(masks)
    maps = np.asarray(maps, dtype=np.float64)
    if masks.shape != maps.shape or masks.ndim != 3:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} must both be (N, H, W)")
    if not 0 < fpr_limit <= 1:
        raise ValueError("fpr_limit must be in (0, 1]")
    binary = _check_binary(masks, "masks").reshape(masks.shape)
    weights = np.zeros(maps.shape, dtype=np.float64)
    n_regions = 0
    labelled = np.zeros(maps.shape, dtype=np.int64)
    for i in range(len(binary)):
        lab, n = _label_regions(binary[i])
        labelled[i] = np.where(lab > 0, lab + n_regions, 0)
        n_regions += n
    if n_regions == 0:
        raise ValueError("AUPRO needs at least one anomalous region in the masks")
    n_normal = int((~binary).sum())
    if n_normal == 0:
        raise ValueError("AUPRO needs normal pixels")
    region_sizes = np.bincount(labelled.ravel())
    anomalous = labelled > 0
    weights[anomalous] = 1.0 / (n_regions * region_sizes[labelled[anomalous]])
    flat_maps, flat_w, flat_normal = maps.ravel(), weights.ravel(), ~binary.ravel()
    order = np.argsort(-flat_maps, kind="mergesort")
    s = flat_maps[order]
    fpr = np.cumsum(flat_normal[order]) / n_normal
    pro = np.cumsum(flat_w[order])
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    fpr = np.r_[0.0, fpr[last_of_tie]]
    pro = np.r_[0.0, pro[last_of_tie]]
    # Cut at fpr_limit, interpolating the PRO value there.
    keep = fpr <= fpr_limit
    x, y = fpr[keep], pro[keep]
    if x[-1] < fpr_limit and keep.sum() < fpr.size:
        j = int(np.argmax(fpr > fpr_limit))
        t = (fpr_limit - fpr[j - 1]) / (fpr[j] - fpr[j - 1])
        x = np.r_[x, fpr_limit]
        y = np.r_[y, pro[j - 1] + t * (pro[j] - pro[j - 1])]
    return float(_trapezoid(y, x) / fpr_limit)


AUPRO_PROTOCOLS = ("exact", "afclip")


def aupro_afclip(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3,
                 steps: int = 200) -> float:
    """AUPRO as AF-CLIP's official ``utils.py`` computes it (to reproduce its numbers).

    ``steps`` thresholds ``arange(min, max, (max - min) / steps)`` over all maps; a pixel
    is positive when strictly above; PRO is the mean overlap over every 8-connected region
    of every mask; FPR is over all normal pixels; points with FPR < ``fpr_limit`` are kept,
    their FPR divided by the largest kept (not by the limit, and with no point interpolated
    at the limit), and the curve integrated with the trapezoid rule. It differs from the
    exact :func:`aupro` by the threshold grid and the normalization.
    """
    masks = np.asarray(masks)
    maps = np.asarray(maps, dtype=np.float64)
    if masks.shape != maps.shape or masks.ndim != 3:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} must both be (N, H, W)")
    binary = _check_binary(masks, "masks").reshape(masks.shape)
    lo, hi = float(maps.min()), float(maps.max())
    if not hi > lo:
        raise ValueError("AUPRO needs maps that are not constant")
    thresholds = np.arange(lo, hi, (hi - lo) / steps)
    labelled = np.zeros(maps.shape, dtype=np.int64)
    n_regions = 0
    for i in range(len(binary)):
        lab, n = _label_regions(binary[i])
        labelled[i] = np.where(lab > 0, lab + n_regions, 0)
        n_regions += n
    if n_regions == 0 or binary.all():
        raise ValueError("AUPRO needs at least one anomalous region and some normal pixels")
    # How many thresholds each pixel is strictly above: positive at threshold j iff k > j.
    k = np.searchsorted(thresholds, maps, side="left").ravel()
    bins = thresholds.size + 1

    def above(counts: np.ndarray) -> np.ndarray:  # (..., bins) -> pixels above threshold j
        return np.flip(np.cumsum(np.flip(counts, -1), -1), -1)[..., 1:]

    normal = ~binary.ravel()
    fpr = above(np.bincount(k[normal], minlength=bins).astype(np.float64)) / normal.sum()
    lab = labelled.ravel()
    inside = lab > 0
    per_region = np.bincount((lab[inside] - 1) * bins + k[inside],
                             minlength=n_regions * bins).reshape(n_regions, bins)
    areas = np.bincount(lab[inside] - 1, minlength=n_regions).astype(np.float64)
    pro = (above(per_region.astype(np.float64)) / areas[:, None]).mean(0)
    keep = fpr < fpr_limit
    if not keep.any():
        raise ValueError(f"no threshold keeps the FPR below {fpr_limit}")
    x, y = fpr[keep], pro[keep]
    x = x / x.max() if x.max() > 0 else x
    # In threshold order, as sklearn's auc(fpr, pro) integrates the official rows: FPR
    # falls as the threshold rises, so the area is the negated trapezoid (ties at equal
    # FPR keep their threshold order, which decides the PRO at each end of a tie).
    return float(-_trapezoid(y, x))


@dataclass
class DetectionMetrics:
    """Every metric of one evaluation; pixel metrics are None without masks."""

    image_auroc: float
    image_ap: float
    image_f1_max: float
    image_f1_threshold: float
    pixel_auroc: float | None = None
    pixel_ap: float | None = None
    aupro: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)


def evaluate(labels: np.ndarray, image_scores: np.ndarray, masks: np.ndarray | None = None,
             maps: np.ndarray | None = None, aupro_protocol: str = "exact") -> DetectionMetrics:
    """All metrics for one category. Pixel metrics need masks with some anomalous pixels.

    ``aupro_protocol``: ``exact`` (every threshold, integrated to 0.3 and divided by it) or
    ``afclip`` (AF-CLIP's official 200-threshold computation, :func:`aupro_afclip`).
    """
    if aupro_protocol not in AUPRO_PROTOCOLS:
        raise ValueError(f"aupro protocol {aupro_protocol!r} unknown; choose one of {AUPRO_PROTOCOLS}")
    f1, threshold = f1_max(labels, image_scores)
    result = DetectionMetrics(auroc(labels, image_scores), average_precision(labels, image_scores),
                              f1, threshold)
    if masks is not None and maps is not None and np.asarray(masks).any():
        result.pixel_auroc = auroc(masks, maps)
        result.pixel_ap = average_precision(masks, maps)
        result.aupro = aupro(masks, maps) if aupro_protocol == "exact" else aupro_afclip(masks, maps)
    return result
