"""Each dataset layout, built on disk, yields the same Sample type; bad files are named."""

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from edge_inspect.trainer.data import (
    DatasetError,
    FolderDataset,
    MVTec3DAD,
    MVTecAD,
    TextileImages,
    VisA,
)


def write_image(path: Path, size=(20, 16), value=100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((size[1], size[0], 3), value, np.uint8)
    img[:4, :4] = (255, 0, 0)  # RGB red marker: checks the BGR->RGB conversion
    cv2.imwrite(str(path), img[..., ::-1])
    return path


def write_mask(path: Path, size=(20, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[4:8, 5:9] = 255
    cv2.imwrite(str(path), mask)
    return path


def check_sample(s, label, defect, has_mask):
    assert s.image.dtype == np.uint8 and s.image.shape == (16, 20, 3)
    r, _, b = (int(v) for v in s.image[0, 0])
    assert r > b + 100  # red stays red (JPEG blurs it a little)
    assert s.mask.shape == (16, 20) and s.mask.dtype == np.uint8
    assert s.label == label and s.defect == defect
    assert int(s.mask.sum()) == (16 if has_mask else 0)
    assert set(np.unique(s.mask)) <= {0, 1}


@pytest.fixture
def mvtec(tmp_path):
    root = tmp_path / "mvtec"
    write_image(root / "bottle/train/good/000.png")
    write_image(root / "bottle/test/good/000.png")
    write_image(root / "bottle/test/broken/000.png")
    write_mask(root / "bottle/ground_truth/broken/000_mask.png")
    write_image(root / "cable/train/good/000.png")
    write_image(root / "cable/test/good/000.png")
    return root


def test_mvtec(mvtec):
    test = MVTecAD(mvtec, "test")
    assert len(test) == 3 and test.class_names == ["bottle", "cable"]
    bad = [s for s in (test[i] for i in range(3)) if s.label]
    assert len(bad) == 1
    check_sample(bad[0], 1, "broken", True)
    check_sample(MVTecAD(mvtec, "train", "bottle")[0], 0, "good", False)


def test_mvtec_errors(mvtec):
    (mvtec / "bottle/ground_truth/broken/000_mask.png").unlink()
    with pytest.raises(DatasetError, match="missing mask .*000_mask.png"):
        MVTecAD(mvtec, "test", "bottle")
    with pytest.raises(DatasetError, match="missing folder .*nope"):
        MVTecAD(mvtec, "test", "nope")
    with pytest.raises(DatasetError, match="missing folder"):
        MVTecAD(mvtec / "absent")


def test_corrupt_image_and_wrong_mask_size(mvtec):
    (mvtec / "bottle/test/good/000.png").write_bytes(b"\x89PNG broken")
    ds = MVTecAD(mvtec, "test", "bottle")
    with pytest.raises(DatasetError, match=r"cannot read image .*good/000.png: unreadable"):
        [ds[i] for i in range(len(ds))]
    write_mask(mvtec / "bottle/ground_truth/broken/000_mask.png", size=(10, 10))
    bad = [i for i, r in enumerate(ds.records) if r.label][0]
    with pytest.raises(DatasetError, match=r"mask .*000_mask.png is 10x10 but its image is 20x16"):
        ds[bad]


def test_visa(tmp_path):
    root = tmp_path / "visa"
    write_image(root / "candle/Data/Images/Normal/0000.JPG")
    write_image(root / "candle/Data/Images/Anomaly/0001.JPG")
    write_mask(root / "candle/Data/Masks/Anomaly/0001.png")
    write_image(root / "pcb1/Data/Images/Normal/0002.JPG")
    (root / "split_csv").mkdir()
    with (root / "split_csv/1cls.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["object", "split", "label", "image", "mask"])
        w.writerow(["candle", "train", "normal", "candle/Data/Images/Normal/0000.JPG", ""])
        w.writerow(["candle", "test", "anomaly", "candle/Data/Images/Anomaly/0001.JPG",
                    "candle/Data/Masks/Anomaly/0001.png"])
        w.writerow(["pcb1", "test", "normal", "pcb1/Data/Images/Normal/0002.JPG", ""])
    test = VisA(root, "test")
    assert len(test) == 2 and test.class_names == ["candle", "pcb1"]
    check_sample(test[0], 1, "anomaly", True)
    check_sample(VisA(root, "train")[0], 0, "good", False)
    with pytest.raises(DatasetError, match="no test rows for \\['fryum'\\]"):
        VisA(root, "test", ["candle", "fryum"])
    (root / "split_csv/1cls.csv").unlink()
    with pytest.raises(DatasetError, match="missing VisA split file"):
        VisA(root)


def test_mvtec3d(tmp_path):
    root = tmp_path / "mv3d"
    for split, defect in (("train", "good"), ("test", "good"), ("test", "hole")):
        d = root / "bagel" / split / defect
        write_image(d / "rgb/000.png")
        (d / "xyz").mkdir()
        tifffile.imwrite(d / "xyz/000.tiff", np.random.rand(16, 20, 3).astype(np.float32), photometric="rgb")
        if defect != "good":
            write_mask(d / "gt/000.png")
    test = MVTec3DAD(root, "test")
    assert len(test) == 2
    s = test[1]
    check_sample(s, 1, "hole", True)
    assert s.xyz.shape == (16, 20, 3) and s.xyz.dtype == np.float32
    tifffile.imwrite(root / "bagel/test/hole/xyz/000.tiff", np.zeros((8, 8, 3), np.float32),
                     photometric="rgb")
    with pytest.raises(DatasetError, match=r"point map .*000.tiff has shape \(8, 8, 3\)"):
        test[1]
    (root / "bagel/test/hole/xyz/000.tiff").unlink()
    with pytest.raises(DatasetError, match="missing point map"):
        MVTec3DAD(root, "test")


def test_folder(tmp_path):
    root = tmp_path / "widget"
    write_image(root / "good/a.png")
    write_image(root / "scratch/b.png")
    write_mask(root / "masks/scratch/b_mask.png")
    write_image(root / "dent/c.png")  # no mask: image-level label only
    ds = FolderDataset(root)
    by_defect = {ds[i].defect: ds[i] for i in range(len(ds))}
    check_sample(by_defect["good"], 0, "good", False)
    check_sample(by_defect["scratch"], 1, "scratch", True)
    check_sample(by_defect["dent"], 1, "dent", False)
    assert by_defect["dent"].class_name == "widget"
    with pytest.raises(DatasetError, match="missing folder .*good"):
        FolderDataset(root / "scratch")


def test_textile_package():
    ds = TextileImages()
    assert len(ds) == 2000
    assert int(ds.labels.sum()) == 1000
    kinds = {r.defect for r in ds.records}
    assert kinds == {"good", "local", "global"}
    s = ds[0]
    assert s.image.shape == (250, 250, 3) and s.class_name == "textile" and s.mask.sum() == 0
    assert len(TextileImages(["local"])) == 500


def _plane_cloud(h=16, w=20, hole=True) -> np.ndarray:
    """A tilted plane z = 0.5 + 0.001 x seen by a camera at the origin (metres), a
    missing 3x3 patch (all-zero points), as MVTec 3D-AD stores it."""
    ys, xs = np.mgrid[:h, :w].astype(np.float32)
    x, y = (xs - w / 2) * 0.001, (ys - h / 2) * 0.001
    z = 0.5 + 1.0 * x  # rises with x: 45 degrees
    xyz = np.stack([x, y, z], -1).astype(np.float32)
    if hole:
        xyz[5:8, 5:8] = 0
    return xyz


def test_depth_and_normals_renderings():
    from edge_inspect.trainer.data.render3d import depth_from_xyz, normals_from_xyz

    xyz = _plane_cloud()
    depth = depth_from_xyz(xyz)
    assert depth.shape == (16, 20, 3) and depth.dtype == np.uint8
    assert (depth[5:8, 5:8] == 0).all()  # missing points are black
    row = depth[0, :, 0].astype(int)
    assert row[0] == 255 and row[-1] == 32 and (np.diff(row) <= 0).all()  # nearer is brighter
    normals = normals_from_xyz(xyz)
    n = normals.astype(float) / 255 * 2 - 1
    want = np.array([-1.0, 0.0, 1.0]) / np.sqrt(2)
    want = -want if (want * xyz[8, 12]).sum() > 0 else want  # towards the camera
    inner = n[10:14, 10:18].reshape(-1, 3)
    assert np.abs(inner - want).max() < 0.01
    assert (normals[5:8, 4:9] == 0).all() and (normals[4:9, 5:8] == 0).all()  # a missing neighbour
    assert (normals[0] == 0).all() and normals[4, 4].any()  # borders; a diagonal hole is fine


def test_mvtec3d_rendered_as_depth_and_normals(tmp_path):
    root = tmp_path / "mv3d"
    for split, defect in (("train", "good"), ("test", "good"), ("test", "hole")):
        d = root / "bagel" / split / defect
        write_image(d / "rgb/000.png")
        (d / "xyz").mkdir(parents=True)
        tifffile.imwrite(d / "xyz/000.tiff", _plane_cloud(), photometric="rgb")
        if defect != "good":
            write_mask(d / "gt/000.png")
    from edge_inspect.trainer.data.render3d import depth_from_xyz, normals_from_xyz

    depth = MVTec3DAD(root, "test", render="depth")
    assert np.array_equal(depth[1].image, depth_from_xyz(_plane_cloud()))
    assert depth[1].mask.sum() == 16 and depth[1].label == 1
    normals = MVTec3DAD(root, "test", render="normals")
    assert np.array_equal(normals[0].image, normals_from_xyz(_plane_cloud()))
    with pytest.raises(ValueError, match="render 'height' unknown"):
        MVTec3DAD(root, "test", render="height")


def _eyecandies(tmp_path: Path) -> Path:
    import yaml

    root = tmp_path / "eyecandies"
    for cat in ("CandyCane", "GummyBear"):
        for split, ids in (("train", ["000", "001"]), ("test_public", ["00", "01", "02"])):
            data = root / cat / split / "data"
            data.mkdir(parents=True)
            for i, sid in enumerate(ids):
                bad = split == "test_public" and i > 0
                (data / f"{sid}_metadata.yaml").write_text(yaml.safe_dump({"anomalous": int(bad)}))
                write_image(data / f"{sid}_image_5.png", value=90)
                normals = np.zeros((16, 20, 3), np.uint8)
                normals[...] = (128, 128, 255)  # facing the camera
                cv2.imwrite(str(data / f"{sid}_normals.png"), normals[..., ::-1])
                depth = np.full((16, 20), 30000, np.uint16)
                depth[:, 10:] = 40000
                depth[0, 0] = 0
                cv2.imwrite(str(data / f"{sid}_depth.png"), depth)
                (data / f"{sid}_info_depth.yaml").write_text("normalization: {min: 0.5, max: 0.9}\n")
                if bad:
                    write_mask(data / f"{sid}_mask.png")
    return root


def test_eyecandies(tmp_path):
    from edge_inspect.trainer.data import Eyecandies
    from edge_inspect.trainer.data.registry import DatasetSpec

    root = _eyecandies(tmp_path)
    test = Eyecandies(root, "test")  # normals by default: the dataset's own encoding
    assert len(test) == 6 and list(test.labels) == [0, 1, 1, 0, 1, 1]
    s = test[1]
    assert tuple(s.image[5, 5]) == (128, 128, 255) and s.mask.sum() == 16 and s.defect == "anomalous"
    depth = Eyecandies(root, "test", ["GummyBear"], render="depth")[0].image
    assert depth[0, 0, 0] == 255 and depth[5, 2, 0] > depth[5, 15, 0] == 32  # 0 is the nearest
    rgb = Eyecandies(root, "train", "CandyCane", render="rgb")[0]
    check_sample(rgb, 0, "good", False)
    half = DatasetSpec.from_dict({"name": "eye1", "kind": "eyecandies", "root": str(root),
                                  "split": "all", "categories": ["CandyCane"]}, "test").open()
    assert len(half) == 5 and half.class_names == ["CandyCane"]  # train + test of one half
    assert int(half.labels.sum()) == 2
    (root / "CandyCane/train/data/001_metadata.yaml").unlink()  # train samples are good
    assert len(Eyecandies(root, "train", "CandyCane")) == 2
    (root / "GummyBear/test_public/data/01_mask.png").unlink()
    with pytest.raises(DatasetError, match="missing mask .*01_mask.png"):
        Eyecandies(root, "test")
    with pytest.raises(ValueError, match="split 'test_private' unknown"):
        Eyecandies(root, "test_private")


def test_eyecandies_rgb_samples_carry_the_point_map_of_their_metric_depth(tmp_path):
    import yaml

    from edge_inspect.trainer.data import Eyecandies
    from edge_inspect.trainer.data.batches import sample_plane
    from edge_inspect.trainer.data.render3d import EYECANDIES_FOCAL, normals_from_xyz

    root = _eyecandies(tmp_path)
    data = root / "CandyCane" / "train" / "data"
    for sid in ("000", "001"):
        (data / f"{sid}_info_depth.yaml").write_text(
            yaml.safe_dump({"normalization": {"min": 0.5, "max": 0.9}}))
    flat = np.full((16, 20), 32768, np.uint16)
    cv2.imwrite(str(data / "001_depth.png"), flat)
    stepped, flat_sample = Eyecandies(root, "train", "CandyCane", render="rgb")
    xyz = sample_plane(stepped, "xyz")
    assert xyz.shape == (16, 20, 3) and xyz.dtype == np.float32
    z = 30000 / 65535 * 0.4 + 0.5  # the dataset's metric depth
    f = EYECANDIES_FOCAL
    np.testing.assert_allclose(xyz[3, 4], [(4 - 10) * z / f, (3 - 8) * z / f, z], rtol=1e-5)
    assert xyz[0, 0, 2] == pytest.approx(0.5)  # 16-bit 0 is the nearest depth, not a hole
    np.testing.assert_allclose(xyz[5, 15, 2], 40000 / 65535 * 0.4 + 0.5, rtol=1e-6)
    # a flat scene facing the camera: n = (0, 0, -1) in the camera frame, as MVTec 3D-AD's
    normals = normals_from_xyz(sample_plane(flat_sample, "xyz"))
    assert np.abs(normals[2:-2, 2:-2].astype(int) - [128, 128, 0]).max() <= 1
    # other renders carry no plane, nor does a sample without its depth normalization
    assert Eyecandies(root, "train", "CandyCane", render="normals")[0].xyz is None
    (data / "000_info_depth.yaml").write_text("normalization: {min: 0.5}\n")
    with pytest.raises(DatasetError, match="depth normalization .*000_info_depth.yaml"):
        Eyecandies(root, "train", "CandyCane", render="rgb")[0]
    (data / "000_info_depth.yaml").unlink()  # a depth image without its normalization
    with pytest.raises(DatasetError, match="000 in .* has only one of 000_depth.png and 000_info_depth.yaml"):
        Eyecandies(root, "train", "CandyCane", render="rgb")
    (data / "000_depth.png").unlink()  # neither: an RGB sample without a point map
    assert Eyecandies(root, "train", "CandyCane", render="rgb")[0].xyz is None
