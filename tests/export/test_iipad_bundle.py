"""IIPAD as a bundle: fixed-size memory inputs, parity, and a new category enrolled without
torch (``edge-inspect enroll --append``) equal to the trainer's ``IipadHead.append``."""

from __future__ import annotations

import json

import cv2
import numpy as np
import onnx
import pytest
import torch

from edge_inspect.runtime.bundle import load_bundle
from edge_inspect.runtime.engines import open_engine
from edge_inspect.runtime.enrollment import build_memory
from edge_inspect.trainer.data.synthetic import SyntheticDefects
from edge_inspect.trainer.data.transforms import fit_image, to_batch
from edge_inspect.trainer.evaluate import load_head
from tests.runtime.test_no_torch import run_blocked


@pytest.fixture(scope="module")
def bundle(iipad_run, tmp_path_factory):
    from edge_inspect.export.bundle_writer import export_bundle

    _, run, _ = iipad_run
    enrolled = run / "eval" / "enrolled" / "synth-grain.safetensors"
    return export_bundle(run, tmp_path_factory.mktemp("iipad-bundle") / "b", enrolled), enrolled


def test_the_bundle_takes_a_fixed_size_memory_and_matches_torch(bundle):
    folder, _ = bundle
    b = load_bundle(folder)
    report = json.loads((folder / "parity.json").read_text())
    assert report["passed"] and report["score_max_abs_diff"] <= 1e-4
    assert b.manifest["shots"] == 12  # 4 shots of each of the 3 categories
    assert b.manifest["memory"]["recipe"] == {"kind": "category_aware", "capacity": 64, "retrieve": 4}
    assert sorted(b.memory) == ["bank", "keys", "prompts", "valid"]
    graph = onnx.load(str(folder / "model.onnx"))
    for inp in graph.graph.input:
        if inp.name.startswith("memory."):  # no dynamic axis: capacity entries, always
            dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
            assert all(d > 0 for d in dims) and dims[0] == 64, (inp.name, dims)


def _frames(folder, size, fit):
    return [fit_image(cv2.imread(str(p))[..., ::-1], size, *fit) for p in folder]


