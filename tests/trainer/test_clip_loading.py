"""CLIP weight files: OpenAI archives (TorchScript and state dict), open_clip checkpoints,
layout detection, and errors that name what is wrong."""

import copy
import pickle
import warnings
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from edge_inspect.trainer.backbones.checkpoint_io import WeightsFileError, read_torchscript_state_dict
from edge_inspect.trainer.backbones.clip import ClipModel, get_clip_config
from edge_inspect.trainer.backbones.clip_tokenizer import tokenize
from edge_inspect.trainer.backbones.clip_weights import (
    ClipFileFacts,
    infer_clip_config,
    load_clip,
    named_match,
)

ARCH = "tiny-p16-w64"


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = ClipModel(get_clip_config(ARCH)).eval()
    images = torch.randn(2, 3, 64, 64)
    tokens = tokenize(["with defect.", "without defect."])
    return model, images, tokens


def _same_outputs(a: ClipModel, b: ClipModel, images, tokens, tol=0.0):
    with torch.no_grad():
        ia, ta = a(images, tokens)
        ib, tb = b(images, tokens)
    assert (ia - ib).abs().max() <= tol and (ta - tb).abs().max() <= tol


def test_openai_torchscript_archive(tmp_path, reference):
    model, images, tokens = reference
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(copy.deepcopy(model), (images, tokens), check_trace=False)
    traced = traced.half()  # OpenAI's archives store fp16 weights
    path = tmp_path / "ViT-tiny.pt"
    traced.save(str(path))
    loaded = load_clip(path, arch=ARCH)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    half_model = ClipModel(model.cfg).eval()
    half_model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    _same_outputs(loaded, half_model, images, tokens)


def test_torchscript_reader_runs_no_code(tmp_path, reference):
    """The reader refuses globals other than tensors, even inside a TorchScript-shaped zip."""
    import zipfile

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("evil/data.pkl", pickle.dumps({"x": Evil()}, protocol=2))
        zf.writestr("evil/code/__torch__/m.py", "")
    with pytest.raises(WeightsFileError, match="refusing to load .*print"):
        read_torchscript_state_dict(path)


def test_openai_state_dict(tmp_path, reference):
    model, images, tokens = reference
    sd = dict(model.state_dict())
    sd.update(input_resolution=torch.tensor(64), context_length=torch.tensor(77),
              vocab_size=torch.tensor(49408))  # extras OpenAI state dicts carry
    path = tmp_path / "openai.pt"
    torch.save(sd, path)
    _same_outputs(load_clip(path, arch=ARCH, act="quick_gelu"), model, images, tokens)


@pytest.mark.parametrize("fmt", ["pt", "bin", "safetensors"])
def test_open_clip_checkpoints(tmp_path, reference, fmt):
    model, images, tokens = reference
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / f"open_clip_model.{fmt}"
    if fmt == "pt":  # open_clip training checkpoint: wrapped, DDP "module." prefix
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    elif fmt == "bin":
        torch.save(sd, path)
    else:
        save_file(sd, str(path))
    _same_outputs(load_clip(path, arch=ARCH, act="quick_gelu"), model, images, tokens)


class Payload:
    """A pickled Python object that weights_only loading must refuse."""


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"visual.conv1.weight": torch.zeros(1), "obj": Payload()}, path)
    with pytest.raises(WeightsFileError, match="refused to unpickle"):
        load_clip(path)


def test_wrong_architecture_names_keys_and_lookalike(tmp_path, reference):
    model, _, _ = reference
    path = tmp_path / "w.safetensors"
    save_file(dict(model.state_dict()), str(path))
    with pytest.raises(WeightsFileError) as err:
        load_clip(path, arch="tiny-p8-w96")
    msg = str(err.value)
    assert "does not fit architecture tiny-p8-w96" in msg
    assert "missing keys: visual.transformer.resblocks.3." in msg
    assert "shape mismatches: " in msg
    assert "looks like tiny-p16-w64" in msg


def test_truncated_and_foreign_files(tmp_path):
    bad = tmp_path / "half.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(WeightsFileError, match="half.pt"):
        load_clip(bad)
    with pytest.raises(WeightsFileError, match="not found"):
        load_clip(tmp_path / "missing.pt")
    dino = tmp_path / "dino.safetensors"
    save_file({"patch_embed.proj.weight": torch.zeros(8, 3, 14, 14)}, str(dino))
    with pytest.raises(WeightsFileError, match="not a CLIP checkpoint"):
        load_clip(dino)


def test_architecture_inferred_when_not_given(tmp_path):
    model = ClipModel(get_clip_config("ViT-B-32")).eval()
    path = tmp_path / "b32.safetensors"
    save_file(dict(model.state_dict()), str(path))
    assert load_clip(path, act="quick_gelu").cfg.name == "ViT-B-32"


