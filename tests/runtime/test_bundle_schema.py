"""Bundle schema 2: schema-1 bundles still load and score alike; every manifest field and
file name is checked before anything is opened; outputs are found by role."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_inspect.runtime.bundle import BundleError, load_bundle
from edge_inspect.runtime.engines import open_engine

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "bundles" / "memory-schema1"


@pytest.fixture()
def schema1(tmp_path) -> Path:
    dst = tmp_path / "b1"
    shutil.copytree(FIXTURE, dst)
    return dst


def _edit(root: Path, **changes) -> None:
    m = json.loads((root / "manifest.json").read_text())
    m.update(changes)
    (root / "manifest.json").write_text(json.dumps(m))


def test_a_schema_1_bundle_loads_as_schema_2_and_scores_as_when_written(schema1):
    bundle = load_bundle(schema1)
    assert bundle.schema_read == 1 and bundle.manifest["schema_version"] == 2
    (plane,) = bundle.inputs
    assert (plane.name, plane.modality, plane.shape, plane.fit, plane.interpolation) == (
        "image", "rgb", (248, 248, 3), "center_crop", "none")
    assert (bundle.score_output, bundle.map_output) == ("image_score", "anomaly_map")
    assert bundle.memory_recipe["kind"] == "patch_memory" and bundle.state == []
    expected = json.loads((FIXTURE.parent / "memory-schema1.expected.json").read_text())
    frames = np.random.default_rng(0).integers(0, 256, (3, 248, 248, 3), dtype=np.uint8)
    out = open_engine(bundle).infer({"image": frames})
    np.testing.assert_allclose(out["image_score"], expected["image_score"], rtol=1e-5)
    np.testing.assert_allclose(out["anomaly_map"].sum(axis=(1, 2)), expected["anomaly_map_sum"], rtol=1e-4)


def test_enrolling_a_schema_1_bundle_writes_schema_2(schema1, tmp_path):
    import cv2

    from edge_inspect.runtime.enroll import enroll

    normals = tmp_path / "normals"
    normals.mkdir()
    rng = np.random.default_rng(3)
    base = rng.integers(90, 160, (250, 250, 3), dtype=np.uint8)
    for i in range(14):
        noise = rng.integers(-6, 7, base.shape)
        cv2.imwrite(str(normals / f"{i:02d}.png"), np.clip(base + noise, 0, 255).astype(np.uint8))
    out = enroll(schema1, normals, shots=2, out=tmp_path / "b2", false_alarm_rate=0.1)
    new = load_bundle(out)
    assert new.schema_read == 2 and new.manifest["memory"]["recipe"]["kind"] == "patch_memory"
    assert new.manifest["shots"] == 2 and load_bundle(schema1).schema_read == 1  # old one kept


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "sub/model.onnx", "..", ""])
def test_file_names_outside_the_bundle_are_refused_before_opening(schema1, name):
    m = json.loads((schema1 / "manifest.json").read_text())
    digest = m["files"].pop("model.onnx")
    m["files"][name] = digest
    m["model"] = name
    (schema1 / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="not a plain file name inside the bundle folder"):
        load_bundle(schema1)


def test_a_model_or_memory_file_not_checksummed_is_refused(schema1):
    _edit(schema1, model="parity.json.bak")
    with pytest.raises(BundleError, match="'model' names 'parity.json.bak', which is not checksummed"):
        load_bundle(schema1)


@pytest.mark.parametrize("changes, message", [
    ({"threshold": {"threshold": "0.5"}}, "threshold 'threshold' must be a finite number"),
    ({"files": ["model.onnx"]}, "'files' must be a dict"),
    ({"schema_version": True}, "schema version True"),
])
def test_manifest_fields_are_typed(schema1, changes, message):
    _edit(schema1, **changes)
    with pytest.raises(BundleError, match=message):
        load_bundle(schema1)


def _schema2(root: Path) -> dict:
    return load_bundle(root).manifest  # the upgraded form, written back as a schema-2 file


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["inputs"][0].update(size=[-1, 248]), r"inputs\[0\] 'size' must be \[height, width\]"),
    (lambda m: m["inputs"][0].update(modality="thermal"), r"'modality' is 'thermal'; allowed"),
    (lambda m: m["inputs"].append(dict(m["inputs"][0], name="xyz", modality="xyz", dtype="float32",
                                       interpolation="bicubic")),
     r"inputs\[1\] is a xyz plane with interpolation 'bicubic'; geometry takes"),
    (lambda m: m["outputs"][0].update(role="heat"), r"outputs\[0\] 'role' is 'heat'"),
    (lambda m: m["outputs"][1].update(role="score"), "exactly one output with role 'score'"),
    (lambda m: m.update(state=[{"name": "p", "input": "state.p", "output": "nope",
                                "initial": {"shape": [2], "fill": 0.0}}]),
     "state 'p' reads output 'nope'"),
    (lambda m: m.update(state=[{"name": "p", "input": "s", "output": "o", "reset": ["reboot"],
                                "initial": {"shape": [2]}}]), "unknown rules"),
    (lambda m: m["memory"].update(recipe={"metric": "cosine"}), r"memory.recipe lacks 'kind'"),
    (lambda m: m.update(method=3), "'method' must be a str"),
])
def test_schema_2_sections_are_checked(schema1, edit, message):
    m = _schema2(schema1)
    edit(m)
    (schema1 / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=message):
        load_bundle(schema1)


def test_outputs_are_found_by_role_not_by_name(schema1, tmp_path):
    """Rename the graph's outputs and the manifest's: the engine still serves score and map."""
    import onnx

    m = _schema2(schema1)
    model = onnx.load(str(schema1 / "model.onnx"))
    renames = {"image_score": "verdict", "anomaly_map": "heat"}
    for node in model.graph.node:
        node.output[:] = [renames.get(o, o) for o in node.output]
    for out in model.graph.output:
        out.name = renames.get(out.name, out.name)
    onnx.save(model, str(schema1 / "model.onnx"))
    from edge_inspect.runtime.bundle import sha256_file

    for o in m["outputs"]:
        o["name"] = renames.get(o["name"], o["name"])
    m["files"]["model.onnx"] = sha256_file(schema1 / "model.onnx")
    (schema1 / "manifest.json").write_text(json.dumps(m))
    bundle = load_bundle(schema1)
    assert (bundle.score_output, bundle.map_output) == ("verdict", "heat")
    out = open_engine(bundle).infer({"image": np.zeros((1, 248, 248, 3), np.uint8)})
    assert set(out) == {"verdict", "heat"} and out["heat"].shape == (1, 248, 248)


def test_per_category_banks_are_loaded_and_selected(schema1):
    m = _schema2(schema1)
    from edge_inspect.runtime.bundle import sha256_file

    with np.load(schema1 / "memory.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays["local_reference"] = arrays["local_reference"] * 2  # another part, another bank
    np.savez(schema1 / "memory-bolt.npz", **arrays)
    m["memory"]["categories"] = {"bolt": {"file": "memory-bolt.npz", "arrays": m["memory"]["arrays"]}}
    m["files"]["memory-bolt.npz"] = sha256_file(schema1 / "memory-bolt.npz")
    (schema1 / "manifest.json").write_text(json.dumps(m))
    bundle = load_bundle(schema1)
    assert bundle.categories == ["bolt"]
    engine = open_engine(bundle)
    frame = {"image": np.random.default_rng(1).integers(0, 256, (1, 248, 248, 3), dtype=np.uint8)}
    default, bolt = engine.infer(frame)["anomaly_map"], engine.infer(frame, category="bolt")["anomaly_map"]
    np.testing.assert_allclose(bolt, default / 2, rtol=1e-4)  # the map is patch distance / reference
    with pytest.raises(BundleError, match="no memory bank for category 'nut'"):
        engine.infer(frame, category="nut")


def test_a_file_linked_from_outside_the_bundle_is_refused(schema1, tmp_path):
    """A symlink passes the name check and, with the right sha256, the checksum: refused too."""
    outside = tmp_path / "elsewhere.onnx"
    shutil.move(schema1 / "model.onnx", outside)
    (schema1 / "model.onnx").symlink_to(outside)
    with pytest.raises(BundleError, match="outside the bundle folder; copy the file into the bundle"):
        load_bundle(schema1)


def test_memory_arrays_must_have_their_declared_shapes(schema1):
    m = _schema2(schema1)
    key = next(iter(m["memory"]["arrays"]))
    m["memory"]["arrays"][key] = [-8]
    (schema1 / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=rf"declares array '{key}' with shape \[-8\]"):
        load_bundle(schema1)


def test_serve_with_a_broken_bundle_is_one_line_and_exit_2(schema1, tmp_path, capsys):
    import yaml

    from edge_inspect.runtime.cli import main

    _edit(schema1, threshold={"threshold": "0.5"})
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump({"bundle": str(schema1), "endpoint_dir": str(tmp_path / "ep"),
                                       "cameras": [{"id": "a", "source": "synthetic"}]}))
    assert main(["serve", "--config", str(profile)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "threshold 'threshold' must be a finite number" in err