def test_a_new_category_appended_without_torch_equals_the_trainers(bundle, iipad_run, tmp_path):
    folder, enrolled = bundle
    cfg, _, _ = iipad_run
    new = SyntheticDefects("train", ("fine",), per_class=20, size=128, seed=5)
    normals = tmp_path / "fine"
    normals.mkdir()
    for i in range(len(new)):
        cv2.imwrite(str(normals / f"{i:03d}.png"), new[i].image[..., ::-1])
    out = tmp_path / "appended"
    proc = run_blocked(f"""
        from edge_inspect.runtime.cli import main
        import sys
        code = main(["enroll", "--bundle", r"{folder}", "--normal-dir", r"{normals}", "--shots", "4",
                     "--append", "--out", r"{out}", "--false-alarm-rate", "0.1"])
        assert "torch" not in sys.modules
        raise SystemExit(code)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "4 shots added to the memory" in proc.stdout
    grown, old = load_bundle(out), load_bundle(folder)
    # calibrated on the new category alone, the threshold never drops below the bundle's
    assert grown.threshold >= old.threshold
    assert grown.manifest["enrollment"]["earlier"] == old.manifest.get("enrollment")
    assert int(grown.memory["valid"].sum()) == 16 and grown.manifest["shots"] == 16
    for k in ("keys", "bank", "prompts"):  # the old entries are kept as they were
        np.testing.assert_array_equal(grown.memory[k][:12], old.memory[k][:12])

    head = load_head(cfg, enrolled)  # the trainer adds the same shots to the same memory
    size, fit = head.backbone.input_size, (cfg.fit_mode, cfg.interpolation)
    shots = [normals / f for f in grown.manifest["enrollment"]["shots"]]
    head.append(to_batch(_frames(shots, size, fit), size, head.backbone.normalization, *fit))
    for key, want in head.memory_state().items():
        assert np.abs(grown.memory[key] - want.numpy()).max() <= 1e-4, key

    test = SyntheticDefects("test", ("fine",), per_class=6, size=128, seed=6)
    frames = np.stack([fit_image(test[i].image, size, *fit) for i in range(len(test))])
    with torch.no_grad():
        want_score, want_map = head(to_batch(list(frames), size, head.backbone.normalization, *fit))
    got = open_engine(grown).infer({"image": frames})
    assert np.abs(got["image_score"] - want_score.numpy()).max() <= 1e-4
    assert np.abs(got["anomaly_map"] - want_map.numpy()).max() <= 1e-3


def test_enrollment_limits_are_named(bundle):
    folder, _ = bundle
    b = load_bundle(folder)
    recipe = b.manifest["memory"]["recipe"]
    one = {"keys": b.memory["keys"][:1], "memory": b.memory["bank"][:1], "prompts": b.memory["prompts"][:1]}
    with pytest.raises(ValueError, match="retrieves 4 per frame: enroll at least 4 shots"):
        build_memory(recipe, one)
    many = {k: np.repeat(v, 53, axis=0) for k, v in one.items()}
    with pytest.raises(ValueError, match=r"65 memory entries \(12 in the bundle \+ 53 shots\) exceed "
                                         r"its capacity of 64"):
        build_memory(recipe, many, existing=dict(b.memory))
    replaced = build_memory(recipe, {k: np.repeat(v, 4, axis=0) for k, v in one.items()})
    assert int(replaced["valid"].sum()) == 4  # without --append the shots replace the memory
    with pytest.raises(ValueError, match="a new category needs at least 4 shots"):
        build_memory(recipe, {k: np.repeat(v, 2, axis=0) for k, v in one.items()}, existing=dict(b.memory))
    holes = {k: v.copy() for k, v in b.memory.items()}  # rows 0-11 valid; drop row 2, add row 20
    holes["valid"][2], holes["valid"][20] = 0.0, 1.0
    holes["keys"][20] = 7.0
    four = {k: np.repeat(v, 4, axis=0) for k, v in one.items()}
    grown = build_memory(recipe, four, existing=holes)
    assert int(grown["valid"].sum()) == 16 and grown["valid"][:16].all()  # valid rows first
    kept = [i for i in range(64) if holes["valid"][i] > 0.5]
    np.testing.assert_array_equal(grown["keys"][:12], holes["keys"][kept])  # row 20 kept, row 2 gone
    np.testing.assert_array_equal(grown["keys"][12:16], four["keys"])
    with pytest.raises(ValueError, match="--append: a bank_per_set memory holds one part's shots"):
        build_memory({"kind": "bank_per_set"}, {"features": np.zeros((1, 2, 3, 4))},
                     existing={"bank": np.zeros((1, 6, 4))})


def test_the_edge_variant_exports_with_the_parity_gate_and_without_the_qformer(bundle, tmp_path):
    from edge_inspect.export.bundle_writer import export_bundle
    from edge_inspect.trainer.config import RunConfig
    from edge_inspect.trainer.evaluate import evaluate_run
    from edge_inspect.trainer.fit import train
    from tests.conftest import ROOT

    cfg = RunConfig.from_yaml(ROOT / "configs/iipad/tiny-synthetic.yaml", [
        "head.condition=class_token", "head.qformer=null", "train.epochs=2"])
    run = tmp_path / "edge"
    train(cfg, run)
    evaluate_run(cfg, run / "checkpoint.safetensors", run / "eval")
    out = export_bundle(run, tmp_path / "edge-bundle", run / "eval" / "enrolled" / "synth-grain.safetensors")
    assert json.loads((out / "parity.json").read_text())["passed"]
    keys = load_bundle(out).memory["keys"]
    assert keys.shape[1] == 1  # one key per entry: the class token
    full, edge = (bundle[0] / "model.onnx").stat().st_size, (out / "model.onnx").stat().st_size
    assert edge < full  # no second vision tower in the graph


def test_large_graphs_keep_their_weights_in_one_data_file(bundle, iipad_run, tmp_path, monkeypatch):
    """IIPAD at ViT-L sizes is over ONNX's 2 GB protobuf limit; the same path, forced here on
    the tiny graph, keeps the weights in model.onnx.data, checksummed, and scores the same."""
    import edge_inspect.export.bundle_writer as writer

    monkeypatch.setattr(writer, "EXTERNAL_DATA_BYTES", 0)
    folder, enrolled = bundle
    _, run, _ = iipad_run
    out = writer.export_bundle(run, tmp_path / "external", enrolled)
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert sorted(files) == ["memory.npz", "model.onnx", "model.onnx.data", "parity.json"]
    assert (out / "model.onnx").stat().st_size < 0.2 * (folder / "model.onnx").stat().st_size
    assert sorted(p.name for p in out.iterdir()) == sorted({*files, "manifest.json"})  # nothing stray
    data = SyntheticDefects("test", ("grain",), per_class=2, size=128, seed=1)
    frames = np.stack([fit_image(data[i].image, (112, 112), "resize", "bilinear") for i in range(2)])
    a = open_engine(load_bundle(out)).infer({"image": frames})["image_score"]
    b = open_engine(load_bundle(folder)).infer({"image": frames})["image_score"]
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_append_is_refused_before_scoring_when_it_cannot_fit(bundle, tmp_path):
    from edge_inspect.runtime.enroll import enroll

    folder, _ = bundle
    normals = tmp_path / "n"
    normals.mkdir()
    for i in range(70):
        cv2.imwrite(str(normals / f"{i:03d}.png"), np.full((64, 64, 3), 100 + i, np.uint8))
    with pytest.raises(ValueError, match="a new category needs at least 4 shots.*--shots 3"):
        enroll(folder, normals, 3, tmp_path / "a", append=True)
    with pytest.raises(ValueError, match=r"12 entries \+ 53 shots exceed the memory's 64 rows"):
        enroll(folder, normals, 53, tmp_path / "b", append=True, false_alarm_rate=0.5)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
