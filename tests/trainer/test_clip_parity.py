"""Our CLIP equals Hugging Face transformers' CLIPModel given the same random weights."""

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from edge_inspect.trainer.backbones.clip import get_clip_config  # noqa: E402
from edge_inspect.trainer.backbones.clip_tokenizer import tokenize  # noqa: E402
from edge_inspect.trainer.backbones.clip_weights import load_clip  # noqa: E402
from tests.trainer.hf_reference import randomize_  # noqa: E402

TOL = 1e-4


def make_hf_clip(arch: str, folder: Path, seed: int) -> "transformers.CLIPModel":
    cfg = get_clip_config(arch)
    hf_cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=cfg.text_width, num_hidden_layers=cfg.text_layers,
                         num_attention_heads=cfg.text_heads,
                         intermediate_size=int(cfg.text_width * cfg.mlp_ratio),
                         max_position_embeddings=cfg.context_length, vocab_size=cfg.vocab_size,
                         hidden_act="quick_gelu", eos_token_id=49407, bos_token_id=49406),
        vision_config=dict(hidden_size=cfg.width, num_hidden_layers=cfg.layers,
                           num_attention_heads=cfg.heads, intermediate_size=int(cfg.width * cfg.mlp_ratio),
                           image_size=cfg.image_size, patch_size=cfg.patch_size,
                           hidden_act="quick_gelu"),
        projection_dim=cfg.embed_dim,
    )
    model = transformers.CLIPModel(hf_cfg).eval()
    model.set_attn_implementation("eager")
    randomize_(model, seed)
    model.save_pretrained(folder)
    return model


def _embeds(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.mark.parametrize("arch,seed", [("tiny-p16-w64", 0), ("tiny-p8-w96", 1)])
def test_clip_matches_transformers(tmp_path, arch, seed):
    hf = make_hf_clip(arch, tmp_path / "hf", seed)
    ours = load_clip(tmp_path / "hf", arch=arch)
    cfg = ours.cfg
    images = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(5))
    tokens = tokenize(["a photo of a scratched metal part.", "with defect."])
    with torch.no_grad():
        hf_vision = hf.vision_model(pixel_values=images, output_hidden_states=True)
        hf_text = hf.text_model(input_ids=tokens, output_hidden_states=True)
        hf_img = _embeds(hf.get_image_features(pixel_values=images))
        hf_txt = _embeds(hf.get_text_features(input_ids=tokens))
        layers = tuple(range(1, cfg.layers + 1))
        taps = ours.visual.forward_taps(images, layers)
        img = ours.encode_image(images)
        txt = ours.encode_text(tokens)
    assert img.shape == hf_img.shape == (2, cfg.embed_dim)
    assert (img - hf_img).abs().max() <= TOL
    assert (txt - hf_txt).abs().max() <= TOL
    for k in layers:
        assert (taps[k] - hf_vision.hidden_states[k]).abs().max() <= TOL, f"vision block {k}"
    # Text blocks: run our text transformer block by block on the same input.
    with torch.no_grad():
        x = ours.token_embedding(tokens) + ours.positional_embedding
        mask = ours.causal_mask(x.shape[1], x.device, x.dtype)
        for k, block in enumerate(ours.transformer.resblocks, start=1):
            x = block(x, mask)
            assert (x - hf_text.hidden_states[k]).abs().max() <= TOL, f"text block {k}"
    # The outputs are not trivially equal to something constant.
    assert img.std() > 1e-3 and txt.std() > 1e-3


def _hf_folder(folder: Path, seed: int, width: int, heads: int, text_width: int, text_heads: int,
               act: str) -> "transformers.CLIPModel":
    hf_cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=text_width, num_hidden_layers=2, num_attention_heads=text_heads,
                         intermediate_size=4 * text_width, max_position_embeddings=77,
                         vocab_size=49408, hidden_act=act, eos_token_id=49407, bos_token_id=49406),
        vision_config=dict(hidden_size=width, num_hidden_layers=2, num_attention_heads=heads,
                           intermediate_size=4 * width, image_size=32, patch_size=8, hidden_act=act),
        projection_dim=48,
    )
    model = transformers.CLIPModel(hf_cfg).eval()
    model.set_attn_implementation("eager")
    randomize_(model, seed)
    model.save_pretrained(folder)
    return model


def _compare(hf, ours, size: int) -> float:
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(7))
    tokens = tokenize(["a photo of a scratched metal part.", "with defect."])
    with torch.no_grad():
        d_img = (ours.encode_image(images) - _embeds(hf.get_image_features(pixel_values=images))).abs().max()
        d_txt = (ours.encode_text(tokens) - _embeds(hf.get_text_features(input_ids=tokens))).abs().max()
    return float(max(d_img, d_txt))


@pytest.mark.parametrize("width,heads,text_width,text_heads", [
    (256, 8, 128, 4),    # head width 32: the old loader used width // 64 = 4 heads (diff ~0.6)
    (240, 3, 96, 1),     # head width 80 and 96, as open_clip ViT-H/14 has 80
])
def test_head_count_is_read_from_the_config(tmp_path, width, heads, text_width, text_heads):
    hf = _hf_folder(tmp_path / "hf", 3, width, heads, text_width, text_heads, "quick_gelu")
    ours = load_clip(tmp_path / "hf")
    assert (ours.cfg.heads, ours.cfg.text_heads) == (heads, text_heads)
    assert _compare(hf, ours, 32) <= TOL


def test_gelu_new_is_the_tanh_gelu(tmp_path):
    """transformers' gelu_new is the tanh approximation; it used to become quick_gelu."""
    hf = _hf_folder(tmp_path / "hf", 4, 128, 2, 64, 2, "gelu_new")
    ours = load_clip(tmp_path / "hf")
    assert ours.cfg.act == "gelu_tanh"
    assert _compare(hf, ours, 32) <= TOL


def test_unknown_activation_and_contradicting_arch_are_refused(tmp_path):
    from edge_inspect.trainer.backbones.checkpoint_io import WeightsFileError

    _hf_folder(tmp_path / "silu", 5, 128, 2, 64, 2, "silu")
    with pytest.raises(WeightsFileError, match="hidden_act 'silu' is not supported"):
        load_clip(tmp_path / "silu")
    _hf_folder(tmp_path / "ok", 5, 64, 2, 48, 2, "quick_gelu")  # tiny-p16-w64 has 4 heads
    with pytest.raises(WeightsFileError, match="2 vision / 2 text heads, architecture"):
        load_clip(tmp_path / "ok", arch="tiny-p8-w96")
