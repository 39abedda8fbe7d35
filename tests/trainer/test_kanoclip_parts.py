"""KAnoCLIP's parts against direct, formula-level computations (tiny random-weight CLIP)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from edge_inspect.trainer.backbones.clip import ClipModel, get_clip_config
from edge_inspect.trainer.backbones.clip_tokenizer import tokenize
from edge_inspect.trainer.data.sample import Record
from edge_inspect.trainer.heads.kanoclip.blocks import (
    BiCrossAttention,
    ConvAdapter,
    DeformableSelfAttention,
    SelfAttention,
)
from edge_inspect.trainer.heads.kanoclip.knowledge import KnowledgeError, load_knowledge
from edge_inspect.trainer.heads.kanoclip.model import KanoClipConfig, KanoClipHead
from edge_inspect.trainer.heads.kanoclip.train import knowledge_anchors, knowledge_loss
from edge_inspect.trainer.smoothing import GaussianSmoothing

ROOT = Path(__file__).resolve().parents[2]
KNOWLEDGE = ROOT / "configs/kanoclip/knowledge"
MVTEC_DEFECTS = {
    "bottle": 3, "cable": 8, "capsule": 5, "carpet": 5, "grid": 5, "hazelnut": 4, "leather": 5,
    "metal_nut": 4, "pill": 7, "screw": 5, "tile": 5, "toothbrush": 1, "transistor": 4,
    "wood": 5, "zipper": 7}


def _randomize(module: torch.nn.Module) -> None:
    """Random LayerNorm affines and biases, so a test cannot pass on default inits."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))


def _head(**kw) -> KanoClipHead:
    torch.manual_seed(0)
    clip = ClipModel(get_clip_config("tiny-p8-w96"))
    clip.visual.set_input_size(48)
    cfg = KanoClipConfig(**{"taps": (2, 4), "vv_from": 2, "n_ctx": 3, "bicmci_heads": 4, **kw})
    return KanoClipHead(clip, cfg, load_knowledge(KNOWLEDGE / "synthetic.yaml")).eval()


# -- knowledge files ---------------------------------------------------------------------------
def test_shipped_knowledge_files_cover_mvtec_and_visa():
    mvtec = load_knowledge(KNOWLEDGE / "mvtec.yaml")
    assert {c: len(k.fine) for c, k in mvtec.classes.items()} == MVTEC_DEFECTS
    assert all(len(k.general) == 5 for k in mvtec.classes.values())
    assert mvtec.words("metal_nut") == "metal nut"
    visa = load_knowledge(KNOWLEDGE / "visa.yaml")
    assert len(visa.classes) == 12 and all(set(k.fine) == {"anomaly"} for k in visa.classes.values())
    both = load_knowledge(["configs/kanoclip/knowledge/mvtec.yaml", "configs/kanoclip/knowledge/visa.yaml"])
    assert len(both.classes) == 27  # relative paths resolve against the repository
    texts = both.anchor_texts("bottle", "contamination", "/data/mvtec/bottle/test/contamination/000.png")
    assert texts == both.classes["bottle"].general + both.classes["bottle"].fine["contamination"]
    assert both.anchor_texts("bottle", "good") == both.classes["bottle"].general


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "k.yaml"
    path.write_text(text)
    return path


def test_knowledge_adds_per_image_texts_by_path_ending(tmp_path):
    path = _write(tmp_path, "version: 1\nclasses:\n  cup: {general: [a broken cup.]}\n"
                            "images:\n  cup/test/chip/001.png: [the cup has a chip on its rim.]\n")
    k = load_knowledge(path)
    assert k.words("cup") == "cup"
    assert k.anchor_texts("cup", "chip", "/d/cup/test/chip/001.png") == ["a broken cup.",
                                                                         "the cup has a chip on its rim."]
    assert k.anchor_texts("cup", "chip", "/d/cup/test/chip/002.png") == ["a broken cup."]


