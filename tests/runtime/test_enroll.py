"""`edge-inspect enroll` with torch blocked matches the trainer's torch enrollment."""

import json

import cv2
import numpy as np
import pytest
import torch

from edge_inspect.runtime.bundle import load_bundle
from edge_inspect.runtime.calibration import calibrate_detectors
from edge_inspect.runtime.engines import open_engine
from edge_inspect.trainer.config import RunConfig
from edge_inspect.trainer.data.transforms import fit_image, to_batch
from edge_inspect.trainer.evaluate import load_head
from tests.conftest import enrolled
from tests.runtime.test_no_torch import run_blocked


def _normal_folder(runs, method, folder, count):
    cfg = RunConfig.from_yaml(runs[method] / "config.yaml")
    spec = cfg.target_data[0]
    ds = spec.open("train" if spec.has_train_split else spec.split)
    normals = [i for i, r in enumerate(ds.records) if r.label == 0][:count]
    folder.mkdir()
    for j, i in enumerate(normals):
        cv2.imwrite(str(folder / f"{j:03d}.png"), ds[i].image[..., ::-1])
    return cfg


@pytest.mark.parametrize("name,method,count,shots,rate,reference", [
    ("memory", "memory", 80, 4, 0.2, 30),  # 30 normals fit the shift reference, 46 calibrate
    ("afclip+", "afclip", 24, 3, 0.05, 0),
    ("cmad+", "cmad", 24, 2, 0.05, 0)])
def test_enroll_without_torch_matches_torch(runs, bundles, tmp_path, name, method, count, shots,
                                            rate, reference):
    cfg = _normal_folder(runs, method, tmp_path / "normals", count)
    out = tmp_path / "enrolled"
    ref_args = f', "--reference-images", "{reference}"' if reference else ""
    proc = run_blocked(f"""
        from edge_inspect.runtime.cli import main
        import sys
        code = main(["enroll", "--bundle", r"{bundles[name]}", "--normal-dir", r"{tmp_path / 'normals'}",
                     "--shots", "{shots}", "--out", r"{out}", "--false-alarm-rate", "{rate}"{ref_args}])
        assert "torch" not in sys.modules
        raise SystemExit(code)
    """)
    assert proc.returncode == 0, proc.stderr
    new = load_bundle(out)
    old = load_bundle(bundles[name])
    assert old.manifest["files"] == json.loads((bundles[name] / "manifest.json").read_text())["files"]
    enrollment = new.manifest["enrollment"]
    shot_files = [tmp_path / "normals" / f for f in enrollment["shots"]]
    ref_files = [tmp_path / "normals" / f for f in enrollment["reference_images"]]
    used = set(enrollment["shots"]) | set(enrollment["reference_images"])
    calib_files = [p for p in sorted((tmp_path / "normals").iterdir()) if p.name not in used]
    assert len(shot_files) == shots and len(ref_files) == reference

    # the trainer enrolls the same shots with torch (and fits the same reference, and
    # calibrates each detector on the same held-out normals)
    head = load_head(cfg, enrolled(runs[method]))
    size = head.backbone.input_size
    fit = (cfg.fit_mode, cfg.interpolation)  # what the bundle's plane says (the runtime's fit)

    def batch(paths):
        pictures = [fit_image(cv2.imread(str(p))[..., ::-1], size, *fit) for p in paths]
        return to_batch(pictures, size, head.backbone.normalization, *fit)

    head.enroll(batch(shot_files))
    if reference:
        head.fit_reference([batch(ref_files)])
    if head.detectors:
        scores = torch.cat([head.detector_scores(batch(calib_files[s:s + 16]))
                            for s in range(0, len(calib_files), 16)])
        cal = calibrate_detectors(scores.numpy(), head.detectors, head.detector_shares, rate,
                                  head.detector_tails)
        head.set_detector_thresholds(torch.tensor([cal.detectors[d]["threshold"]
                                                   for d in head.detectors]))
    for key, want in head.memory_state().items():
        got, want = new.memory[key], want.numpy()
        assert got.shape == want.shape, key
        # relative to the array's scale: an inverse covariance amplifies float32 feature noise
        err = np.abs(got - want).max() / max(np.abs(want).max(), 1.0)
        assert err <= 1e-4, (key, err)
    if reference:  # the border ring's own scale was fitted (not left at 1)
        assert abs(float(new.memory["local.position_scale"][0]) - 1.0) > 1e-3

    # scores of the new bundle equal the torch head's on other images
    others = sorted((tmp_path / "normals").iterdir())[-3:]
    frames = np.stack([fit_image(cv2.imread(str(p))[..., ::-1], size, *fit) for p in others])
    with torch.no_grad():
        want_score, _ = head(to_batch(list(frames), size, head.backbone.normalization, *fit))
    got_score = open_engine(new).infer({"image": frames})["image_score"]
    assert np.abs(got_score - want_score.numpy()).max() <= 1e-3
    t = new.manifest["threshold"]
    assert t["target_false_alarm_rate"] == rate and t["n_normal"] == count - shots - reference
    if head.detectors:
        assert t["method"] == "per_detector_false_alarm_rate" and t["threshold"] == 1.0
        assert list(t["detectors"]) == list(head.detectors)
        for d, share in zip(head.detectors, head.detector_shares, strict=True):
            assert t["detectors"][d]["target_false_alarm_rate"] == pytest.approx(rate * share)
    else:
        assert t["method"] == "normal_false_alarm_rate"


def test_enroll_refuses_zero_shot_bundles_and_too_few_images(bundles, tmp_path):
    from edge_inspect.runtime.bundle import BundleError
    from edge_inspect.runtime.enroll import enroll

    folder = tmp_path / "few"
    folder.mkdir()
    for i in range(5):
        cv2.imwrite(str(folder / f"{i}.png"), np.full((128, 128, 3), 120, np.uint8))
    with pytest.raises(BundleError, match="without a few-shot memory"):
        enroll(bundles["cmad"], folder, 2)
    with pytest.raises(ValueError, match="cannot calibrate"):
        enroll(bundles["cmad+"], folder, 2, false_alarm_rate=0.01)
    with pytest.raises(ValueError, match="6 shots asked"):
        enroll(bundles["cmad+"], folder, 6)
    with pytest.raises(ValueError, match="fits no reference: drop --reference-images"):
        enroll(bundles["cmad+"], folder, 2, reference=2)
    # the memory head's reference takes 30 images before any calibrates (Gumbel tails: 30)
    with pytest.raises(ValueError, match=r"split 0.65/0.35 over \['local', 'global'\]: put at least "
                                         r"64 images \(4 shots \+ 30 reference \+ 30\)"):
        enroll(bundles["memory"], folder, 4)
