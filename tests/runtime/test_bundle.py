"""Bad bundles get a clear error naming the problem, never a crash deep in ONNX Runtime."""

import json
import shutil

import numpy as np
import pytest

from edge_inspect.runtime.bundle import BundleError, load_bundle
from edge_inspect.runtime.engines import EngineError, open_engine


@pytest.fixture()
def copy(bundles, tmp_path):
    def make(name="cmad+"):
        dst = tmp_path / name
        shutil.copytree(bundles[name], dst)
        return dst
    return make


def _edit_manifest(root, **changes):
    m = json.loads((root / "manifest.json").read_text())
    m.update(changes)
    (root / "manifest.json").write_text(json.dumps(m))


def test_missing_manifest_and_file(copy):
    root = copy()
    (root / "memory.npz").unlink()
    with pytest.raises(BundleError, match="memory.npz is missing"):
        load_bundle(root)
    (root / "manifest.json").unlink()
    with pytest.raises(BundleError, match="not a bundle.*edge-inspect export"):
        load_bundle(root)


def test_checksum_mismatch(copy):
    root = copy()
    data = bytearray((root / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (root / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.onnx does not match its sha256"):
        load_bundle(root)


def test_unknown_schema_and_broken_manifest(copy):
    root = copy()
    _edit_manifest(root, schema_version=99)
    with pytest.raises(BundleError, match="schema version 99"):
        load_bundle(root)
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(root)
    (root / "manifest.json").write_text(json.dumps({"schema_version": 1}))
    with pytest.raises(BundleError, match="lacks"):
        load_bundle(root)


def test_wrong_input_size_dtype_and_outputs(bundles):
    bundle = load_bundle(bundles["cmad"])
    engine = open_engine(bundle)
    h, w, _ = bundle.image.shape
    with pytest.raises(BundleError, match=rf"needs \(batch, {h}, {w}, 3\)"):
        engine.infer({"image": np.zeros((1, h + 8, w, 3), np.uint8)})
    with pytest.raises(BundleError, match="needs dtype uint8"):
        engine.infer({"image": np.zeros((1, h, w, 3), np.float32)})
    with pytest.raises(BundleError, match="numpy array"):
        engine.infer({"image": [[0]]})
    with pytest.raises(BundleError, match="must be a mapping"):
        engine.infer(np.zeros((1, h, w, 3), np.uint8))
    with pytest.raises(BundleError, match=r"missing planes \['image'\], unknown \['depth'\]"):
        engine.infer({"depth": np.zeros((1, h, w, 1), np.uint8)})
    with pytest.raises(EngineError, match="no outputs"):
        engine.infer({"image": np.zeros((1, h, w, 3), np.uint8)}, ["heatmap"])
    single = engine.infer({"image": np.zeros((h, w, 3), np.uint8)})  # one frame without a batch axis
    assert single["image_score"].shape == (1,)


def test_unknown_backend_and_provider(bundles):
    bundle = load_bundle(bundles["cmad"])
    with pytest.raises(EngineError, match="backend 'tvm' unknown"):
        open_engine(bundle, "tvm")
    with pytest.raises(EngineError, match="provider 'npu' unknown|lacks"):
        open_engine(bundle, providers=["npu"])