@pytest.mark.parametrize("body, words", [
    ("version: 1\nclasses:\n  cup: {words: cup}\n", ["k.yaml", "'cup'", "no general", "add general"]),
    ("version: 1\nclasses:\n  cup: {general: 7}\n", ["k.yaml", "'cup' general", "non-empty list"]),
    ("version: 1\nclasses:\n  cup: {general: [a], colour: red}\n", ["'cup'", "unknown keys", "colour"]),
    ("version: 1\nclasses:\n  cup: {general: [a], fine: [b]}\n", ["'cup'", "fine must map"]),
    ("version: 2\nclasses:\n  cup: {general: [a]}\n", ["k.yaml", "version 2"]),
    ("version: 1\nclasses: [cup]\n", ["k.yaml", "'classes' must map"]),
    ("version: 1\nclasses: {cup: {general: [a}\n", ["k.yaml", "not valid YAML", "fix the syntax"]),
    ("version: 1\nclasses:\n  cup: {general: [" + "word " * 80 + "]}\n",
     ["'cup' general", "CLIP tokens", "shorten it"]),
])
def test_a_malformed_knowledge_file_is_refused_naming_file_class_and_fix(tmp_path, body, words):
    with pytest.raises(KnowledgeError) as err:
        load_knowledge(_write(tmp_path, body))
    message = str(err.value)
    assert "\n" not in message
    for w in words:
        assert w in message, (w, message)


def test_a_class_missing_from_the_knowledge_is_an_error_naming_file_class_and_fix():
    k = load_knowledge(KNOWLEDGE / "synthetic.yaml")
    with pytest.raises(KnowledgeError, match=r"synthetic.yaml have no class 'bottle': add a 'bottle:'"):
        k.anchor_texts("bottle", "good")
    with pytest.raises(KnowledgeError, match="not found.*head.knowledge"):
        load_knowledge("configs/kanoclip/knowledge/nope.yaml")
    with pytest.raises(KnowledgeError, match="'stripes' is in both"):
        load_knowledge([KNOWLEDGE / "synthetic.yaml", KNOWLEDGE / "synthetic.yaml"])


# -- blocks ------------------------------------------------------------------------------------
def _heads_of(x, w, b, heads):
    y = x @ w.T + b
    return y.reshape(*y.shape[:-1], heads, -1)  # (..., N, H, d)


