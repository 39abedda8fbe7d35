"""DINOv2 with and without registers equals Hugging Face transformers given the same weights."""

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from edge_inspect.trainer.backbones.checkpoint_io import WeightsFileError  # noqa: E402
from edge_inspect.trainer.backbones.dinov2 import DINOV2_CONFIGS, load_dinov2  # noqa: E402
from tests.trainer.hf_reference import randomize_  # noqa: E402

TOL = 1e-4


def make_hf_dinov2(arch: str, folder: Path, seed: int):
    cfg = DINOV2_CONFIGS[arch]
    common = dict(hidden_size=cfg.width, num_hidden_layers=cfg.layers,
                  num_attention_heads=cfg.heads, intermediate_size=int(cfg.width * cfg.mlp_ratio),
                  image_size=cfg.image_size, patch_size=cfg.patch_size, layer_norm_eps=1e-6)
    if cfg.num_registers:
        hf_cfg = transformers.Dinov2WithRegistersConfig(num_register_tokens=cfg.num_registers, **common)
        model = transformers.Dinov2WithRegistersModel(hf_cfg)
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**common))
    model.eval().set_attn_implementation("eager")
    randomize_(model, seed)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("arch", ["tiny-dinov2", "tiny-dinov2-reg"])
def test_dinov2_matches_transformers(tmp_path, arch):
    hf = make_hf_dinov2(arch, tmp_path / "hf", seed=3)
    ours = load_dinov2(tmp_path / "hf", arch=arch)
    images = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(pixel_values=images, output_hidden_states=True)
        states = ours.forward_all(images)
        taps = ours.forward_taps(images, (1, 2, 3))
        emb = ours(images)
    assert len(states) == len(ref.hidden_states) == 4
    for k, (a, b) in enumerate(zip(states, ref.hidden_states, strict=True)):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= TOL, f"hidden state {k}"
    r = DINOV2_CONFIGS[arch].num_registers
    for k in (1, 2, 3):
        hf_tap = torch.cat([ref.hidden_states[k][:, :1], ref.hidden_states[k][:, 1 + r:]], dim=1)
        assert taps[k].shape == (2, 1 + 16, 64)
        assert (taps[k] - hf_tap).abs().max() <= TOL
    assert (emb - ref.pooler_output).abs().max() <= TOL


@pytest.mark.parametrize("arch", ["tiny-dinov2", "tiny-dinov2-reg"])
def test_baked_position_table_matches_runtime_interpolation(tmp_path, arch):
    """Baking the table once for 84x84 equals HF's per-call bicubic interpolation.

    HF's with-registers model interpolates with antialias=True, the plain one without.
    """
    hf = make_hf_dinov2(arch, tmp_path / "hf", seed=4)
    antialias = DINOV2_CONFIGS[arch].num_registers > 0
    ours = load_dinov2(tmp_path / "hf", arch=arch, input_size=84, antialias=antialias)
    assert ours.pos_embed.shape == (1, 1 + 36, 64)
    images = torch.randn(1, 3, 84, 84, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(pixel_values=images)
        got = ours(images)
    assert (got - ref.pooler_output).abs().max() <= TOL
    with pytest.raises(ValueError, match="baked for input"):
        ours(torch.zeros(1, 3, 56, 56))


def test_official_checkpoint_layout_roundtrip(tmp_path):
    """An official-layout .pth (plain state dict) loads with weights_only and gives the same model."""
    hf_dir = tmp_path / "hf"
    make_hf_dinov2("tiny-dinov2-reg", hf_dir, seed=5)
    model = load_dinov2(hf_dir)
    assert model.cfg.name == "tiny-dinov2-reg"  # inferred from the shapes
    path = tmp_path / "dinov2_reg4_pretrain.pth"
    torch.save(model.state_dict(), path)
    again = load_dinov2(path, arch="tiny-dinov2-reg")
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_wrong_architecture_names_the_keys(tmp_path):
    make_hf_dinov2("tiny-dinov2-reg", tmp_path / "hf", seed=6)
    with pytest.raises(WeightsFileError) as err:
        load_dinov2(tmp_path / "hf", arch="tiny-dinov2")
    msg = str(err.value)
    assert "unexpected keys: register_tokens" in msg
    assert "4 registers" in msg  # what the file looks like
