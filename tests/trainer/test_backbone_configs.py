"""Every shipped backbone config parses; the weight-free ones build and run."""

from pathlib import Path

import pytest
import torch

from edge_inspect.trainer.backbones import BackboneSpec, build_backbone

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs/backbones").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(path):
    spec = BackboneSpec.from_yaml(path)
    assert spec.kind in ("clip", "dinov2", "texture")
    if spec.weights is None:
        backbone = build_backbone(spec)
        x = torch.rand(1, 3, *backbone.input_size)
        taps = backbone.forward_taps(x, (1,))
        rows, cols = backbone.grid
        assert taps[1].shape == (1, 1 + rows * cols, backbone.tap_dim(1))


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match=r"unknown backbone keys \['layers'\]"):
        BackboneSpec.from_dict({"kind": "clip", "layers": 3})
