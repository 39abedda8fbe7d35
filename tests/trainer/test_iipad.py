"""IIPAD through the trainer on generated categories: one generator for three categories,
retrieval by Q-Former tokens, a fourth category added by enrollment alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edge_inspect.trainer.config import RunConfig, build_head
from edge_inspect.trainer.data.batches import BatchLoader
from edge_inspect.trainer.data.synthetic import SyntheticDefects
from edge_inspect.trainer.evaluate import load_head, score_items
from edge_inspect.trainer.metrics import auroc
from tests.conftest import ROOT

CONFIG = ROOT / "configs/iipad/tiny-synthetic.yaml"
CATEGORIES = ("stripes", "grain", "weave")


@pytest.fixture(scope="module")
def trained(iipad_run):
    return iipad_run


def _loader(head, cfg):
    return BatchLoader(head.backbone.input_size, head.backbone.normalization, cfg.fit_mode,
                       cfg.interpolation)


def test_one_generator_for_three_categories_finds_each_ones_defects(trained):
    cfg, run, report = trained
    classes = report["datasets"]["synth"]["classes"]
    assert set(classes) == set(CATEGORIES)
    for name, row in classes.items():
        assert row["pixel_auroc"] >= 0.9, (name, row["pixel_auroc"])
    losses = [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.9 * losses[0], losses  # the generator learned (logged every 10 steps)
    # one memory for every category: the 4 shots of each of the 3
    head = load_head(cfg, run / "checkpoint.safetensors")
    assert head.memory is None  # the checkpoint holds the generator only


def _enrolled(cfg, run, categories, shots_per=4):
    head = load_head(cfg, run / "checkpoint.safetensors")
    loader = _loader(head, cfg)
    data = SyntheticDefects("test", categories, per_class=24, size=128, seed=4)
    shots = {c: [(data, i) for i, r in enumerate(data.records)
                 if r.class_name == c and not r.label][:shots_per] for c in categories}
    head.enroll(loader([item for c in categories for item in shots[c]]).images)
    return head, loader, data, shots


def test_retrieval_returns_the_entries_of_the_images_own_category(trained):
    cfg, run, _ = trained
    head, loader, data, shots = _enrolled(cfg, run, CATEGORIES)
    owner = [c for c in CATEGORIES for _ in shots[c]]  # the category of each memory entry
    taken = {i for c in CATEGORIES for _, i in shots[c]}
    queries = [(data, i) for i, r in enumerate(data.records) if i not in taken]
    with torch.no_grad():
        keys = head.forward_with_features(loader(queries).images)[2]["keys"]
        idx, _ = head.retrieve(keys)
    assert idx.shape == (len(queries), 4)  # retrieve = the run's shots
    own = [[owner[j] == data.records[i].class_name for j in row]
           for (_, i), row in zip(queries, idx.tolist(), strict=True)]
    # a random tiny Q-Former's tokens barely differ between images (key similarities of
    # 0.999+), yet retrieval by them finds the category: by chance an entry would match 1
    # time in 3, and all 4 entries of a query 1 time in 495
    assert np.mean([all(o) for o in own]) >= 0.9, own
    assert np.mean(own) >= 0.9


def _pixel_auroc(head, loader, data, category):
    items = [(data, i) for i, r in enumerate(data.records) if r.class_name == category]
    _, maps, _, masks = score_items(head, loader, items, 16, category)
    return auroc(masks.ravel(), maps.ravel())


def test_a_fourth_category_becomes_detectable_by_enrollment_alone(trained):
    cfg, run, _ = trained
    head, loader, _, _ = _enrolled(cfg, run, CATEGORIES)
    generator = {k: v.clone() for k, v in head.generator.state_dict().items()}
    new = SyntheticDefects("test", ("fine",), per_class=24, size=128, seed=5)
    before = _pixel_auroc(head, loader, new, "fine")
    shots = [(new, i) for i, r in enumerate(new.records) if r.label == 0][:4]
    head.append(loader(shots).images)
    assert int(head.memory["valid"].sum()) == 16
    rest = SyntheticDefects("test", ("fine",), per_class=24, size=128, seed=6)  # unseen images
    after = _pixel_auroc(head, loader, rest, "fine")
    print(f"fourth category pixel AUROC: {before:.3f} before enrollment, {after:.3f} after")
    assert after >= 0.9 and after > before + 0.05, (before, after)
    for k, v in head.generator.state_dict().items():
        assert torch.equal(v, generator[k])  # no retraining


def test_padding_is_never_retrieved_and_limits_are_named(trained):
    cfg, run, _ = trained
    head = load_head(cfg, run / "checkpoint.safetensors")
    loader = _loader(head, cfg)
    data = SyntheticDefects("train", ("grain",), per_class=6, size=128, seed=3)
    images = loader([(data, i) for i in range(6)]).images
    head.enroll(images[:4])
    with torch.no_grad():
        keys = head.forward_with_features(images[4:])[2]["keys"]
        state = head.memory_state()
        state["keys"][:4] = -keys[0]  # the valid entries now look least like the query...
        head.load_memory_state(state)
        idx, sim = head.retrieve(keys[:1])
    assert sorted(idx[0].tolist()) == [0, 1, 2, 3]  # ...and are still the only ones taken
    assert float(sim.max()) < -0.5
    with pytest.raises(ValueError, match="exceed the memory.s 64 rows: evaluate the run with --set "
                                         "head.capacity"):
        head.append(torch.zeros(61, *images.shape[1:]))
    with pytest.raises(ValueError, match="a new category needs at least head.retrieve = 4 images"):
        head.append(images[:2])
    state["valid"][1], state["valid"][10] = 0.0, 1.0  # a hole at row 1, an entry at row 10
    state["keys"][10] = 5.0
    head.load_memory_state(state)
    head.append(images[:4])
    grown = head.memory
    assert grown["valid"][:8].all() and int(grown["valid"].sum()) == 8  # valid rows first
    torch.testing.assert_close(grown["keys"][3], state["keys"][10])  # row 10 kept, row 1 dropped
    state["valid"][:] = 0
    state["valid"][:2] = 1
    with pytest.raises(ValueError, match="holds 2 entries, fewer than head.retrieve = 4"):
        head.load_memory_state(state)


@torch.no_grad()
def test_official_image_score_subtracts_normal_probability_and_key_similarity(trained):
    cfg, run, _ = trained
    head, loader, data, _ = _enrolled(cfg, run, CATEGORIES)
    images = loader([(data, i) for i in (1, 3, 30)]).images
    paper = head(images)[0]
    head.cfg.image_score = "official"
    official = head(images)[0]
    feats = head.encode(images)
    entry = head.forward_with_features(images)[2]
    idx, sim = head.retrieve(entry["keys"])
    g = F.normalize(feats["g"], dim=-1)
    p_normal = torch.zeros(3)
    for b in range(3):  # the code's order: each retrieved entry's softmax, then the mean
        for j in idx[b].tolist():
            pair = head.memory["prompts"][j] @ g[b] / 0.07
            p_normal[b] += pair.softmax(dim=0)[0] / idx.shape[1]
    torch.testing.assert_close(official, paper - p_normal - sim.mean(dim=1), atol=1e-5, rtol=1e-5)


def test_the_edge_variant_needs_no_qformer_and_keys_on_the_class_token():
    cfg = RunConfig.from_yaml(CONFIG, ["head.condition=class_token", "head.qformer=null"])
    head = build_head(cfg).eval()
    assert head.qformer is None
    images = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        score, amap, entry = head.forward_with_features(images)
        g = head.encode(images)["g"]
    assert score.shape == (3,) and amap.shape == (3, 112, 112)
    torch.testing.assert_close(entry["keys"][:, 0], F.normalize(g, dim=-1))
    with pytest.raises(ValueError, match="needs head.qformer"):
        build_head(RunConfig.from_yaml(CONFIG, ["head.qformer=null"]))
