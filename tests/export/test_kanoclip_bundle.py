"""KAnoCLIP as a bundle: the text features are baked (no text tower in the graph), Bi-CMCI's
deformable attention exports as GridSample, the parity gate passes, and ``--class``
chooses which class's prompts are baked."""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnx
import pytest
import torch

from edge_inspect.export import cli
from edge_inspect.export.bundle_writer import export_bundle
from edge_inspect.runtime.bundle import load_bundle
from edge_inspect.runtime.engines import open_engine
from edge_inspect.trainer.data.transforms import fit_image, to_batch
from edge_inspect.trainer.evaluate import load_head


@pytest.fixture(scope="module")
def bundle(kanoclip_run, tmp_path_factory):
    _, run, _ = kanoclip_run
    return export_bundle(run, tmp_path_factory.mktemp("kanoclip-bundle") / "b")


def _frames(cfg, head, indices):
    ds = cfg.target_data[0].open()
    size = head.backbone.input_size
    pictures = [fit_image(ds[i].image, size, cfg.fit_mode, cfg.interpolation) for i in indices]
    return np.stack(pictures), to_batch(pictures, size, head.backbone.normalization, cfg.fit_mode)


def test_the_graph_holds_no_text_tower_and_passes_parity(bundle):
    report = json.loads((bundle / "parity.json").read_text())
    assert report["passed"] and report["score_max_abs_diff"] <= 1e-4 and report["map_max_abs_diff"] <= 1e-3
    model = onnx.load(str(bundle / "model.onnx"))
    assert model.opset_import[0].version >= 17
    ops = {n.op_type for n in model.graph.node}
    assert "GridSample" in ops  # deformable self-attention
    assert "Trilu" not in ops and "ArgMax" not in ops  # the text tower's causal mask and EOT pick
    shapes = {tuple(i.dims) for i in model.graph.initializer}
    assert (77, 64) not in shapes and (49408, 64) not in shapes  # text positions, token table
    manifest = load_bundle(bundle).manifest
    assert manifest["config"]["head"]["export_class"] == "weave"
    assert manifest["baked"] == {"prompt_class": "weave", "class_words": "woven fabric", "in_knowledge": True,
                                 "normal_prompts": ["normal woven fabric.", "perfect woven fabric."],
                                 "abnormal_prompts": ["abnormal woven fabric.", "defective woven fabric."],
                                 "context_tokens": 4}


def test_the_engine_matches_torch_on_new_frames(bundle, kanoclip_run):
    cfg, run, _ = kanoclip_run
    head = load_head(cfg, run / "checkpoint.safetensors")
    head.begin_class("weave")
    frames, batch = _frames(cfg, head, (2, 5, 9))
    with torch.no_grad():
        want_score, want_map = head(batch)
    out = open_engine(load_bundle(bundle)).infer({"image": frames})
    assert np.abs(out["image_score"] - want_score.numpy()).max() <= 1e-4
    assert np.abs(out["anomaly_map"] - want_map.numpy()).max() <= 1e-3


def test_the_class_option_bakes_another_class(bundle, kanoclip_run, tmp_path, capsys):
    cfg, run, _ = kanoclip_run
    args = argparse.ArgumentParser()
    cli.add_arguments(args)
    argv = ["--run", str(run), "--out", str(tmp_path / "s"), "--class", "stripes"]
    assert cli.run(args.parse_args(argv)) == 0
    assert "prompts baked for class 'stripes': 'abnormal striped texture.'" in capsys.readouterr().out
    head = load_head(cfg, run / "checkpoint.safetensors")
    head.begin_class("stripes")
    frames, batch = _frames(cfg, head, (1, 4))
    with torch.no_grad():
        want = head(batch)[0].numpy()
    stripes = open_engine(load_bundle(tmp_path / "s")).infer({"image": frames})["image_score"]
    weave = open_engine(load_bundle(bundle)).infer({"image": frames})["image_score"]
    assert np.abs(stripes - want).max() <= 1e-4 and np.abs(stripes - weave).max() > 1e-3


def test_the_class_option_is_refused_for_a_method_without_class_prompts(runs, tmp_path):
    with pytest.raises(ValueError, match="afclip has no class-conditioned prompts; drop --class"):
        export_bundle(runs["afclip"], tmp_path / "x", prompt_class="bottle")
    assert not (tmp_path / "x").exists()


def test_a_class_no_knowledge_file_lists_is_exported_with_a_warning(kanoclip_run, tmp_path, caplog):
    _, run, _ = kanoclip_run
    out = export_bundle(run, tmp_path / "m", prompt_class="metal_nut", parity_count=2)
    assert "'metal_nut' is in no knowledge file" in caplog.text and "'metal nut'" in caplog.text
    baked = load_bundle(out).manifest["baked"]
    assert baked["abnormal_prompts"] == ["abnormal metal nut.", "defective metal nut."]
