"""Two planes from the camera to the engine: the RGB-D sources, the point-map reader, the
start-up check of a camera's planes against the bundle, and `serve` scoring a two-plane
(PIRN) bundle from a synthetic RGB-D camera."""

import time

import cv2
import numpy as np
import pytest

from edge_inspect.runtime.preprocess import read_xyz
from edge_inspect.runtime.source_registry import camera_planes, check_planes, check_source
from edge_inspect.runtime.sources import RGBDFolderSource, SyntheticRGBDSource, rgbd_frame_kind
from edge_inspect.runtime.synthetic_rgbd import render


def _write_pair(folder, name, seed, kind="good"):
    import tifffile

    image, xyz, _ = render(64, np.random.default_rng(seed), kind)
    (folder / "rgb").mkdir(parents=True, exist_ok=True)
    (folder / "xyz").mkdir(exist_ok=True)
    cv2.imwrite(str(folder / "rgb" / f"{name}.png"), image[..., ::-1])
    tifffile.imwrite(folder / "xyz" / f"{name}.tiff", xyz, photometric="rgb")
    return image, xyz


def test_point_maps_are_read_interleaved_or_planar(tmp_path):
    import tifffile

    xyz = np.random.default_rng(0).random((20, 30, 3)).astype(np.float32)
    xyz[3, 4] = 0.0
    # interleaved (either photometric) and planar alike
    for name, how in (("rgb", {"photometric": "rgb"}), ("grey", {"photometric": "minisblack"}),
                      ("planar", {"photometric": "rgb", "planarconfig": "separate"})):
        data = xyz.transpose(2, 0, 1) if name == "planar" else xyz
        tifffile.imwrite(tmp_path / f"{name}.tiff", data, **how)
        np.testing.assert_array_equal(read_xyz(tmp_path / f"{name}.tiff"), xyz)
    tifffile.imwrite(tmp_path / "b.tiff", np.zeros((8, 8, 3), np.uint8), photometric="rgb")
    with pytest.raises(ValueError, match="expected a float"):  # an 8-bit RGB TIFF
        read_xyz(tmp_path / "b.tiff")
    with pytest.raises(ValueError, match="cannot read point map"):
        read_xyz(tmp_path / "none.tiff")


def test_mvtec3d_folder_replay_sends_both_planes_and_skips_unreadable_pairs(tmp_path):
    root = tmp_path / "bagel" / "test"
    want = [_write_pair(root / "good", "000", 0), _write_pair(root / "crack", "000", 1, "dent")]
    (root / "crack" / "xyz" / "001.tiff").write_bytes(b"not a tiff")
    cv2.imwrite(str(root / "crack" / "rgb" / "001.png"), np.zeros((64, 64, 3), np.uint8))
    events = []
    source = RGBDFolderSource(tmp_path / "bagel", fps=None)
    source.on_event = events.append
    frames = [planes for planes, _ in source]
    assert len(frames) == 2 and events == ["unreadable_image"]
    # folders in sorted order: crack before good
    for planes, (image, xyz) in zip(frames, [want[1], want[0]], strict=True):
        assert set(planes) == {"rgb", "xyz"} and planes["xyz"].dtype == np.float32
        np.testing.assert_array_equal(planes["rgb"], image)
        np.testing.assert_array_equal(planes["xyz"], xyz)
    (root / "good" / "rgb" / "002.png").write_bytes((root / "good" / "rgb" / "000.png").read_bytes())
    with pytest.raises(FileNotFoundError, match="has no point map"):
        RGBDFolderSource(tmp_path / "bagel")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no rgb/<name>.png"):
        RGBDFolderSource(tmp_path / "empty")


def test_synthetic_rgbd_camera_cycles_normal_dent_stain():
    source = SyntheticRGBDSource(size=48, fps=None, count=6, seed=3)
    frames = [planes for planes, _ in source]
    assert [rgbd_frame_kind(i) for i in range(6)] == ["good", "dent", "stain"] * 2
    for i, planes in enumerate(frames):
        image, xyz, mask = source.scene(i)
        np.testing.assert_array_equal(planes["rgb"], image)
        np.testing.assert_array_equal(planes["xyz"], xyz)
        assert bool(mask.any()) == (rgbd_frame_kind(i) != "good")
    # a dent changes the geometry, not the colour; a stain the colour, not the geometry
    good = render(48, np.random.default_rng([3, 2, 1]), "good")
    dent = source.scene(1)
    assert np.array_equal(good[0], dent[0]) and not np.array_equal(good[1], dent[1])


