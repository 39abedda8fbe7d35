"""``edge-inspect inspect-weights`` tells what a file is."""

import torch
from safetensors.torch import save_file

from edge_inspect.runtime.cli import main
from edge_inspect.trainer.backbones.clip import ClipModel, get_clip_config
from edge_inspect.trainer.backbones.dinov2 import DINOV2_CONFIGS, Dinov2Backbone


def test_inspect_clip_and_dinov2(tmp_path, capsys):
    clip = tmp_path / "clip.safetensors"
    save_file(dict(ClipModel(get_clip_config("ViT-B-16")).state_dict()), str(clip))
    assert main(["inspect-weights", str(clip)]) == 0
    out = capsys.readouterr().out
    assert "safetensors" in out and "CLIP (openai layout): ViT-B-16" in out
    dino = tmp_path / "dino.pth"
    torch.save(Dinov2Backbone(DINOV2_CONFIGS["tiny-dinov2-reg"]).state_dict(), dino)
    assert main(["inspect-weights", str(dino)]) == 0
    assert "DINOv2: tiny-dinov2-reg" in capsys.readouterr().out


def test_inspect_reports_bad_file(tmp_path, capsys):
    bad = tmp_path / "x.pt"
    bad.write_text("not weights")
    assert main(["inspect-weights", str(bad)]) == 1
    assert "not a readable torch checkpoint" in capsys.readouterr().err
