"""Metrics against scikit-learn and a hand-computed PRO curve."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from edge_inspect.trainer.metrics import aupro, auroc, average_precision, evaluate, f1_max


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(size=300) + 0.8 * y, 1)  # rounding makes ties
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    p, r, t = precision_recall_curve(y, s)
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0)
    best, thr = f1_max(y, s)
    assert best == pytest.approx(f1.max(), abs=1e-12)
    assert thr == pytest.approx(t[np.argmax(f1[:-1])])


def test_pixel_metrics_match_sklearn():
    rng = np.random.default_rng(3)
    masks = np.zeros((4, 16, 16), np.uint8)
    masks[1, 3:7, 3:9] = 1
    masks[2, 10:14, 2:5] = 1
    maps = rng.random(masks.shape) + 0.7 * masks
    labels = masks.reshape(4, -1).max(1)
    m = evaluate(labels, maps.reshape(4, -1).max(1), masks, maps)
    assert m.pixel_auroc == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert m.pixel_ap == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert 0 < m.aupro < 1


def test_aupro_hand_computed():
    """Two 2-pixel regions and 12 normal pixels; the curve worked out on paper.

    Thresholds 0.9 -> PRO 0.5 (region A covered), 0.85 -> one false positive (FPR 1/12),
    0.8 -> PRO 0.75, 0.1 -> PRO 1, 0.0 -> FPR 1. Area to FPR 0.3:
    0.5 * 1/12 + 1.0 * (0.3 - 1/12) = 0.258333..., normalized by 0.3: 0.861111...
    """
    mask = np.zeros((1, 4, 4), np.uint8)
    mask[0, 0, 0:2] = 1  # region A
    mask[0, 3, 2:4] = 1  # region B
    amap = np.zeros((1, 4, 4))
    amap[0, 0, 0:2] = 0.9
    amap[0, 3, 2], amap[0, 3, 3] = 0.8, 0.1
    amap[0, 1, 1] = 0.85  # one false positive
    assert aupro(mask, amap) == pytest.approx((0.5 / 12 + (0.3 - 1 / 12)) / 0.3, abs=1e-12)


def test_aupro_regions_are_weighted_equally():
    """A small missed region costs as much as a large missed one."""
    mask = np.zeros((1, 10, 10), np.uint8)
    mask[0, 0:5, 0:5] = 1   # 25 px, found
    mask[0, 8, 8] = 1       # 1 px, missed
    amap = mask.astype(float).copy()
    amap[0, 8, 8] = 0.0
    # PRO is 0.5 at FPR 0 and 1.0 only at FPR 1 (all pixels flagged); the straight segment
    # between gives 0.65 at FPR 0.3, so the area is (0.5 + 0.65) / 2 * 0.3, over 0.3: 0.575.
    assert aupro(mask, amap) == pytest.approx(0.575, abs=1e-12)
    assert aupro(mask, mask.astype(float)) == pytest.approx(1.0)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="both normal and anomalous"):
        auroc(np.ones(5), np.arange(5))
    with pytest.raises(ValueError, match="5 labels but 4 scores"):
        auroc(np.array([0, 1, 0, 1, 0]), np.arange(4))
    with pytest.raises(ValueError, match="NaN"):
        auroc(np.array([0, 1]), np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="at least one anomalous region"):
        aupro(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)))


def _afclip_pro_loop(masks: np.ndarray, maps: np.ndarray) -> float:
    """AF-CLIP's utils.py PRO written as its loop: 200 thresholds, regions per image."""
    from scipy import ndimage

    lo, hi = maps.min(), maps.max()
    pros, fprs = [], []
    region_masks = []
    for i, mask in enumerate(masks):
        lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
        region_masks += [(i, lab == r) for r in range(1, n + 1)]
    normal = masks == 0
    for th in np.arange(lo, hi, (hi - lo) / 200):
        binary = maps > th
        pros.append(np.mean([binary[i][r].sum() / r.sum() for i, r in region_masks]))
        fprs.append((binary & normal).sum() / normal.sum())
    pros, fprs = np.array(pros), np.array(fprs)
    keep = fprs < 0.3
    x, y = fprs[keep] / fprs[keep].max(), pros[keep]
    # sklearn.metrics.auc(x, y) on rows in threshold order: x falls, so the area is the
    # trapezoid with direction -1 (ties keep their order).
    dx = np.diff(x)
    assert (dx <= 0).all()
    return float(-np.sum(dx * (y[1:] + y[:-1]) / 2))


@pytest.mark.parametrize("seed", range(3))
def test_aupro_afclip_matches_the_official_loop(seed):
    from edge_inspect.trainer.metrics import aupro_afclip, evaluate

    rng = np.random.default_rng(seed)
    masks = np.zeros((4, 40, 40), np.uint8)
    masks[0, 5:12, 5:15] = 1
    masks[0, 25:30, 20:38] = 1  # two regions in one image
    masks[2, 10:30, 10:14] = 1
    maps = rng.random(masks.shape) + 0.8 * masks * rng.random(masks.shape)
    want = _afclip_pro_loop(masks, maps)
    got = aupro_afclip(masks, maps)
    assert got == pytest.approx(want, abs=1e-12)
    exact = evaluate(np.array([1, 0, 1, 0]), np.array([0.9, 0.1, 0.8, 0.2]), masks, maps).aupro
    official = evaluate(np.array([1, 0, 1, 0]), np.array([0.9, 0.1, 0.8, 0.2]), masks, maps,
                        "afclip").aupro
    assert official == got and abs(official - exact) > 1e-3  # a different protocol, not a copy