def test_plain_state_dict_must_name_its_activation(tmp_path, reference):
    """A state dict does not store the activation: guessing QuickGELU was silently wrong for
    LAION weights. Refused unless the config or a -quickgelu architecture name says it."""
    model, images, tokens = reference
    path = tmp_path / "sd.safetensors"
    save_file(dict(model.state_dict()), str(path))
    with pytest.raises(WeightsFileError, match="backbone.act: quick_gelu .* or gelu"):
        load_clip(path, arch=ARCH)
    gelu = load_clip(path, arch=ARCH, act="gelu")
    assert gelu.cfg.act == "gelu"
    with torch.no_grad():
        assert (gelu.encode_image(images) - model.encode_image(images)).abs().max() > 1e-4


def test_state_dict_of_unnamed_shape_needs_head_counts(tmp_path):
    """Heads are not in the tensors: a shape no named architecture has is refused, not
    loaded with width // 64 heads; given heads it loads with them."""
    cfg = replace(get_clip_config(ARCH), name="custom", width=128, heads=2, text_heads=4)
    model = ClipModel(cfg).eval()
    path = tmp_path / "custom.safetensors"
    save_file(dict(model.state_dict()), str(path))
    with pytest.raises(WeightsFileError, match="backbone.heads and backbone.text_heads"):
        load_clip(path, act="quick_gelu")
    loaded = load_clip(path, act="quick_gelu", heads=2, text_heads=4)
    assert loaded.visual.transformer.resblocks[0].attn.heads == 2
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), model.encode_image(images))


def test_torchscript_archive_follows_openais_rule_for_unnamed_shapes(tmp_path):
    """OpenAI's own loader sets heads = width // 64 and QuickGELU; an OpenAI archive of a
    shape we do not name loads with exactly that."""
    cfg = replace(get_clip_config(ARCH), name="custom", width=128, heads=2, text_width=64,
                  text_heads=1)
    torch.manual_seed(3)
    model = ClipModel(cfg).eval()
    images, tokens = torch.randn(1, 3, 64, 64), tokenize(["with defect."])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(copy.deepcopy(model), (images, tokens), check_trace=False)
    path = tmp_path / "custom.pt"
    traced.save(str(path))
    loaded = load_clip(path)
    assert (loaded.cfg.heads, loaded.cfg.text_heads, loaded.cfg.act) == (2, 1, "quick_gelu")
    _same_outputs(loaded, model, images, tokens)


def test_vit_h14_is_named_with_heads_of_80():
    """open_clip ViT-H/14: width 1280 in 16 heads of 80; width // 64 would give 20."""
    with torch.device("meta"):
        sd = ClipModel(get_clip_config("ViT-H-14")).state_dict()
    assert named_match(sd).name == "ViT-H-14"
    cfg = infer_clip_config(sd, ClipFileFacts("state_dict", act="gelu"))
    assert (cfg.width, cfg.layers, cfg.heads, cfg.head_width, cfg.text_heads) == (1280, 32, 16, 80, 16)
    assert (cfg.embed_dim, cfg.text_width, cfg.text_layers) == (1024, 1024, 24)
    assert get_clip_config("ViT-H-14").act == "gelu"
    assert get_clip_config("ViT-H-14-quickgelu").act == "quick_gelu"


def test_corrupt_torchscript_tensor_is_a_weights_error(tmp_path, reference):
    """A tensor whose storage was truncated used to escape as a bare RuntimeError."""
    import zipfile

    model, images, tokens = reference
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(copy.deepcopy(model), (images, tokens), check_trace=False)
    good = tmp_path / "good.pt"
    traced.save(str(good))
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        storages = [n for n in src.namelist() if "/data/" in n]
        biggest = max(storages, key=lambda n: src.getinfo(n).file_size)
        for name in src.namelist():
            data = src.read(name)
            dst.writestr(name, data[: len(data) // 2] if name == biggest else data)
    with pytest.raises(WeightsFileError, match="bad.pt: cannot read TorchScript archive"):
        load_clip(bad, arch=ARCH)


def test_sharded_hugging_face_folder(tmp_path, reference):
    """Large HF checkpoints come in shards listed by model.safetensors.index.json."""
    import json

    from edge_inspect.trainer.backbones.checkpoint_io import read_weights

    model, _, _ = reference
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    names = sorted(sd)
    half = len(names) // 2
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(folder / shard))
        weight_map.update({k: shard for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    got, config = read_weights(folder)
    assert config == {} and set(got) == set(sd)
    assert all(torch.equal(got[k], sd[k]) for k in sd)