def test_a_camera_must_send_every_plane_the_bundle_takes():
    rgbd = {"id": "c", "source": "rgbd_synthetic", "size": 32}
    assert camera_planes(rgbd) == ("rgb", "xyz")
    check_planes(rgbd, ["rgb", "xyz"], "b")
    with pytest.raises(ValueError, match=r"camera c sends planes \['rgb'\] but b also takes \['xyz'\]"):
        check_planes({"id": "c", "source": "synthetic"}, ["rgb", "xyz"], "b")
    with pytest.raises(ValueError, match="declare planes"):
        check_planes({"id": "c", "source": "external"}, ["rgb", "xyz"], "b")
    check_planes({"id": "c", "source": "external", "planes": ["rgb", "xyz"]}, ["rgb", "xyz"], "b")
    with pytest.raises(ValueError, match="planes must be a list of distinct names"):
        check_source({"id": "c", "source": "external", "planes": ["rgb", "rgb"]})
    with pytest.raises(ValueError, match="a synthetic source sends"):
        check_source({"id": "c", "source": "synthetic", "planes": ["rgb", "xyz"]})
    with pytest.raises(ValueError, match="needs path"):
        check_source({"id": "c", "source": "rgbd_folder"})


@pytest.mark.parametrize("transport", ["zmq", "shm"])
def test_serve_scores_a_two_plane_bundle_from_an_rgbd_camera(pirn_bundle, tmp_path, transport):
    """Both planes (uint8 RGB, float32 xyz) also through one shared-memory slot."""
    from edge_inspect.runtime.orchestrator import Runtime
    from edge_inspect.runtime.profile import Profile

    def profile(cameras):
        return Profile.from_dict(dict(bundle=str(pirn_bundle), mode="every_part",
                                      endpoint_dir=str(tmp_path / "ep"), cameras=cameras,
                                      http={"port": None}, model_name="m",
                                      transport={"kind": transport, "slots": 2, "frame_pixels": 150 * 150},
                                      pipeline={"max_batch": 2, "camera_timeout_s": 2.0}))

    with pytest.raises(ValueError, match="also takes \\['xyz'\\]"):
        Runtime(profile([{"id": "rgb", "source": "synthetic", "size": [112, 112]}]))
    rt = Runtime(profile([{"id": "d", "source": "rgbd_synthetic", "size": 150, "fps": 20,
                           "count": 6}])).start()
    try:
        deadline = time.monotonic() + 60
        value = rt.metrics.registry.get_sample_value
        while (value("edge_inspect_frames_inferred_total", {"camera": "d", "model": "m"}) or 0) < 6:
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.1)
        assert (value("edge_inspect_frames_dropped_total", {"camera": "d", "reason": "malformed"}) or 0) == 0
    finally:
        rt.shutdown()


def test_captures_keep_both_planes_of_an_anomalous_rgbd_frame(tmp_path):
    import tifffile

    from edge_inspect.runtime.capture import CaptureStore
    from edge_inspect.runtime.sinks import CaptureSink, Result

    image, xyz, _ = render(48, np.random.default_rng(0), "dent")
    xyz[5, 5] = 0.0  # a missing point
    store = CaptureStore(tmp_path / "cap")
    sink = CaptureSink(store)
    heat = np.zeros((8, 8), np.float16)
    for seq, score in ((7, 2.0), (8, 0.5), (9, 3.0)):  # 8 is normal: not captured
        sink.publish(Result("d", seq, 0, score, score > 1, 1.0, "m", {}, heat,
                            {"image": image, "xyz": xyz}))
    sink.flush()
    captures = sorted((tmp_path / "cap" / "d").iterdir())
    assert [p.name[-8:] for p in captures] == ["00000007", "00000009"]  # one folder per capture
    capture = captures[0]
    assert sorted(p.name for p in capture.iterdir()) == ["frame.png", "header.json", "overlay.png",
                                                         "xyz.png", "xyz.tiff"]
    np.testing.assert_array_equal(cv2.imread(str(capture / "frame.png"))[..., ::-1], image)
    np.testing.assert_array_equal(tifffile.imread(capture / "xyz.tiff"), xyz)
    preview = cv2.imread(str(capture / "xyz.png"), cv2.IMREAD_GRAYSCALE)
    assert preview[5, 5] == 0 and preview.max() == 255
