"""The generated RGB-D task: a dent changes only the geometry, a stain only the colour."""

import numpy as np
import pytest

from edge_inspect.trainer.data.rgbd_synthetic import SyntheticRGBD, render


@pytest.mark.parametrize("kind", ["dent", "stain"])
def test_each_defect_kind_shows_in_one_plane_only(kind):
    good_rgb, good_xyz, good_mask = render(112, np.random.default_rng(5), "good")
    rgb, xyz, mask = render(112, np.random.default_rng(5), kind)  # the same scene, defect added
    assert good_mask.sum() == 0 and 50 < mask.sum() < 1500
    rgb_moved = np.abs(rgb.astype(int) - good_rgb).max(-1) > 0
    xyz_moved = np.abs(xyz - good_xyz).max(-1) > 1e-6
    if kind == "dent":
        assert not rgb_moved.any()  # colour unchanged
        assert xyz_moved[mask == 1].mean() > 0.99
        assert (xyz[..., 2] - good_xyz[..., 2]).max() > 0.005  # millimetres deep, away from the camera
    else:
        assert not xyz_moved.any()  # geometry unchanged
        assert rgb_moved[mask == 1].mean() > 0.9


def test_splits_are_reproducible_and_labelled():
    test = SyntheticRGBD("test", 9, 64, seed=2)
    assert [r.defect for r in test.records] == ["good", "dent", "stain"] * 3
    a, b = test[4], SyntheticRGBD("test", 9, 64, seed=2)[4]
    assert np.array_equal(a.image, b.image) and np.array_equal(a.xyz, b.xyz) and a.label == 1
    assert a.xyz.shape == (64, 64, 3) and a.xyz.dtype == np.float32
    train = SyntheticRGBD("train", 4, 64, seed=2)
    assert train.labels.sum() == 0 and not np.array_equal(train[0].image, test[0].image)
    dropped = SyntheticRGBD("train", 1, 64, dropout=0.05)[0]
    assert 0.02 < (dropped.xyz == 0).all(-1).mean() < 0.08
