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
