"""Taps, the V-V dual path, baked positional embeddings and learnable-context prompts."""

import pytest
import torch
import torch.nn.functional as F

from edge_inspect.trainer.backbones.clip import ClipModel, get_clip_config
from edge_inspect.trainer.backbones.clip_tokenizer import tokenize
from edge_inspect.trainer.backbones.pos_embed import resize_grid_embedding


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ClipModel(get_clip_config("tiny-p8-w96")).eval()


def _vv_reference(visual, images, vv_from):
    """V-V stream written straight from AnomalyCLIP's formula with plain ops."""
    x = visual.ln_pre(torch.cat([visual.class_embedding.expand(images.shape[0], 1, -1),
                                 visual.conv1(images).flatten(2).transpose(1, 2)], 1)
                      + visual.positional_embedding)
    heads = visual.cfg.heads
    states, vv_states = [x], {}
    x_vv = None
    for i, blk in enumerate(visual.transformer.resblocks, start=1):
        if i == vv_from:
            x_vv = x
        if i >= vv_from:
            y = blk.ln_1(x)
            _, _, v = F.linear(y, blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, -1)
            b, n, c = v.shape
            vh = v.reshape(b, n, heads, c // heads).transpose(1, 2)
            a = torch.softmax(vh @ vh.transpose(-1, -2) / (c // heads) ** 0.5, -1) @ vh
            x_vv = x_vv + blk.attn.out_proj(a.transpose(1, 2).reshape(b, n, c))
            vv_states[i] = x_vv
        x = blk(x)
        states.append(x)
    return states, vv_states


def test_taps_shapes_and_dual_path(model):
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        taps = model.visual.forward_taps(images, (1, 3, 4))
        ori, vv, last = model.visual.forward_dual_taps(images, (1, 2, 3, 4), vv_from=2)
        ref_states, ref_vv = _vv_reference(model.visual, images, vv_from=2)
    assert set(taps) == {1, 3, 4} and taps[1].shape == (2, 1 + 36, 96)
    for k in (1, 3, 4):  # the dual path leaves the original path untouched
        assert torch.allclose(ori[k], taps[k], atol=1e-6)
    assert torch.allclose(last, ref_states[-1], atol=1e-5)
    assert torch.equal(vv[1], ori[1])  # before vv_from the paths are one
    for k in (2, 3, 4):
        assert torch.allclose(vv[k], ref_vv[k], atol=1e-5), f"V-V block {k}"
        assert not torch.allclose(vv[k], ori[k], atol=1e-3)
    proj = model.visual.project(vv[4])
    assert proj.shape == (2, 37, model.cfg.embed_dim)
    with torch.no_grad():
        assert torch.allclose(model.visual.project(taps[4][:, 0]), model.encode_image(images), atol=1e-5)


def test_bad_taps_are_named(model):
    with pytest.raises(ValueError, match=r"taps \[9\] do not exist"):
        model.visual.forward_taps(torch.zeros(1, 3, 48, 48), (1, 9))


def test_positional_embedding_baked_once(model):
    import copy

    m = copy.deepcopy(model)
    old = m.visual.positional_embedding.detach().clone()
    m.visual.set_input_size(64, mode="bilinear")
    assert m.visual.positional_embedding.shape == (1 + 64, 96)
    assert m.visual.grid == (8, 8)
    expected = torch.cat([old[:1], F.interpolate(
        old[1:].reshape(1, 6, 6, 96).permute(0, 3, 1, 2), size=(8, 8), mode="bilinear",
        align_corners=False).permute(0, 2, 3, 1).reshape(64, 96)])
    assert torch.allclose(m.visual.positional_embedding, expected)
    with torch.no_grad():
        assert m.visual.forward_taps(torch.randn(1, 3, 64, 64), (4,))[4].shape == (1, 65, 96)
    with pytest.raises(ValueError, match="baked for input"):
        m.visual.forward_taps(torch.randn(1, 3, 48, 48), (4,))
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        m.visual.set_input_size(50)
    bicubic = resize_grid_embedding(old, (8, 8), mode="bicubic")
    assert not torch.allclose(bicubic, expected)  # the mode is honoured


def test_context_after_sot_equals_spelled_out_words(model):
    """[SOT][ctx][words] with ctx = embeddings of real words equals tokenizing those words."""
    words = tokenize(["a photo of"])[0]
    n = int(words.argmax()) - 1  # word tokens between SOT and EOT
    ctx = model.token_embedding(words[1:1 + n])
    with torch.no_grad():
        got = model.encode_text_with_context(tokenize(["with defect."]), ctx, "after_sot")
        want = model.encode_text(tokenize(["a photo of with defect."]))
    assert torch.allclose(got, want, atol=1e-5)


def test_context_before_sot_equals_spelled_out_tokens(model):
    """[ctx][SOT][words][EOT]: with ctx = embeddings of [SOT, w1, w2] it equals those ids."""
    prompt = tokenize(["with defect."])
    prefix = tokenize(["scratched part"])[0]
    prefix_ids = prefix[: int(prefix.argmax())]  # SOT + words, no EOT
    ctx = model.token_embedding(prefix_ids)
    ids = torch.cat([prefix_ids, prompt[0]])[:77][None]
    with torch.no_grad():
        got = model.encode_text_with_context(prompt, ctx, "before_sot")
        want = model.encode_text(ids)
    assert torch.allclose(got, want, atol=1e-5)


def test_context_errors(model):
    prompt = tokenize(["with defect."])
    with pytest.raises(ValueError, match="exceeds 77 tokens"):
        model.encode_text_with_context(prompt, torch.zeros(75, 64))
    with pytest.raises(ValueError, match="does not fit"):
        model.encode_text_with_context(prompt, torch.zeros(4, 32))
