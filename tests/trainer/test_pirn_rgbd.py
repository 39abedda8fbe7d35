"""PIRN through the product: `train` fits the decoder on the shots of the generated RGB-D
task, `eval` scores both defect kinds, `export` writes a two-plane bundle that the runtime's
engine runs. Geometry-only dents need the normals plane; colour-only stains the RGB one."""

import json

import numpy as np
import pytest
import torch

from edge_inspect.trainer.config import RunConfig
from edge_inspect.trainer.data.batches import BatchLoader
from edge_inspect.trainer.evaluate import evaluate_run, load_head, score_items
from edge_inspect.trainer.fit import shot_dataset, train
from edge_inspect.trainer.heads.pirn.model import cosine_cost, sinkhorn
from edge_inspect.trainer.metrics import auroc
from tests.conftest import ROOT

CONFIG = ROOT / "configs/pirn/tiny-rgbd.yaml"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny decoder's many small ops (Sinkhorn iterations) run faster on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pirn_runs(tmp_path_factory):
    """The tiny config trained as it is (RGB + normals) and RGB-only."""
    base = tmp_path_factory.mktemp("pirn")
    runs = {}
    for name, overrides in (("rgbd", []), ("rgb", ["head.modalities=[rgb]"])):
        cfg = RunConfig.from_yaml(CONFIG, overrides)
        train(cfg, base / name)
        runs[name] = (cfg, base / name)
    return runs


def _scores_by_kind(cfg, run):
    head = load_head(cfg, run / "checkpoint.safetensors")
    loader = BatchLoader(head.backbone.input_size, head.backbone.normalization, cfg.fit_mode,
                         cfg.interpolation, head.planes)
    test = cfg.target_data[0].open("test")
    scores, maps, _, masks = score_items(head, loader, [(test, i) for i in range(len(test))], 16, "test")
    kinds = np.array([r.defect for r in test.records])
    out = {}
    for kind in ("dent", "stain"):
        sel = (kinds == kind) | (kinds == "good")
        out[kind] = auroc(masks[sel].ravel(), maps[sel].ravel())
    return out, head, loader, test


def test_training_on_the_shots_finds_geometry_and_colour_defects_and_rgb_alone_misses_dents(pirn_runs):
    fused = _scores_by_kind(*pirn_runs["rgbd"])[0]
    rgb_only = _scores_by_kind(*pirn_runs["rgb"])[0]
    assert fused["dent"] >= 0.9 and fused["stain"] >= 0.9, fused
    assert rgb_only["stain"] >= 0.9, rgb_only
    # the dents change no colour: without the normals plane they are not found
    assert rgb_only["dent"] <= 0.7 and rgb_only["dent"] <= fused["dent"] - 0.2, (rgb_only, fused)


def test_trained_sinkhorn_plans_are_balanced(pirn_runs):
    cfg, run = pirn_runs["rgbd"]
    _, head, loader, test = _scores_by_kind(cfg, run)
    batch = loader([(test, i) for i in range(12)])
    with torch.no_grad():
        z = head.encode(batch.images, *batch.planes)
        protos = head.initial_prototypes(12)
        for layer in head.layers:
            refined = {m: layer.refine(z[m], protos[m], m) for m in head.cfg.modalities}
            for m in head.cfg.modalities:
                plan = sinkhorn(cosine_cost(z[m], refined[m]), head.cfg.sinkhorn_eps,
                                head.cfg.sinkhorn_iters)
                k, n = plan.shape[2], plan.shape[1]
                # columns: each prototype takes 1/K of the mass; rows: each token 1/N
                np.testing.assert_allclose(plan.sum(1).numpy() * k, 1.0, atol=1e-3)
                np.testing.assert_allclose(plan.sum(2).numpy() * n, 1.0, atol=0.05)
            z, protos = layer(z, protos)


def test_shots_train_it_and_stay_out_of_calibration_and_test(pirn_runs, tmp_path):
    cfg, run = pirn_runs["rgbd"]
    report = evaluate_run(cfg, run / "checkpoint.safetensors", tmp_path / "eval")
    row = report["datasets"]["rgbd"]["classes"]["sheet"]
    trained_on = [str(r.image) for r in shot_dataset(cfg).records]
    assert row["shots"] == trained_on and len(trained_on) == cfg.shots
    # shots come from the train split; every test image is from the test split
    assert all("/train/" in s for s in trained_on) and row["n_test"] == 150
    assert row["calibration"]["false_alarm"]["n_normal"] == 100
    assert (tmp_path / "eval" / "enrolled" / "rgbd-sheet.safetensors").exists()
    with pytest.raises(ValueError, match="one training run per shot draw"):
        evaluate_run(RunConfig.from_yaml(CONFIG, ["eval.shot_seeds=[1, 2]"]),
                     run / "checkpoint.safetensors", tmp_path / "eval2")


def test_pirn_refuses_auxiliary_data_and_missing_shots(tmp_path):
    aux = RunConfig.from_yaml(CONFIG, ["data.train=[{name: aux, kind: rgbd_synthetic}]"])
    with pytest.raises(ValueError, match="trains on the target's shots, not on auxiliary data"):
        train(aux, tmp_path / "aux")
    assert not (tmp_path / "aux").exists()  # refused before the run folder was written
    rgb_data = RunConfig.from_yaml(CONFIG, ["data.target=[{name: s, kind: synthetic}]"])
    with pytest.raises(ValueError, match="has no 3D data, but the model takes a xyz plane"):
        train(rgb_data, tmp_path / "rgb")


def test_two_plane_bundle_matches_torch_and_runs_in_the_engine(pirn_runs, tmp_path):
    from edge_inspect.export.bundle_writer import export_bundle
    from edge_inspect.runtime.bundle import load_bundle
    from edge_inspect.runtime.engines import open_engine

    cfg, run = pirn_runs["rgbd"]
    out = export_bundle(run, tmp_path / "bundle")
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and parity["planes"] == ["image", "xyz"]
    assert parity["score_max_abs_diff"] <= 1e-4 and parity["map_max_abs_diff"] <= 1e-3
    bundle = load_bundle(out)
    assert [(p.name, p.modality, p.dtype, p.channels, p.interpolation) for p in bundle.inputs] == [
        ("image", "rgb", "uint8", 3, "bilinear"), ("xyz", "xyz", "float32", 3, "nearest")]
    # the engine on raw planes equals the torch head on the same samples, dropouts included
    _, head, loader, test = _scores_by_kind(cfg, run)
    batch = loader([(test, i) for i in (0, 1, 2)])
    xyz = np.stack([test[i].xyz for i in (0, 1, 2)])
    xyz[:, 40:44, 50:54] = 0.0  # a sensor dropout
    frames = np.stack(batch.pictures)
    got = open_engine(bundle).infer({"image": frames, "xyz": xyz})
    with torch.no_grad():
        want_score, want_map = head(batch.images, torch.from_numpy(xyz).permute(0, 3, 1, 2))
    np.testing.assert_allclose(got[bundle.score_output], want_score.numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="--images gives RGB images only"):
        export_bundle(run, tmp_path / "b2", images=tmp_path)
