"""IIPAD's prompt generator, prompt encoding and guidance losses against direct computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from edge_inspect.trainer.backbones.clip import ClipModel, get_clip_config
from edge_inspect.trainer.backbones.clip_tokenizer import tokenize
from edge_inspect.trainer.heads.iipad.losses import (
    semantic_alignment,
    synthetic_anomalous,
    textual_guidance,
    token_alignment,
)
from edge_inspect.trainer.heads.iipad.prompts import PromptGenerator, PromptShape

SHAPE = PromptShape(prefix=6, category=2, width=48, class_width=32, slots=8, query_width=48)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("condition", ["qformer", "class_token"])
def test_a_batch_of_prompts_equals_each_image_alone(condition):
    torch.manual_seed(0)
    gen = PromptGenerator(SHAPE, condition).eval()
    g, z = torch.randn(4, 32, generator=_gen()), torch.randn(4, 8, 48, generator=_gen(1))
    with torch.no_grad():
        normal, abnormal = gen(g, z)
        alone = [gen(g[i:i + 1], z[i:i + 1]) for i in range(4)]
    assert normal.shape == abnormal.shape == (4, SHAPE.length, 48)
    torch.testing.assert_close(normal, torch.cat([n for n, _ in alone]), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(abnormal, torch.cat([a for _, a in alone]), atol=1e-6, rtol=1e-6)
    assert (normal - abnormal).abs().max() > 1e-3  # two polarities, two prompts
    assert (normal[0] - normal[1]).abs().max() > 1e-3  # instance-specific
    with torch.no_grad():
        other_z = gen(g, torch.randn(4, 8, 48, generator=_gen(2)))[0]
    if condition == "qformer":  # the category tokens reach both the prefix terms and the tail
        assert (other_z[:, :6] - normal[:, :6]).abs().max() > 1e-4
        assert (other_z[:, 6:] - normal[:, 6:]).abs().max() > 1e-4
    else:
        torch.testing.assert_close(other_z, normal)


def test_generator_refuses_tokens_of_the_wrong_shape():
    with pytest.raises(ValueError, match="must be as wide as the CLIP text input"):
        PromptGenerator(PromptShape(width=48, query_width=32))
    gen = PromptGenerator(SHAPE)
    with pytest.raises(ValueError, match=r"category tokens must be \(B, 8, 48\), got \(2, 4, 48\)"):
        gen(torch.zeros(2, 32), torch.zeros(2, 4, 48))


@torch.no_grad()
def test_prompt_encoding_reads_eot_and_each_context_position():
    torch.manual_seed(0)
    clip = ClipModel(get_clip_config("tiny-p16-w64")).eval()
    ctx = torch.randn(3, 8, 48, generator=_gen()) * 0.1
    eot, tokens = clip.encode_prompt_tokens(ctx)
    assert eot.shape == (3, 32) and tokens.shape == (3, 8, 32)
    # the EOT feature is what the tested splice path gives for [SOT][ctx][EOT] (tokenize(""))
    torch.testing.assert_close(eot, clip.encode_text_with_context(tokenize([""] * 3), ctx, "after_sot"))
    # causal: changing context token 5 leaves the outputs of tokens 0-4 as they were
    changed = ctx.clone()
    changed[:, 5] += torch.randn(3, 48, generator=_gen(9))  # (a constant shift would vanish in LayerNorm)
    eot2, tokens2 = clip.encode_prompt_tokens(changed)
    torch.testing.assert_close(tokens2[:, :5], tokens[:, :5])
    assert (tokens2[:, 5:] - tokens[:, 5:]).abs().max() > 1e-4 and (eot2 - eot).abs().max() > 1e-4


def _cos(a, b):
    return float(F.cosine_similarity(a, b, dim=0))


def test_semantic_alignment_is_eq6():
    patches, en, ea = torch.randn(2, 5, 4), torch.randn(2, 4), torch.randn(2, 4)
    tau = 0.07
    got = semantic_alignment(patches, en, ea, tau)
    for b in range(2):
        terms = []
        for r in range(5):
            pos, neg = math.exp(_cos(patches[b, r], en[b]) / tau), math.exp(_cos(patches[b, r], ea[b]) / tau)
            terms.append(-math.log(pos / (pos + neg)))
        assert got[b].item() == pytest.approx(sum(terms) / 5, rel=1e-4)


def test_token_alignment_is_eq7_with_normalised_weights():
    torch.manual_seed(3)
    tokens, patches = torch.randn(2, 3, 4), torch.randn(2, 6, 4)
    sigma, tau = 0.3, 0.5
    got = token_alignment(tokens, patches, sigma, tau)
    for b in range(2):
        pooled = []
        for t in range(3):
            m = [_cos(tokens[b, t], patches[b, r]) for r in range(6)]
            lo, hi = min(m), max(m)
            kept = [(x - lo) / (hi - lo) if (x - lo) / (hi - lo) >= sigma else 0.0 for x in m]
            pooled.append(sum(k * patches[b, r] for r, k in enumerate(kept)) / sum(kept))
        total = 0.0
        for t in range(3):
            row = [math.exp(_cos(tokens[b, t], pooled[k]) / tau) for k in range(3)]
            col = [math.exp(_cos(pooled[t], tokens[b, k]) / tau) for k in range(3)]
            total += -math.log(row[t] / sum(row)) - math.log(col[t] / sum(col))
        assert got[b].item() == pytest.approx(total / 3, rel=1e-4)


def test_textual_guidance_is_eq11():
    en, ea = torch.randn(2, 4), torch.randn(2, 4)
    tn, ta = torch.randn(3, 4), torch.randn(5, 4)
    got = textual_guidance(en, ea, tn, ta, 0.07)
    for b in range(2):
        def term(t, own, other):
            a, o = math.exp(_cos(own, t) / 0.07), math.exp(_cos(other, t) / 0.07)
            return -math.log(a / (a + o))
        expected = (sum(term(t, en[b], ea[b]) for t in tn) / 3 + sum(term(t, ea[b], en[b]) for t in ta) / 5)
        assert got[b].item() == pytest.approx(expected, rel=1e-4)


def test_synthetic_features_mix_each_tap_with_the_one_before():
    taps = [torch.randn(2, 5, 4) for _ in range(3)]
    out = synthetic_anomalous(taps, noise_std=0.0)
    torch.testing.assert_close(out[1], F.normalize(taps[1] + taps[0], dim=-1))
    torch.testing.assert_close(out[0], F.normalize(taps[0] + taps[2], dim=-1))  # first with last
    noisy = synthetic_anomalous(taps, noise_std=1.0, generator=_gen())
    assert all(torch.allclose(n.norm(dim=-1), torch.ones(2, 5)) for n in noisy)
    assert (noisy[1] - out[1]).abs().max() > 1e-2
