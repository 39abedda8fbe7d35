"""Our Q-Former equals diffusers' BLIP-Diffusion Q-Former given the same random weights.

The reference is diffusers' own ``Blip2QFormerModel`` (the model IIPAD calls through
``BlipDiffusionPipeline.get_query_embeddings``), saved by its own ``save_pretrained`` and
loaded by our loader. diffusers 0.42 keeps BLIP-Diffusion as a deprecated pipeline written
against transformers 4: under transformers 5 its layers call the attention modules with the
old positional convention and expect tuples back, and two ``PreTrainedModel`` helpers are
gone. :func:`_adapt_to_transformers5` bridges exactly that (call convention, an all-ones
mask, no head mask); every weight and every formula stays the reference's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
blip = pytest.importorskip("diffusers.pipelines.deprecated.blip_diffusion.modeling_blip2")

from edge_inspect.trainer.backbones.checkpoint_io import WeightsFileError  # noqa: E402
from edge_inspect.trainer.backbones.qformer import load_qformer  # noqa: E402
from tests.trainer.hf_reference import randomize_  # noqa: E402

TOL = 1e-4
VOCAB = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "object", "defect"]
TINY_TEXT_IDS = (3, 6, 4)  # "[CLS] object [SEP]" in VOCAB


class _OldCall(nn.Module):
    """transformers 5's (cross-)attention behind diffusers' transformers-4 call convention."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, h, mask=None, head_mask=None, *encoder, output_attentions=False,
                past_key_value=None):
        if encoder:
            return self.inner(h, encoder_hidden_states=encoder[0]), None
        return self.inner(h), None


def _adapt_to_transformers5(model, monkeypatch) -> None:
    for layer in model.encoder.layer:
        layer.attention = _OldCall(layer.attention)
        if layer.has_cross_attention:
            layer.crossattention = _OldCall(layer.crossattention)
    cls = type(model)
    monkeypatch.setattr(cls, "invert_attention_mask",
                        lambda self, mask: (1.0 - mask[:, None, None, :].float()) * -1e4, raising=False)
    monkeypatch.setattr(cls, "get_head_mask", lambda self, head_mask, n: [None] * n, raising=False)


def make_reference(folder: Path, monkeypatch, cross_every: int = 1, seed: int = 0):
    """A random diffusers Q-Former saved as ``folder/qformer`` of a pipeline folder."""
    vocab = folder / "bert-vocab"
    vocab.mkdir(parents=True)
    (vocab / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    cfg = transformers.Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=28, patch_size=14,
                           hidden_act="quick_gelu", layer_norm_eps=1e-5),
        qformer_config=dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                            intermediate_size=96, encoder_hidden_size=32, vocab_size=len(VOCAB) + 1,
                            max_position_embeddings=16, cross_attention_frequency=cross_every),
        num_query_tokens=4)
    cfg.tokenizer = str(vocab)
    model = blip.Blip2QFormerModel(cfg).eval()
    randomize_(model, seed)
    model.save_pretrained(folder / "pipe" / "qformer")
    assert model.tokenizer(["object"]).input_ids == [list(TINY_TEXT_IDS)]
    _adapt_to_transformers5(model, monkeypatch)
    return model


@torch.no_grad()
@pytest.mark.parametrize("cross_every", [1, 2])
def test_qformer_matches_diffusers_blip_diffusion(tmp_path, monkeypatch, cross_every):
    ref = make_reference(tmp_path, monkeypatch, cross_every)
    ours = load_qformer(tmp_path / "pipe", text_ids=TINY_TEXT_IDS)
    images = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    expected = ref(text_input=["object"] * 3, image_input=images, return_dict=False)
    got = ours(images)
    assert got.shape == (3, 4, 48)
    torch.testing.assert_close(got, expected, atol=TOL, rtol=TOL)
    torch.testing.assert_close(ours(images[1:2]), got[1:2], atol=1e-5, rtol=1e-5)  # batch-independent
    # the query tokens depend on the image (a bug that dropped the cross-attention would not)
    assert (got[0] - got[1]).abs().max() > 1e-2


@torch.no_grad()
def test_old_checkpoints_with_q_and_v_biases_load_the_same(tmp_path, monkeypatch):
    """Checkpoints saved under transformers 4 (the released one) keep q_bias and v_bias apart."""
    from safetensors.torch import load_file, save_file

    ref = make_reference(tmp_path, monkeypatch)
    weights = tmp_path / "pipe" / "qformer" / "model.safetensors"
    sd = load_file(str(weights))
    for k in [k for k in sd if k.endswith("self_attn.qkv.bias")]:
        q, key_bias, v = sd.pop(k).chunk(3)
        sd[k.replace("qkv.bias", "q_bias")], sd[k.replace("qkv.bias", "v_bias")] = q, v
        assert key_bias.abs().max() > 0  # dropped: a key bias shifts every logit of a query equally
    save_file(sd, str(weights))
    ours = load_qformer(tmp_path / "pipe", text_ids=TINY_TEXT_IDS)
    images = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(ours(images), ref(text_input=["object"] * 2, image_input=images,
                                                 return_dict=False), atol=TOL, rtol=TOL)


def test_loading_errors_name_the_problem(tmp_path, monkeypatch):
    with pytest.raises(WeightsFileError, match="no qformer/config.json or config.json"):
        load_qformer(tmp_path)
    make_reference(tmp_path, monkeypatch)
    folder = tmp_path / "pipe" / "qformer"
    with pytest.raises(ValueError, match=r"do not fit a vocabulary of 9"):
        load_qformer(folder)  # bert-base-uncased ids on the tiny vocabulary
    ours = load_qformer(folder, text_ids=TINY_TEXT_IDS)
    with pytest.raises(ValueError, match=r"takes \(28, 28\) images"):
        ours(torch.zeros(1, 3, 32, 32))
    config = json.loads((folder / "config.json").read_text())
    del config["qformer_config"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsFileError, match="not a BLIP-2 / BLIP-Diffusion Q-Former config"):
        load_qformer(folder)
