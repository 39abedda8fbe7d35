"""``edge-inspect predict`` and its Python API: a folder of images -> CSV, overlays and a
summary line, without torch; the scores are the engine's on the bundle's own fitting; the
README example runs as written; RGB-D bundles take paired planes."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_inspect.runtime import load_bundle, open_engine, predict
from edge_inspect.runtime.overlay import render_overlay
from edge_inspect.runtime.preprocess import fit_image, read_rgb
from tests.runtime.test_no_torch import BLOCK_TORCH, LAYERS

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def textile_images(runs, tmp_path_factory):
    """12 textile images (nominal and local defects) copied from the memory run's target."""
    from edge_inspect.trainer.config import RunConfig

    cfg = RunConfig.from_yaml(runs["memory"] / "config.yaml")
    ds = cfg.target_data[0].open()
    folder = tmp_path_factory.mktemp("textile-images")
    picks = [i for i, r in enumerate(ds.records) if r.label == 0][:6]
    picks += [i for i, r in enumerate(ds.records) if r.label == 1][:6]
    for i in picks:
        shutil.copy(ds.records[i].image, folder / f"{ds.records[i].label}-{ds.records[i].image.name}")
    return folder


def _predict_cli(args: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    code = BLOCK_TORCH + "from edge_inspect.runtime.cli import main\nraise SystemExit(main(sys.argv[3:]))\n"
    return subprocess.run([sys.executable, "-c", code, *LAYERS, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_predict_writes_a_csv_overlays_and_a_summary_without_torch(bundles, textile_images, tmp_path):
    out = tmp_path / "pred"
    proc = _predict_cli(["predict", "--bundle", str(bundles["memory"]), str(textile_images),
                         "--out", str(out), "--batch", "5"])
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 12 and list(rows[0]) == ["path", "score", "label", "threshold", "calibrated_score"]
    threshold = load_bundle(bundles["memory"]).threshold
    assert threshold is not None
    bad = [r for r in rows if r["label"] == "anomalous"]
    for r in rows:
        assert (float(r["score"]) > threshold) == (r["label"] == "anomalous")
        assert float(r["threshold"]) == pytest.approx(threshold, rel=1e-5)
    assert sum(Path(r["path"]).name.startswith("1-") for r in bad) >= 4  # the defects are found
    assert len(list((out / "overlays").glob("*.png"))) == len(bad) > 0
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(rf"scored 12 images in [\d.]+ s \([\d.]+ img/s\): {len(bad)} anomalous "
                        rf"\(threshold [\d.e+-]+\); {out / 'predictions.csv'}", summary), summary
    assert "predict" in proc.stderr  # the progress bar


def test_predict_scores_are_the_engines_on_the_bundles_fitting(bundles, textile_images):
    bundle = load_bundle(bundles["memory"])
    engine = open_engine(bundle)
    got = list(predict(engine, [textile_images], batch=3))
    plane = bundle.image
    files = sorted(textile_images.iterdir())
    frames = np.stack([fit_image(read_rgb(f), (plane.height, plane.width), plane.fit, plane.interpolation)
                       for f in files])
    want = engine.infer({plane.name: frames})
    assert [p.path for p in got] == files
    assert np.allclose([p.score for p in got], want["image_score"], atol=1e-6)
    assert np.allclose(np.stack([p.anomaly_map for p in got]), want["anomaly_map"], atol=1e-6)


def test_overlays_all_or_none_and_no_threshold(bundles, textile_images, tmp_path):
    for choice, count in (("all", 12), ("none", 0)):
        out = tmp_path / choice
        assert _predict_cli(["predict", "--bundle", str(bundles["memory"]), str(textile_images),
                             "--out", str(out), "--overlays", choice]).returncode == 0
        assert len(list(out.glob("overlays/*.png"))) == count
    zero_shot = load_bundle(bundles["afclip"])  # exported without calibration
    assert zero_shot.threshold is None
    (p,) = predict(open_engine(zero_shot), [next(textile_images.iterdir())])
    assert p.label is None and p.threshold is None


def test_predict_refuses_a_used_folder_and_a_wrong_path(bundles, textile_images, tmp_path):
    out = tmp_path / "used"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = _predict_cli(["predict", "--bundle", str(bundles["memory"]), str(textile_images),
                         "--out", str(out)])
    assert proc.returncode == 2 and "is not an empty folder" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # one line, no traceback
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    proc = _predict_cli(["predict", "--bundle", str(bundles["memory"]), str(tmp_path / "nope"),
                         "--out", str(tmp_path / "new")])
    assert proc.returncode != 0 and "nope not found" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "new").exists()


def test_the_readme_example_runs_as_written(bundles, textile_images, tmp_path):
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- predict-example -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README lost its predict example"
    (tmp_path / "bundles").mkdir()
    os.symlink(bundles["memory"], tmp_path / "bundles" / "textile")
    os.symlink(textile_images, tmp_path / "images")
    proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH + block.group(1), *LAYERS], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 12 and all(len(line.split()) == 3 for line in lines)


def test_an_overlay_shows_the_part_the_heatmap_and_the_verdict():
    frame = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    heat = np.zeros((15, 20), np.float32)
    heat[5:8, 5:8] = 3.0
    picture = render_overlay(frame, heat, 2.5, 1.2, True, "x.png")
    from edge_inspect.runtime.overlay import BAR_PX, HEADER_PX

    assert picture.shape == (HEADER_PX + 60 + 2 * BAR_PX, 2 * 80 + 4, 3)
    assert np.array_equal(picture[HEADER_PX:HEADER_PX + 60, :80], frame[..., ::-1])  # the part, plain
    blended = picture[HEADER_PX:HEADER_PX + 60, 84:]
    assert not np.array_equal(blended, frame[..., ::-1])
    header = picture[:HEADER_PX]
    assert (header[..., 2] > 150).any() and ((header[..., 2] > 150) & (header[..., 1] < 80)).any()  # red text
    normal = render_overlay(frame, heat, 0.5, 1.2, False)[:HEADER_PX]
    assert ((normal[..., 1] > 120) & (normal[..., 2] < 80)).any()  # green text


def test_an_rgbd_bundle_takes_paired_planes(pirn_bundle, tmp_path):
    from tests.runtime.test_rgbd_runtime import _write_pair

    bundle_dir = pirn_bundle
    bundle = load_bundle(bundle_dir)
    names = [p.name for p in bundle.inputs]
    assert len(names) == 2
    for i in range(3):
        _write_pair(tmp_path / "scan", f"{i:03d}", i, "dent" if i == 2 else "good")
    if names[1] != "xyz":
        (tmp_path / "scan" / "xyz").rename(tmp_path / "scan" / names[1])
    engine = open_engine(bundle)
    with pytest.raises(ValueError, match=rf"also takes \['{names[1]}'\]: give a folder for each"):
        list(predict(engine, [tmp_path / "scan" / "rgb"]))
    got = list(predict(engine, [tmp_path / "scan" / "rgb"], {names[1]: tmp_path / "scan" / names[1]}))
    assert len(got) == 3
    plane_dir = tmp_path / "scan" / names[1]
    proc = _predict_cli(["predict", "--bundle", str(bundle_dir), str(tmp_path / "scan" / "rgb"),
                         "--plane", f"{names[1]}={plane_dir}", "--out", str(tmp_path / "o")])
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((tmp_path / "o" / "predictions.csv").open()))
    assert np.allclose([float(r["score"]) for r in rows], [p.score for p in got], rtol=1e-5)
    twin = tmp_path / "twin"  # another folder with the same image names: which plane is whose?
    shutil.copytree(tmp_path / "scan" / "rgb", twin)
    with pytest.raises(ValueError, match="share the name '000'.*one folder of images at a time"):
        list(predict(engine, [tmp_path / "scan" / "rgb", twin], {names[1]: plane_dir}))
    (tmp_path / "scan" / names[1] / "001.tiff").unlink()
    with pytest.raises(FileNotFoundError, match="no .* plane for 001.png"):
        list(predict(engine, [tmp_path / "scan" / "rgb"], {names[1]: tmp_path / "scan" / names[1]}))


def test_an_unreadable_image_is_skipped_and_reported_not_fatal(bundles, textile_images, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(textile_images, folder)
    (folder / "0-broken.png").write_bytes(b"not an image")
    out = tmp_path / "pred"
    proc = _predict_cli(["predict", "--bundle", str(bundles["memory"]), str(folder), "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    assert "skipped" in proc.stderr and "0-broken.png" in proc.stderr
    assert proc.stdout.strip().endswith("; 1 unreadable, skipped (listed above)")
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 12 and not any("broken" in r["path"] for r in rows)
    with pytest.raises(ValueError, match="cannot read image .*0-broken.png"):  # the API raises
        list(predict(open_engine(load_bundle(bundles["memory"])), [folder]))
