"""`edge-inspect draws`: one run per class and shot draw for a method trained on its shots,
kept when finished, summarized as mean and spread over draws and mean over classes."""

import argparse
import json

import numpy as np
import pytest
import yaml

from edge_inspect.trainer.draws_cli import plan, run

CONFIG = {"name": "pirn-draws", "method": "pirn",
          "backbone": {"kind": "dinov2", "arch": "tiny-dinov2", "input_size": 112},
          "fit": "resize", "interpolation": "bilinear", "seed": 0, "shots": 4,
          "data": {"target": [{"name": "rgbd", "kind": "rgbd_synthetic", "count": 30, "size": 112,
                               "seed": 1}]},
          "head": {"taps": [1, 2, 3], "prototypes": 8}, "train": {"epochs": 3, "lr": 1e-3},
          "calibration": {"false_alarm_rate": 0.1, "normals": 10}, "eval": {"overlays": 0}}


def _args(config, out, **kw):
    return argparse.Namespace(**({"config": config, "draws": 2, "first": 0, "classes": None,
                                  "out": out, "overrides": []} | kw))


def test_each_draw_is_its_own_run_and_the_summary_is_their_mean(tmp_path, capsys, monkeypatch):
    config = tmp_path / "pirn.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    out = tmp_path / "sweep"
    assert run(_args(config, out)) == 0
    runs = sorted((out / "rgbd-sheet").iterdir())
    assert [r.name for r in runs] == ["draw-0", "draw-1"]
    per_run = []
    for r in runs:
        cfg = yaml.safe_load((r / "config.yaml").read_text())
        assert cfg["seed"] == int(r.name[-1])  # the draw's seed drew its shots
        (metrics,) = r.glob("eval-4shot/metrics.json")
        per_run.append(json.loads(metrics.read_text())["datasets"]["rgbd"]["classes"]["sheet"])
    shots = [m["shots"] for m in per_run]
    assert shots[0] != shots[1]  # two draws, two sets of shots
    summary = json.loads((out / "summary.json").read_text())
    entry = summary["classes"]["rgbd/sheet"]
    for k in ("image_auroc", "pixel_auroc", "aupro"):
        values = [m[k] for m in per_run]
        assert entry[k]["mean"] == pytest.approx(np.mean(values))
        assert entry[k]["std"] == pytest.approx(np.std(values))
        assert summary["mean_over_classes"][k] == pytest.approx(np.mean(values))
    assert "| rgbd/sheet | 2 |" in (out / "summary.md").read_text()
    # a second call keeps the finished runs (nothing retrained) and adds a third draw
    stamp = (runs[0] / "checkpoint.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert run(_args(config, out, draws=3)) == 0
    assert "draw 0: finished before" in capsys.readouterr().out
    assert (runs[0] / "checkpoint.safetensors").stat().st_mtime_ns == stamp
    assert len(json.loads((out / "summary.json").read_text())["classes"]["rgbd/sheet"]["draws"]) == 3
    # the same folder for another shot count is refused, not mixed into the summary
    with pytest.raises(ValueError, match="draw-0 holds a run of another config"):
        run(_args(config, out, overrides=["shots=5"]))
    # the default folder names the shot count
    monkeypatch.chdir(tmp_path)
    assert run(_args(config, None, draws=1, overrides=["train.epochs=1"])) == 0
    assert (tmp_path / "runs" / "pirn-draws-4shot-draws" / "summary.json").exists()


def test_a_multi_class_target_is_split_into_one_run_per_class(tmp_path):
    import cv2

    root = tmp_path / "mvtec3d"
    for cls in ("bagel", "tire"):
        for split in ("train", "test"):
            folder = root / cls / split / "good"
            (folder / "rgb").mkdir(parents=True)
            (folder / "xyz").mkdir()
            cv2.imwrite(str(folder / "rgb" / "000.png"), np.zeros((8, 8, 3), np.uint8))
            (folder / "xyz" / "000.tiff").write_bytes(b"")
    cfg = CONFIG | {"data": {"target": [{"name": "m3d", "kind": "mvtec3d", "root": str(root)}]}}
    config = tmp_path / "m3d.yaml"
    config.write_text(yaml.safe_dump(cfg))
    runs = plan(config, [], draws=3, first=5)
    assert [(d, c, s) for d, c, s, _ in runs] == [("m3d", c, s) for c in ("bagel", "tire") for s in (5, 6, 7)]
    for _, cls, seed, run_cfg in runs:
        assert run_cfg.seed == seed and run_cfg.target_data[0].options["categories"] == [cls]
    assert len(plan(config, [], draws=1, classes=["tire"])) == 1
    with pytest.raises(ValueError, match=r"--classes \['cake'\] not in the target; it has \['bagel'"):
        plan(config, [], draws=1, classes=["cake"])
    with pytest.raises(ValueError, match="--draws must be >= 1"):
        plan(config, [], draws=0)


def test_a_one_for_all_method_is_one_run_per_draw_over_every_class(tmp_path, capsys):
    """IIPAD trains one model for all categories: a draw is one run, its metrics give every
    class's row; finished runs are collected without training (written here by hand)."""
    from tests.conftest import ROOT

    config = ROOT / "configs/iipad/tiny-synthetic.yaml"
    runs = plan(config, [], 2)
    assert [(d, c, s) for d, c, s, _ in runs] == [("synth", None, 0), ("synth", None, 1)]
    assert runs[0][3].target_data[0].options["classes"] == ["stripes", "grain", "weave"]
    with pytest.raises(ValueError, match="one model for every class"):
        plan(config, [], 2, classes=["grain"])
    out = tmp_path / "sweep"
    values = {0: {"stripes": 0.90, "grain": 0.80, "weave": 1.00},
              1: {"stripes": 0.70, "grain": 0.60, "weave": 0.80}}
    for _, _, seed, cfg in runs:  # finished runs, as train + eval leave them
        run_dir = out / "synth-all" / f"draw-{seed}"
        (run_dir / "eval-4shot").mkdir(parents=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        classes = {c: {"image_auroc": v, "pixel_auroc": v, "aupro": v} for c, v in values[seed].items()}
        metrics = {"datasets": {"synth": {"classes": classes}}}
        (run_dir / "eval-4shot" / "metrics.json").write_text(json.dumps(metrics))
    assert run(_args(config, out)) == 0
    assert "2 runs (1 datasets (all classes each) x 2 draws)" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["classes"]["synth/grain"]["image_auroc"]["mean"] == pytest.approx(0.70)
    assert summary["mean_over_classes"]["pixel_auroc"] == pytest.approx(np.mean([0.80, 0.70, 0.90]))
