"""CMAD: prototype scores, harmonization weights, discrepancy memory, ablation modes."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from edge_inspect.trainer.backbones import BackboneSpec, build_clip
from edge_inspect.trainer.config import RunConfig
from edge_inspect.trainer.data.batches import BatchLoader
from edge_inspect.trainer.data.synthetic import SyntheticDefects
from edge_inspect.trainer.heads.cmad import CmadConfig, CmadHead, prototype_score, topk_mean

ROOT = Path(__file__).resolve().parents[2]


def _head(sets=("a", "b"), **kw):
    torch.manual_seed(0)
    clip = build_clip(BackboneSpec(kind="clip", arch="tiny-p8-w96", input_size=64))
    return CmadHead(clip, list(sets), CmadConfig(taps=(1, 2, 4), topk=20, **kw)).eval()


def test_prototype_score_is_eq2():
    torch.manual_seed(0)
    f, protos = torch.randn(3, 8), torch.randn(2, 2, 8)
    got = prototype_score(f, protos, 0.07)
    for m in range(2):
        cn = F.cosine_similarity(f, protos[m, 0:1], dim=-1)
        ca = F.cosine_similarity(f, protos[m, 1:2], dim=-1)
        want = torch.exp(ca / 0.07) / (torch.exp(cn / 0.07) + torch.exp(ca / 0.07))
        assert torch.allclose(got[:, m], want, atol=1e-5)


def test_topk_mean():
    maps = torch.arange(20.0).reshape(2, 2, 5)
    assert torch.equal(topk_mean(maps, 3), torch.tensor([8.0, 18.0]))


def test_ablation_weights():
    head = _head()
    f_g = torch.randn(4, head.global_prototypes.shape[-1])
    for mode in ("harmonized", "max", "mean", "set:b"):
        head.set_variant(mode)
        w = head.set_weights(f_g)
        assert w.shape == (4, 2) and torch.allclose(w.sum(1), torch.ones(4))
    head.set_variant("max")
    assert torch.equal(head.set_weights(f_g).argmax(1), head.relevance(f_g).argmax(1))
    head.set_variant("set:b")
    assert torch.equal(head.set_weights(f_g), torch.tensor([[0.0, 1.0]] * 4))
    head.set_variant("mean")
    assert torch.allclose(head.set_weights(f_g), torch.full((4, 2), 0.5))
    head.set_variant(None)  # back to the configured harmonization: Eq. 8
    assert head.cfg.tau_prime == 0.04  # the official code's harmonization temperature
    assert torch.allclose(head.set_weights(f_g), torch.softmax(head.relevance(f_g) / 0.04, 1))
    with pytest.raises(ValueError, match="aggregation"):
        head.set_variant("set:nope")
    assert _head(aggregation="best").evaluation_variants() == ["set:a", "set:b"]


def test_components_and_discrepancy_memory_equal_formulas():
    head = _head()
    torch.manual_seed(1)
    shots, x = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f_g, f_l = head.features(x)
        w = head.set_weights(f_g)
        s_g = (w * prototype_score(f_g, head.global_prototypes, 0.07)).sum(1)
        s_l = torch.stack([(w[:, None] * prototype_score(f, head.local_prototypes, 0.07)).sum(-1)
                           for f in f_l]).mean(0)
        up = head._upsample(s_l)
        assert head.cfg.lam == 0.8  # the official code's 0.8 global + 0.2 local
        s_z = 0.8 * s_g + 0.2 * topk_mean(up, 20)
        got, amap = head(x)
        assert torch.allclose(got, s_z, atol=1e-6) and torch.allclose(amap, up)
        head.enroll(shots)
        _, f_shot = head.features(shots)
        q = []
        for fs, fq in zip(f_shot, f_l, strict=True):  # Eq. 12 by brute force
            bank = F.normalize(fs.reshape(-1, fs.shape[-1]), dim=-1)
            q.append(((1 - F.normalize(fq, dim=-1) @ bank.T) / 2).amin(-1))
        q_grid = torch.stack(q).mean(0)  # Eq. 13
        few, _ = head(x)  # Eq. 14 as the code: the maximum of the q grid, lambda' 0.5
        assert torch.allclose(few, 0.5 * s_z + 0.5 * q_grid.amax(1), atol=1e-5)
        head.cfg.vdi_score = "topk_map"  # Eq. 14 read literally: Topk of the upsampled map
        few, _ = head(x)
        assert torch.allclose(few, 0.5 * s_z + 0.5 * topk_mean(head._upsample(q_grid), 20), atol=1e-5)
    head.clear_memory()
    for comp, want in (("global", s_g), ("local", topk_mean(up, 20))):
        head.cfg.components = comp
        with torch.no_grad():
            assert torch.allclose(head(x)[0], want, atol=1e-6)


def test_harmonization_favours_the_matching_dataset(tmp_path):
    """Sets trained on stripes and on grain: stripes images weight the stripes set, and back.

    With ``prototype_init: class_mean``. On this random-weight tiny CLIP the code's
    N(0, 0.02^2) start gives the global prototypes no dataset identity (training only
    separates normal from anomalous), so harmonization cannot favour a set; measured with
    train.steps=150: 0 % / 12 % of the images weight their own set most."""
    from edge_inspect.trainer.evaluate import load_head
    from edge_inspect.trainer.fit import train

    cfg = RunConfig.from_yaml(ROOT / "configs/cmad/tiny-synthetic.yaml", ["head.prototype_init=class_mean"])
    ckpt = train(cfg, tmp_path / "run")
    head = load_head(cfg, ckpt)
    loader = BatchLoader(head.backbone.input_size, head.backbone.normalization, cfg.fit_mode,
                         cfg.interpolation)
    for style, own in (("stripes", 0), ("grain", 1)):
        ds = SyntheticDefects("test", (style,), per_class=16, seed=7)  # unseen images
        with torch.no_grad():
            f_g, _ = head.features(loader([(ds, i) for i in range(len(ds))]).images)
            w = head.set_weights(f_g)
        assert torch.allclose(w.sum(1), torch.ones(len(ds)), atol=1e-6)
        assert (w[:, own] > 0.5).float().mean() >= 0.9, (style, w)


@pytest.mark.parametrize("space,dim", [("width", 96), ("width_ln", 96), ("joint", 40)])
def test_local_features_space(space, dim):
    """The code's local prototypes and memory live in the width space (1280-d for its
    ViT-H/14); ``joint`` is the projected embedding space."""
    head = _head(local_space=space)
    assert head.local_prototypes.shape == (2, 2, dim) and head.global_prototypes.shape == (2, 2, 40)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, f_l = head.features(x)
        taps = head.backbone.forward_taps(x, (1, 2, 4))
    raw = taps[2][:, 1:]
    want = {"width": raw, "width_ln": head.backbone.ln_post(raw),
            "joint": head.backbone.project(raw)}[space]
    assert torch.allclose(f_l[1], want)


def test_prototypes_start_as_the_code_does():
    head = _head()
    for p in (head.global_prototypes, head.local_prototypes):
        assert abs(float(p.detach().std()) - 0.02) < 0.006 and abs(float(p.detach().mean())) < 0.01
    with pytest.raises(ValueError, match="prototype_init 'zeros' unknown"):
        _head(prototype_init="zeros")


def test_per_batch_harmonization_reproduces_the_code_and_is_not_exportable():
    """The code weights sets with the normalized mean f_g of the test batch: every image of
    a batch gets the same weights, and a score moves when a neighbour changes."""
    per_image, per_batch = _head(), _head(harmonization="per_batch")
    torch.manual_seed(3)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        f_g, _ = per_batch.features(x)
        w = per_batch.set_weights(f_g)
        mean = F.normalize(f_g.mean(0), dim=-1)
        protos = F.normalize(per_batch.global_prototypes, dim=-1)
        d = (protos @ mean).amax(-1)
        assert torch.allclose(w, torch.softmax(d / 0.04, 0).expand(4, -1), atol=1e-6)
        other = x.clone()
        other[3] = torch.randn(3, 64, 64)
        assert not torch.allclose(per_batch(x)[0][0], per_batch(other)[0][0])
        assert torch.allclose(per_image(x)[0][0], per_image(other)[0][0])
    assert per_batch.scores_depend_on_batch and not per_image.scores_depend_on_batch
    with pytest.raises(ValueError, match="harmonization=per_image"):
        per_batch.check_exportable()
    per_image.check_exportable()


def test_global_loss_is_the_two_class_cross_entropy():
    from edge_inspect.trainer.heads.cmad.model import prototype_logits

    torch.manual_seed(0)
    f, protos, y = torch.randn(6, 8), torch.randn(1, 2, 8), torch.tensor([0, 1, 1, 0, 1, 0])
    logits = prototype_logits(f, protos, 0.07)[:, 0]
    p = prototype_score(f, protos, 0.07)[:, 0]
    assert torch.allclose(F.cross_entropy(logits, y), F.binary_cross_entropy(p, y.float()), atol=1e-5)


def test_balanced_batches_are_half_normal_and_resumable():
    from edge_inspect.trainer.data.batches import StepBatches

    ds = SyntheticDefects("test", ("stripes",), per_class=20, seed=1)
    labels = ds.labels
    from edge_inspect.trainer.backbones.base import OPENAI_CLIP_NORM

    loader = BatchLoader((64, 64), OPENAI_CLIP_NORM, "resize")
    source = StepBatches([ds], 16, (10, 0), loader, "balanced")
    seen = set()
    for step in range(12):
        idx = source.indices(step)
        assert len(idx) == 16 and labels[idx].sum() == 8, step
        seen.update(idx)
    assert seen == set(range(len(ds)))  # every image drawn, the smaller class more often
    again = StepBatches([ds], 16, (10, 0), loader, "balanced")
    assert again.indices(7) == source.indices(7)  # a function of the step: resume continues
    normal_only = SyntheticDefects("train", ("stripes",), per_class=8, seed=1)
    with pytest.raises(ValueError, match=r"both normal\s+and anomalous"):
        StepBatches([normal_only], 16, (0,), loader, "balanced")
