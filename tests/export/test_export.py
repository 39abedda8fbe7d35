"""Export: bundles for every method pass the parity gate; a graph that drifts is refused."""

import json

import numpy as np
import pytest
import torch

from export.bundle_writer import ParityError, export_bundle
from export.graph import ExportGraph
from runtime.bundle import load_bundle
from runtime.engines import open_engine
from tests.conftest import enrolled
from trainer.config import RunConfig
from trainer.data.transforms import fit_image, to_batch
from trainer.evaluate import load_head

ALL = ("afclip", "afclip+", "cmad", "cmad+", "memory")


@pytest.mark.parametrize("name", ALL)
def test_bundle_passes_parity_and_serves(bundles, name):
    root = bundles[name]
    report = json.loads((root / "parity.json").read_text())
    assert report["passed"] and report["images"] == 8
    assert report["score_max_abs_diff"] <= 1e-4 and report["map_max_abs_diff"] <= 1e-3
    bundle = load_bundle(root)
    m = bundle.manifest
    assert m["input"]["dtype"] == "uint8" and m["input"]["layout"] == "NHWC"
    assert set(m["files"]) >= {"model.onnx", "parity.json"}
    few = name.endswith("+") or name == "memory"
    assert bool(bundle.memory) == few and (m["threshold"] is not None) == few
    import onnx

    model = onnx.load(str(bundle.model_path))
    assert model.opset_import[0].version >= 17
    ops = {n.op_type for n in model.graph.node}
    if name.startswith("afclip"):  # text features baked: no text tower (its causal mask) inside
        assert "Trilu" not in ops and "LayerNormalization" in ops
    engine = open_engine(bundle)
    h, w, _ = bundle.image.shape
    frames = np.random.default_rng(0).integers(0, 256, (3, h, w, 3), dtype=np.uint8)
    out = engine.infer(frames)
    assert out["image_score"].shape == (3,) and out["anomaly_map"].shape == (3, h, w)


@pytest.mark.parametrize("name", ALL)
def test_engine_matches_torch_on_new_frames(runs, bundles, name):
    """Beyond the export's own check: other frames, another batch size, via the runtime engine."""
    method = name.rstrip("+")
    run = runs[method]
    ckpt = enrolled(run) if (name.endswith("+") or name == "memory") else run / "checkpoint.safetensors"
    cfg = RunConfig.from_yaml(run / "config.yaml")
    head = load_head(cfg, ckpt)
    ds = (cfg.target_data or cfg.train_data)[0].open()
    size = head.backbone.input_size
    pictures = [fit_image(ds[i].image, size, cfg.fit_mode) for i in (1, 3, 4)]
    with torch.no_grad():
        want_score, want_map = head(to_batch(pictures, size, head.backbone.normalization, cfg.fit_mode))
    out = open_engine(load_bundle(bundles[name])).infer(np.stack(pictures))
    assert np.abs(out["image_score"] - want_score.numpy()).max() <= 1e-4
    assert np.abs(out["anomaly_map"] - want_map.numpy()).max() <= 1e-3


def test_parity_gate_refuses_a_drifting_graph(runs, tmp_path, monkeypatch):
    original = ExportGraph.forward

    def drift(self, image, *memory):
        score, amap, *rest = original(self, image, *memory)
        return (score + 1e-3, amap, *rest)  # what a wrong export would do to the scores

    monkeypatch.setattr(ExportGraph, "forward", drift)
    with pytest.raises(ParityError, match="disagrees"):
        export_bundle(runs["cmad"], tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.*"))


def test_export_refuses_to_overwrite_and_needs_memory(runs, bundles):
    with pytest.raises(FileExistsError, match="never overwritten"):
        export_bundle(runs["cmad"], bundles["cmad"])
    with pytest.raises(ValueError, match="enrolled"):
        export_bundle(runs["memory"], bundles["memory"].parent / "no-memory")
