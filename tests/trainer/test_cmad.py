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
    assert torch.allclose(head.set_weights(f_g), torch.softmax(head.relevance(f_g) / 0.07, 1))
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
        s_z = 0.5 * s_g + 0.5 * topk_mean(up, 20)
        got, amap = head(x)
        assert torch.allclose(got, s_z, atol=1e-6) and torch.allclose(amap, up)
        head.enroll(shots)
        _, f_shot = head.features(shots)
        q = []
        for fs, fq in zip(f_shot, f_l, strict=True):  # Eq. 12 by brute force
            bank = F.normalize(fs.reshape(-1, fs.shape[-1]), dim=-1)
            q.append(((1 - F.normalize(fq, dim=-1) @ bank.T) / 2).amin(-1))
        q_up = head._upsample(torch.stack(q).mean(0))  # Eq. 13
        few, _ = head(x)
        assert torch.allclose(few, 0.5 * s_z + 0.5 * topk_mean(q_up, 20), atol=1e-5)  # Eq. 14
    head.clear_memory()
    for comp, want in (("global", s_g), ("local", topk_mean(up, 20))):
        head.cfg.components = comp
        with torch.no_grad():
            assert torch.allclose(head(x)[0], want, atol=1e-6)


def test_harmonization_favours_the_matching_dataset(tmp_path):
    """Sets trained on stripes and on grain: stripes images weight the stripes set, and back."""
    from edge_inspect.trainer.evaluate import load_head
    from edge_inspect.trainer.fit import train

    cfg = RunConfig.from_yaml(ROOT / "configs/cmad/tiny-synthetic.yaml")
    ckpt = train(cfg, tmp_path / "run")
    head = load_head(cfg, ckpt)
    loader = BatchLoader(head.backbone.input_size, head.backbone.normalization, "resize")
    for style, own in (("stripes", 0), ("grain", 1)):
        ds = SyntheticDefects("test", (style,), per_class=16, seed=7)  # unseen images
        with torch.no_grad():
            f_g, _ = head.features(loader([(ds, i) for i in range(len(ds))]).images)
            w = head.set_weights(f_g)
        assert torch.allclose(w.sum(1), torch.ones(len(ds)), atol=1e-6)
        assert (w[:, own] > 0.5).float().mean() >= 0.9, (style, w)
