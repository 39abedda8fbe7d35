"""Few-shot memory against brute force; calibration hits the requested false-alarm rate."""

import numpy as np
import pytest
import torch

from edge_inspect.runtime.calibration import gumbel_threshold
from edge_inspect.trainer.calibration import calibrate_detectors, calibrate_f1, calibrate_false_alarm_rate
from edge_inspect.trainer.memory import ImageShift, PatchMemory, WindowGaussian


@pytest.mark.parametrize("metric", ["cosine", "standardized"])
def test_memory_equals_brute_force_nearest_neighbour(metric):
    g = torch.Generator().manual_seed(0)
    shots = torch.randn(3, 50, 16, generator=g) * torch.linspace(0.1, 5, 16) + 2
    query = torch.randn(2, 40, 16, generator=g) * 3
    mem = PatchMemory(shots, metric=metric, chunk=7)  # small chunks exercise the loop
    got = mem(query)
    bank = shots.reshape(-1, 16)
    want = torch.empty(2, 40)
    for b in range(2):
        for i in range(40):
            q = query[b, i]
            if metric == "cosine":
                d = [(1 - torch.dot(q / q.norm(), m / m.norm())) / 2 for m in bank]
            else:
                sd = bank.std(0)
                d = [((q - m) / sd).norm() for m in bank]
            want[b, i] = min(d)
    assert torch.allclose(got, want, atol=1e-5)
    # shots are in memory (matmul-based distances are exact to ~1e-3 near zero)
    assert torch.allclose(mem(shots[:1]), torch.zeros(1, 50), atol=5e-3)


def test_fold_reference_excludes_the_scored_half():
    shots = torch.randn(1, 64, 4, generator=torch.Generator().manual_seed(1))
    ref = PatchMemory(shots, "standardized").fold_reference((8, 8))
    assert ref > 0.1  # a half scored against itself would give 0


def test_window_gaussian_scores_shifted_statistics():
    g = torch.Generator().manual_seed(2)
    shots = torch.randn(4, 3, 16, 16, generator=g)
    model = WindowGaussian(shots, window=4, stride=2)
    normal = model(torch.randn(20, 3, 16, 16, generator=g))
    shifted = model(torch.randn(20, 3, 16, 16, generator=g) + 0.5)
    assert 0.5 < normal.mean() < 2.5  # about 1 for normal data
    assert (shifted.min() > normal.max())
    with pytest.raises(ValueError, match="cannot estimate"):
        WindowGaussian(torch.randn(1, 40, 8, 8), window=8)


@pytest.mark.parametrize("target", [0.01, 0.05, 0.2])
def test_calibration_gives_requested_false_alarm_rate_on_held_out_normals(target):
    rng = np.random.default_rng(3)
    calib = rng.gamma(2.0, size=4000)
    held_out = rng.gamma(2.0, size=20000)
    cal = calibrate_false_alarm_rate(calib, target)
    far = cal.is_anomalous(held_out).mean()
    tol = 4 * np.sqrt(target * (1 - target) / len(held_out)) + 4 * np.sqrt(target / len(calib))
    assert abs(far - target) <= tol, (far, target)
    assert cal.false_alarm_rate_on_calibration <= target
    with pytest.raises(ValueError, match="at least 99 held-out normal"):
        calibrate_false_alarm_rate(calib[:50], 0.01)
    calibrate_false_alarm_rate(calib[:99], 0.01)  # rank 99 of 99: the largest


@pytest.mark.parametrize(("n", "target"), [(400, 0.003), (100, 0.01), (40, 0.05)])
def test_conformal_threshold_keeps_the_expected_false_alarm_rate_at_or_below_target(n, target):
    # Uniform scores: the threshold t's true false-alarm rate is 1 - t. Averaged over many
    # calibration draws it must not exceed the target (the old rank ceil(n (1 - target))
    # gave 2 / 401 = 0.5 % for 0.3 % from 400 normals).
    rng = np.random.default_rng(7)
    rates = [1 - calibrate_false_alarm_rate(rng.random(n), target).threshold for _ in range(4000)]
    mean = float(np.mean(rates))
    assert mean <= target + 3 * np.std(rates) / np.sqrt(len(rates)), (mean, target)
    assert mean >= 0.5 * target  # and not needlessly conservative


def test_f1_calibration_flags_what_f1_max_counts():
    labels = np.array([0, 0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9, 0.85, 0.7])
    cal = calibrate_f1(labels, scores)
    pred = cal.is_anomalous(scores)
    tp = (pred & (labels == 1)).sum()
    f1 = 2 * tp / (pred.sum() + labels.sum())
    assert f1 == pytest.approx(cal.f1)
    assert cal.n_anomalous == 3 and cal.method == "f1_max"


def test_image_shift_scores_a_shift_of_the_image_mean():
    g = torch.Generator().manual_seed(4)
    reference = torch.randn(60, 3, 8, 8, generator=g)
    model = ImageShift(ImageShift.image_means(reference))
    normal = model(torch.randn(50, 3, 8, 8, generator=g))
    shifted = model(torch.randn(50, 3, 8, 8, generator=g) + 0.5)  # 4 normal sd of a mean of 64
    assert 0.5 < float(normal.mean()) < 2.0  # chi-square / C: about 1 for normal images
    assert shifted.min() > normal.max()
    with pytest.raises(ValueError, match="4 reference normal images cannot estimate a 3-d"):
        ImageShift(torch.randn(4, 3))