def test_bi_cross_attention_matches_a_per_head_einsum():
    torch.manual_seed(1)
    dim, heads = 24, 4
    block = BiCrossAttention(dim, heads)
    _randomize(block)
    v, t = torch.randn(2, 10, dim), torch.randn(2, 2, dim)
    got_v, got_t = block(v, t)
    vn = F.layer_norm(v, (dim,), block.norm_visual.weight, block.norm_visual.bias)
    tn = F.layer_norm(t, (dim,), block.norm_text.weight, block.norm_text.bias)
    rv = _heads_of(vn, block.ref_visual.weight, block.ref_visual.bias, heads)
    rt = _heads_of(tn, block.ref_text.weight, block.ref_text.bias, heads)
    a = torch.einsum("bnhd,bthd->bhnt", rv, rt) / math.sqrt(dim // heads)
    vv = _heads_of(vn, block.value_visual.weight, block.value_visual.bias, heads)
    vt = _heads_of(tn, block.value_text.weight, block.value_text.bias, heads)
    to_v = torch.einsum("bhnt,bthd->bnhd", a.softmax(-1), vt).reshape(2, 10, dim)
    to_t = torch.einsum("bhnt,bnhd->bthd", a.softmax(-2), vv).reshape(2, 2, dim)
    want_v = v + to_v @ block.out_visual.weight.T + block.out_visual.bias
    want_t = t + to_t @ block.out_text.weight.T + block.out_text.bias
    assert torch.allclose(got_v, want_v, atol=1e-5) and torch.allclose(got_t, want_t, atol=1e-5)


def test_self_attention_matches_scaled_dot_product_attention():
    torch.manual_seed(2)
    block = SelfAttention(16, 2)
    _randomize(block)
    x = torch.randn(3, 5, 16)
    xn = F.layer_norm(x, (16,), block.norm.weight, block.norm.bias)
    q, k, v = (t.reshape(3, 5, 2, 8).transpose(1, 2) for t in block.qkv(xn).chunk(3, -1))
    ref = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(3, 5, 16)
    assert torch.allclose(block(x), x + block.out(ref), atol=1e-5)


def _bilinear_zero_padded(plane: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Value of ``plane (d, rows, cols)`` at pixel coordinates (x, y), zeros outside."""
    _, rows, cols = plane.shape
    x0, y0 = math.floor(x), math.floor(y)
    out = torch.zeros(plane.shape[0])
    for yi, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xi, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yi < rows and 0 <= xi < cols:
                out += wy * wx * plane[:, yi, xi]
    return out


def test_deformable_attention_matches_a_loop_of_bilinear_samples():
    torch.manual_seed(3)
    dim, heads, points, rows, cols = 8, 2, 3, 4, 5
    block = DeformableSelfAttention(dim, heads, points)
    _randomize(block)  # offsets of a few patches, some past the border
    with torch.no_grad():
        block.offsets.weight.mul_(4)
    x = torch.randn(1, rows * cols, dim)
    got = block(x, (rows, cols))
    block.requires_grad_(False)  # the reference below is plain arithmetic
    q = F.layer_norm(x, (dim,), block.norm.weight, block.norm.bias)[0]
    value = (q @ block.value.weight.T + block.value.bias).reshape(rows, cols, heads, dim // heads)
    offsets = (q @ block.offsets.weight.T + block.offsets.bias).reshape(-1, heads, points, 2)
    weights = (q @ block.weights.weight.T + block.weights.bias).reshape(-1, heads, points).softmax(-1)
    rows_out = []
    for n in range(rows * cols):
        i, j = divmod(n, cols)
        per_head = []
        for h in range(heads):
            plane = value[:, :, h].permute(2, 0, 1)
            acc = torch.zeros(dim // heads)
            for p in range(points):
                # reference = the patch centre; offsets are in patches; pixel = centre + offset
                acc += weights[n, h, p] * _bilinear_zero_padded(
                    plane, j + float(offsets[n, h, p, 0]), i + float(offsets[n, h, p, 1]))
            per_head.append(acc)
        rows_out.append(torch.cat(per_head))
    want = x[0] + torch.stack(rows_out) @ block.out.weight.T + block.out.bias
    assert torch.allclose(got[0], want, atol=1e-5)
    px = offsets[..., 0] + torch.arange(cols).repeat(rows)[:, None, None]
    assert ((px < -1) | (px > cols)).any()  # the zero padding was exercised


def test_deformable_attention_starts_as_deformable_detr():
    block = DeformableSelfAttention(16, 4, 2)
    bias = block.offsets.bias.view(4, 2, 2)
    assert torch.equal(block.offsets.weight, torch.zeros_like(block.offsets.weight))
    assert torch.allclose(bias[0], torch.tensor([[1.0, 0.0], [2.0, 0.0]]))  # head 0 points right
    assert torch.allclose(bias[1], torch.tensor([[0.0, 1.0], [0.0, 2.0]]), atol=1e-6)  # head 1 down
    assert torch.equal(block.weights.weight, torch.zeros_like(block.weights.weight))


def test_conv_adapter_is_eq_11():
    torch.manual_seed(4)
    block = ConvAdapter(12, 3)
    _randomize(block)
    x = torch.randn(5, 12)
    ln = F.layer_norm(x, (12,), block.norm.weight, block.norm.bias)
    want = torch.relu(ln @ block.down.weight.T) @ block.up.weight.T
    assert torch.allclose(block(x), want, atol=1e-6) and block.down.bias is None


# -- the model (Eq. 9-12) and the knowledge loss -----------------------------------------------
def test_prompts_are_sot_context_words_class_and_their_mean():
    head = _head()
    clip = head.clip
    got = head.text_features("weave")
    want = []
    for words, ctx in ((("normal", "perfect"), head.normal_context),
                       (("abnormal", "defective"), head.abnormal_context)):
        feats = []
        for w in words:
            tokens = tokenize([f"{w} woven fabric."])  # the knowledge file's words for weave
            emb = clip.token_embedding(tokens)
            x = torch.cat([emb[:, :1], ctx[None], emb[:, 1:]], dim=1)[:, :77]
            x = x + clip.positional_embedding
            mask = torch.full((77, 77), float("-inf")).triu(1)
            x = clip.ln_final(clip.transformer(x, mask))
            eot = int(tokens.argmax()) + ctx.shape[0]
            feats.append(F.normalize(x[0, eot] @ clip.text_projection, dim=-1))
        want.append(F.normalize(torch.stack(feats).mean(0), dim=-1))
    assert torch.allclose(got, torch.stack(want), atol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"map_norm": "softmax_of_sum", "global_token": "original",
                                      "bicmci_layers": 2},
                                {"bicmci": False, "adapter": False, "vv": False,
                                 "global_token": "original_no_ln_post"}])
def test_score_and_map_are_eq_9_to_12(kw):
    head = _head(**kw)
    _randomize(head.stages) if head.stages is not None else None
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        score, amap = head(images)
        bb, cfg = head.backbone, head.cfg
        ori, vv, last = bb.forward_dual_taps(images, (2, 4), 2)
        tokens = vv if cfg.vv else ori
        text = head.text_features("object")
        maps = []
        for i, k in enumerate((2, 4)):
            p, t = bb.ln_post(tokens[k][:, 1:]) @ bb.proj, text.expand(2, -1, -1)
            for stage in head.stages[i] if cfg.bicmci else ():
                p, t = stage(p, t, bb.grid)
            maps.append(torch.einsum("bnc,btc->bnt", F.normalize(p, dim=-1), F.normalize(t, dim=-1)) / 0.07)
        if cfg.map_norm == "mean":
            m = torch.stack([x.softmax(-1) for x in maps]).mean(0)
        else:
            m = sum(maps).softmax(-1)
        grid_map = (1 - m[..., 0] + m[..., 1]) / 2
        up = F.interpolate(grid_map.reshape(2, 1, 6, 6), size=(48, 48), mode="bilinear").squeeze(1)
        want_map = GaussianSmoothing(4.0)(up)
        glob = {"vv": lambda: bb.ln_post(vv[4][:, 0]) @ bb.proj,
                "original": lambda: bb.ln_post(last[:, 0]) @ bb.proj,
                "original_no_ln_post": lambda: last[:, 0] @ bb.proj}[cfg.global_token]()
        if cfg.adapter:
            glob = head.conv_adapter(glob)
        p_abn = (F.normalize(glob, dim=-1) @ text.T / 0.07).softmax(-1)[:, 1]
        want_score = p_abn + want_map.flatten(1).amax(1)
    assert torch.allclose(amap, want_map, atol=1e-5) and torch.allclose(score, want_score, atol=1e-5)


def test_the_class_changes_the_prompts_and_begin_class_selects_it():
    head = _head()
    images = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        head.begin_class("weave")
        a = head(images)[0]
        head.begin_class("stripes")
        b = head(images)[0]
    assert not torch.allclose(a, b)
    assert set(head._text_cache) == {"weave", "stripes"}


def test_anchors_and_the_knowledge_loss_are_eq_2_and_3(tmp_path):
    """W* = mean of the N general features and the M answers (the defect type's fine texts
    averaged into one answer, each per-image text one more), normalized."""
    head = _head()
    (tmp_path / "k.yaml").write_text(
        "version: 1\nclasses:\n  stripes:\n    general: [a bent stripe., a stained stripe., a torn stripe.]\n"
        "    fine: {blob: [a round blob on the left., a dark blob in the middle.]}\n"
        "  grain: {general: [coarse grain., a grain stain.]}\n"
        "images: {s/0.png: [the blob is green.]}\n")
    head.knowledge = load_knowledge(tmp_path / "k.yaml")
    records = [Record(Path("/d/s/0.png"), 1, "stripes", "blob"),
               Record(Path("/d/g/0.png"), 0, "grain", "good")]
    anchors = knowledge_anchors(head, records)

    def enc(texts):
        with torch.no_grad():
            return F.normalize(head.clip.encode_text(tokenize(texts)), dim=-1)

    fine = F.normalize(enc(["a round blob on the left.", "a dark blob in the middle."]).mean(0), dim=-1)
    parts = torch.cat([enc(["a bent stripe.", "a stained stripe.", "a torn stripe."]), fine[None],
                       enc(["the blob is green."])])
    assert torch.allclose(anchors[0], F.normalize(parts.mean(0), dim=-1), atol=1e-5)
    assert torch.allclose(anchors[1], F.normalize(enc(["coarse grain.", "a grain stain."]).mean(0), dim=-1),
                          atol=1e-5)
    text = torch.stack([head.text_features("stripes"), head.text_features("grain")])
    want = torch.stack([torch.dist(text[i, 1], anchors[i]) - torch.dist(text[i, 0], anchors[i])
                        for i in range(2)]).mean()
    assert torch.allclose(knowledge_loss(text, anchors), want, atol=1e-6)


def test_config_errors_name_the_setting():
    with pytest.raises(ValueError, match="head.visual_sa 'swin' unknown"):
        KanoClipConfig(visual_sa="swin")
    with pytest.raises(ValueError, match="global_token vv needs head.vv"):
        KanoClipConfig(vv=False)
    with pytest.raises(ValueError, match="not divisible by 3 heads"):
        _head(bicmci_heads=3)
    with pytest.raises(ValueError, match="reads the V-V path at tap 4, before it starts"):
        KanoClipConfig(taps=(2, 4), vv_from=6)
