"""Export: bundles for every method pass the parity gate; a graph that drifts is refused."""

import json

import numpy as np
import pytest
import torch

from edge_inspect.export.bundle_writer import ParityError, export_bundle
from edge_inspect.export.graph import ExportGraph
from edge_inspect.runtime.bundle import load_bundle
from edge_inspect.runtime.engines import open_engine
from edge_inspect.trainer.config import RunConfig
from edge_inspect.trainer.data.transforms import fit_image, to_batch
from edge_inspect.trainer.evaluate import load_head
from tests.conftest import enrolled

ALL = ("afclip", "afclip+", "cmad", "cmad+", "memory")


@pytest.mark.parametrize("name", ALL)
def test_bundle_passes_parity_and_serves(bundles, name):
    root = bundles[name]
    report = json.loads((root / "parity.json").read_text())
    assert report["passed"] and report["images"] == 8
    assert report["score_max_abs_diff"] <= 1e-4 and report["map_max_abs_diff"] <= 1e-3
    bundle = load_bundle(root)
    m = bundle.manifest
    assert m["schema_version"] == 2 and bundle.schema_read == 2
    (plane,) = m["inputs"]
    assert plane["dtype"] == "uint8" and plane["layout"] == "NHWC" and plane["modality"] == "rgb"
    # the tiny configs exercise PIL's antialiased bicubic and CMAD's short-side crop
    want_fit = {"afclip": ("resize", "bicubic_antialias"), "cmad": ("short_side_crop", "bicubic_antialias"),
                "memory": ("center_crop", "none")}[name.rstrip("+")]
    assert (plane["fit"], plane["interpolation"]) == want_fit
    assert {o["name"]: o["role"] for o in m["outputs"]}.items() >= {"image_score": "score",
                                                                     "anomaly_map": "map"}.items()
    assert m["state"] == []
    assert set(m["files"]) >= {"model.onnx", "parity.json"}
    few = name.endswith("+") or name == "memory"
    assert bool(bundle.memory) == few and (m["threshold"] is not None) == few
    if few:  # the enrollment recipe comes from the method's spec, not from the trainer config
        assert m["memory"]["recipe"]["kind"] == ("patch_memory" if name == "memory" else "bank_per_set")
    import onnx

    model = onnx.load(str(bundle.model_path))
    assert model.opset_import[0].version >= 17
    ops = {n.op_type for n in model.graph.node}
    if name.startswith("afclip"):  # text features baked: no text tower (its causal mask) inside
        assert "Trilu" not in ops and "LayerNormalization" in ops
    engine = open_engine(bundle)
    h, w, _ = bundle.image.shape
    frames = np.random.default_rng(0).integers(0, 256, (3, h, w, 3), dtype=np.uint8)
    out = engine.infer({"image": frames})
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
    pictures = [fit_image(ds[i].image, size, cfg.fit_mode, cfg.interpolation) for i in (1, 3, 4)]
    with torch.no_grad():
        want_score, want_map = head(to_batch(pictures, size, head.backbone.normalization, cfg.fit_mode))
    bundle = load_bundle(bundles[name])
    plane = bundle.image  # the runtime fits raw frames with the plane's own fit and interpolation
    served = [fit_image(ds[i].image, (plane.height, plane.width), plane.fit, plane.interpolation)
              for i in (1, 3, 4)]
    assert all(np.array_equal(a, b) for a, b in zip(served, pictures, strict=True))
    out = open_engine(bundle).infer({"image": np.stack(pictures)})
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