def test_detector_thresholds_split_the_false_alarm_budget():
    rng = np.random.default_rng(5)
    calib = np.c_[rng.gamma(2.0, size=20000), rng.normal(5, 1, size=20000)]
    held_out = np.c_[rng.gamma(2.0, size=40000), rng.normal(5, 1, size=40000)]
    cal = calibrate_detectors(calib, ("local", "global"), (0.7, 0.3), 0.02)
    assert cal.threshold == 1.0 and cal.method == "per_detector_false_alarm_rate"
    t = np.array([cal.detectors[k]["threshold"] for k in ("local", "global")])
    for j, (name, rate) in enumerate((("local", 0.014), ("global", 0.006))):
        assert cal.detectors[name]["target_false_alarm_rate"] == pytest.approx(rate)
        assert abs((held_out[:, j] > t[j]).mean() - rate) < 0.004, name  # 4 sd
    fused = (held_out / t).max(axis=1) > cal.threshold
    assert fused.mean() == pytest.approx(((held_out > t).any(axis=1)).mean())  # either detector
    assert 0.015 < fused.mean() <= 0.02 + 0.005  # at most the sum of the shares (+ 4 sd)
    with pytest.raises(ValueError, match="give at least 166 held-out normal images"):
        calibrate_detectors(calib[:100], ("local", "global"), (0.7, 0.3), 0.02)
    with pytest.raises(ValueError, match="summing to 1"):
        calibrate_detectors(calib, ("local", "global"), (0.7, 0.7), 0.02)


def test_gumbel_tail_holds_the_rate_with_less_spread_than_the_order_statistic():
    """The image score of a memory is a maximum over patches: Gumbel-like. A threshold at a
    few per mille from a few hundred normals swings less when the tail is fitted to all of
    them than when it is their 2nd-largest value."""
    rng = np.random.default_rng(6)
    target, n = 0.007, 400
    truth = -np.log(-np.log1p(-target))  # the standard Gumbel's 1 - target quantile
    conformal, gumbel = [], []
    for _ in range(300):
        x = rng.gumbel(size=n)
        conformal.append(calibrate_false_alarm_rate(x, target).threshold)
        gumbel.append(gumbel_threshold(x, target))
    conformal, gumbel = np.array(conformal), np.array(gumbel)
    # the realized false-alarm rate of each threshold on the true distribution
    rate = lambda t: 1 - np.exp(-np.exp(-t))  # noqa: E731
    assert abs(np.median(rate(gumbel)) - target) < 0.0015
    assert np.std(gumbel - truth) < 0.6 * np.std(conformal - truth)
    with pytest.raises(ValueError, match="at least 30 normal"):
        gumbel_threshold(np.arange(10.0), target)
    cal = calibrate_detectors(np.c_[rng.gumbel(size=n), rng.gumbel(size=n)], ("a", "b"),
                              (0.7, 0.3), 0.01, ("gumbel", "conformal"))
    assert cal.detectors["a"]["tail"] == "gumbel" and cal.detectors["b"]["tail"] == "conformal"


def test_border_scale_evens_out_a_hotter_outer_ring_in_torch_and_numpy():
    from edge_inspect.runtime.enrollment import border_scale as border_scale_np
    from edge_inspect.trainer.heads.memory.model import border_rings, border_scale

    grid = (9, 7)
    ring = border_rings(grid)
    assert ring.reshape(grid)[4].tolist() == [0, 1, 2, 3, 2, 1, 0]
    rng = np.random.default_rng(5)
    patch = rng.gamma(4.0, size=(300, 63))
    patch[:, ring.numpy() == 0] *= 1.3  # the edge patches of normal images run hotter
    scale = border_scale(torch.tensor(patch), grid, 1, 0.999)
    assert scale[ring == 0].unique().numel() == 1 and bool((scale[ring > 0] == 1).all())
    assert 1.15 < float(scale[ring == 0][0]) < 1.45
    evened = patch / scale.numpy()
    edge, inner = evened[:, ring.numpy() == 0], evened[:, ring.numpy() > 0]
    assert abs(np.quantile(edge, 0.999) / np.quantile(inner, 0.999) - 1) < 1e-6
    np.testing.assert_allclose(border_scale_np(patch, grid, 1, 0.999), scale.numpy(), rtol=1e-6)
    two = border_scale(torch.tensor(patch), grid, 2, 0.999)
    assert bool((two[ring >= 2] == 1).all()) and float(two[ring == 1][0]) != 1.0


def test_border_scale_stays_finite_when_reference_patches_score_zero():
    # reference images identical to the shots (a static scene) score 0 everywhere: a
    # quantile ratio would be 0 / 0 and turn every image score into NaN
    from edge_inspect.runtime.enrollment import border_scale as border_scale_np
    from edge_inspect.trainer.heads.memory.model import border_rings, border_scale

    grid = (7, 7)
    zeros = np.zeros((5, 49))
    assert bool((border_scale(torch.tensor(zeros), grid, 1, 0.999) == 1).all())
    assert (border_scale_np(zeros, grid, 1, 0.999) == 1).all()
    edge_zero = np.random.default_rng(0).gamma(3.0, size=(5, 49))
    edge_zero[:, border_rings(grid).numpy() == 0] = 0.0  # an edge that never differs
    assert bool((border_scale(torch.tensor(edge_zero), grid, 1, 0.999) == 1).all())
    assert (border_scale_np(edge_zero, grid, 1, 0.999) == 1).all()
