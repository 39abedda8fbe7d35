"""KAnoCLIP end to end on the tiny random-weight CLIP: training on two generated textures
reaches pixel AUROC >= 0.9 on an unseen one; the knowledge loss pulls the abnormal prompts
toward their anchors; each image's class reaches the loss, also from the feature cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from edge_inspect.trainer.config import RunConfig, build_head
from edge_inspect.trainer.data.sample import Record
from edge_inspect.trainer.evaluate import evaluate_run, load_head
from edge_inspect.trainer.fit import train
from edge_inspect.trainer.heads.kanoclip.knowledge import KnowledgeError
from edge_inspect.trainer.heads.kanoclip.model import KanoClipHead
from edge_inspect.trainer.heads.kanoclip.train import KanoClipTraining, knowledge_anchors

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs/kanoclip/tiny-synthetic.yaml"


def test_training_on_two_textures_segments_an_unseen_one(kanoclip_run):
    _, _, report = kanoclip_run
    weave = report["datasets"]["synth-target"]["classes"]["weave"]
    assert weave["pixel_auroc"] >= 0.9, weave
    assert weave["image_auroc"] >= 0.9, weave


def _cosines(head: KanoClipHead, anchors: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """Per class: cos(W^a, W*) and cos(W^n, W*) against the anomalous images' anchor."""
    out = {}
    with torch.no_grad():
        for cls, anchor in anchors.items():
            text = head.encode_prompts(cls)
            out[cls] = (float(F.cosine_similarity(text[1], anchor, dim=0)),
                        float(F.cosine_similarity(text[0], anchor, dim=0)))
    return out


def test_the_knowledge_loss_pulls_abnormal_prompts_toward_their_anchors(tmp_path):
    """L_KD alone, 24 steps: cos(W^a, W*) rises (its gap to 1 at least halves) and W^n moves
    away. (The random tiny CLIP's text features all start near cos 0.98 to each other.)"""
    cfg = RunConfig.from_yaml(CONFIG, ["train.steps=24", "head.global_weight=0", "head.local_weight=0"])
    torch.manual_seed(cfg.seed)  # train() builds the head right after seeding: the same init
    before_head = build_head(cfg).eval()
    train(cfg, tmp_path / "run")
    after_head = load_head(cfg, tmp_path / "run" / "checkpoint.safetensors")
    records = [Record(Path(f"{c}.png"), 1, c, "blob") for c in ("stripes", "grain")]
    anchors = dict(zip(("stripes", "grain"), knowledge_anchors(before_head, records), strict=True))
    before, after = _cosines(before_head, anchors), _cosines(after_head, anchors)
    for cls in anchors:
        assert 1 - after[cls][0] < (1 - before[cls][0]) / 2, (cls, before, after)
        assert after[cls][1] < before[cls][1] - 0.05, (cls, before, after)


def test_full_training_separates_the_abnormal_prompts_from_the_normal_ones(kanoclip_run):
    cfg, run, _ = kanoclip_run
    torch.manual_seed(cfg.seed)
    before_head = build_head(cfg).eval()
    after_head = load_head(cfg, run / "checkpoint.safetensors")
    records = [Record(Path(f"{c}.png"), 1, c, "blob") for c in ("stripes", "grain")]
    anchors = dict(zip(("stripes", "grain"), knowledge_anchors(before_head, records), strict=True))
    before, after = _cosines(before_head, anchors), _cosines(after_head, anchors)
    for cls in anchors:  # W^a stays by its anchor while W^n leaves it
        assert after[cls][0] - after[cls][1] > before[cls][0] - before[cls][1] + 0.05, (cls, before, after)


def test_each_image_reaches_the_loss_with_its_own_record_also_from_the_cache(tmp_path, monkeypatch):
    seen = []
    original = KanoClipTraining.loss

    def spy(self, head, inputs, labels, masks, phase, keys=None):
        records = [phase.records[k] for k in keys]
        seen.append([(int(lab), bool(m.any())) == (r.label, bool(r.label)) for lab, m, r in
                     zip(labels, masks, records, strict=True)])
        text = self.batch_text(head, phase.context["class_index"][torch.as_tensor(keys)],
                               phase.context["classes"])
        for i, r in enumerate(records):  # the prompts of the image's own class
            assert torch.allclose(text[i], head.encode_prompts(r.class_name), atol=1e-6)
        return original(self, head, inputs, labels, masks, phase, keys=keys)

    monkeypatch.setattr(KanoClipTraining, "loss", spy)
    cfg = RunConfig.from_yaml(CONFIG, ["train.steps=26"])
    train(cfg, tmp_path / "run")
    assert len(seen) == 26 and all(all(s) for s in seen)  # 12 steps an epoch: two from the cache


def test_training_without_knowledge_or_with_an_unlisted_class_is_refused(tmp_path):
    cfg = RunConfig.from_yaml(CONFIG, ["head.knowledge=[]"])
    with pytest.raises(ValueError, match="set head.knowledge to a knowledge file"):
        train(cfg, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    other = tmp_path / "k.yaml"
    other.write_text("version: 1\nclasses:\n  stripes: {general: [a striped texture with a spot.]}\n")
    cfg = RunConfig.from_yaml(CONFIG, [f"head.knowledge=[{other}]"])
    with pytest.raises(KnowledgeError, match=r"have no class 'grain': add a 'grain:' entry"):
        train(cfg, tmp_path / "b")


def test_evaluation_scores_each_class_with_its_own_prompts(kanoclip_run, tmp_path, monkeypatch):
    cfg, run, _ = kanoclip_run
    calls = []
    original = KanoClipHead.begin_class
    monkeypatch.setattr(KanoClipHead, "begin_class",
                        lambda self, name: (calls.append(name), original(self, name))[1])
    two = RunConfig.from_yaml(run / "config.yaml", [
        "data.target=[{name: t, kind: synthetic, classes: [weave, fine], per_class: 8, seed: 3}]",
        "calibration.normals=0"])
    evaluate_run(two, run / "checkpoint.safetensors", tmp_path / "eval")
    assert calls == ["fine", "weave"]


def test_table_3_ablation_switches_train_and_score(tmp_path):
    """All four modules off (the ablation's first row as we read it): only the two contexts
    train, without a knowledge file; the run evaluates to finite scores."""
    cfg = RunConfig.from_yaml(CONFIG, [
        "train.steps=4", "head.kd_weight=0", "head.knowledge=[]", "head.vv=false",
        "head.global_token=original", "head.bicmci=false", "head.adapter=false"])
    train(cfg, tmp_path / "run")
    head = load_head(cfg, tmp_path / "run" / "checkpoint.safetensors")
    assert sorted(head.trainable_state()) == ["abnormal_context", "normal_context"]
    with torch.no_grad():
        score, amap = head(torch.randn(2, 3, 112, 112))
    assert torch.isfinite(score).all() and torch.isfinite(amap).all()
