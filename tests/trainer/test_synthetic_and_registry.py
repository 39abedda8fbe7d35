"""The generated planted-defect task and the dataset entries of run configs."""

import numpy as np
import pytest

from edge_inspect.trainer.data.registry import DatasetSpec
from edge_inspect.trainer.data.synthetic import SyntheticDefects
from edge_inspect.trainer.data.transforms import fit_mask


def test_synthetic_is_deterministic_and_masks_match_labels():
    ds = SyntheticDefects("test", ("stripes", "grain"), per_class=6, size=64, seed=3)
    assert len(ds) == 12 and ds.labels.sum() == 6
    for i in range(len(ds)):
        a, b = ds[i], ds[i]
        assert np.array_equal(a.image, b.image) and a.image.dtype == np.uint8
        assert a.image.shape == (64, 64, 3) and a.mask.shape == (64, 64)
        assert bool(a.mask.any()) == bool(a.label)
    train = SyntheticDefects("train", ("stripes",), per_class=4, size=64, seed=3)
    assert train.labels.sum() == 0
    assert not np.array_equal(train[0].image, ds[0].image)  # splits draw different images
    with pytest.raises(ValueError, match="unknown"):
        SyntheticDefects("test", ("marble",))


def test_dataset_entries():
    spec = DatasetSpec.from_dict({"name": "s", "kind": "synthetic", "classes": ["weave"],
                                  "per_class": 4}, "cfg")
    assert spec.has_train_split and len(spec.open("train")) == 4
    with pytest.raises(ValueError, match="needs a 'root'"):
        DatasetSpec.from_dict({"name": "m", "kind": "mvtec"}, "cfg")
    with pytest.raises(ValueError, match="kind 'coco' unknown"):
        DatasetSpec.from_dict({"name": "c", "kind": "coco"}, "cfg")
    with pytest.raises(ValueError, match="lacks 'name'"):
        DatasetSpec.from_dict({"kind": "textile"}, "cfg")


def test_fit_mask_resize_and_crop():
    mask = np.zeros((100, 100), np.uint8)
    mask[10:30, 40:60] = 1
    small = fit_mask(mask, (50, 50), "resize")
    assert small.shape == (50, 50) and set(np.unique(small)) == {0, 1}
    assert abs(int(small.sum()) - 100) <= 12  # 20x20 px -> about 10x10
    crop = fit_mask(mask, (60, 60), "center_crop")
    assert np.array_equal(crop, mask[20:80, 20:80])
