"""Adding a method touches its own package and one registry line: a toy method registered
here, inside the test, trains, evaluates, exports (parity gate) and enrolls without torch,
with no other file knowing its name."""

from dataclasses import dataclass

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edge_inspect.trainer.heads.base import AnomalyHead, BankMemory, MethodTraining, TrainPhase
from edge_inspect.trainer.heads.registry import MethodSpec, get_method, register, unregister
from edge_inspect.trainer.memory import nearest_cosine_distance


@dataclass
class ToyConfig:
    tap: int = 1


class ToyHead(BankMemory, AnomalyHead):
    """Per-channel scaled texture features; zero-shot score = patch norm, few-shot = memory."""

    method = "toy"

    def __init__(self, backbone, cfg: ToyConfig) -> None:
        super().__init__()
        self.backbone, self.cfg = backbone, cfg
        self.scale = nn.Parameter(torch.ones(backbone.tap_dim(cfg.tap)))
        self.bank = None

    def memory_sets(self) -> int:
        return 1

    def forward_with_features(self, images):
        patches = self.backbone.forward_taps(images, (self.cfg.tap,))[self.cfg.tap][:, 1:] * self.scale
        patch = patches.norm(dim=-1) if self.bank is None else nearest_cosine_distance(patches, self.bank[0])
        rows, cols = self.backbone.grid
        amap = F.interpolate(patch.reshape(-1, 1, rows, cols), size=self.backbone.input_size,
                             mode="bilinear", align_corners=False).squeeze(1)
        return patch.amax(dim=1), amap, {"features": patches.unsqueeze(0)}

    def enroll(self, shots):
        with torch.no_grad():
            self.set_bank([self.forward_with_features(shots)[2]["features"][0]])


class ToyTraining(MethodTraining):
    defaults = {"steps": 3, "batch_size": 4, "lr": 1e-2}

    def phases(self, head, datasets, settings):
        return [TrainPhase("scale", list(datasets), [head.scale], steps=settings.get("steps"))]

    def loss(self, head, images, labels, masks, phase):
        score, _, _ = head.forward_with_features(images)
        loss = (torch.sigmoid(score - score.detach().mean()) - labels.float()).pow(2).mean()
        return loss, {"mse": loss.item()}


def _build(cfg):
    from edge_inspect.trainer.backbones import build_backbone

    return ToyHead(build_backbone(cfg.backbone), ToyConfig(**cfg.head_kwargs()))


@pytest.fixture()
def toy():
    spec = register(MethodSpec(name="toy", config=ToyConfig, build=_build, training=ToyTraining(),
                               backbones=("texture",),
                               memory_recipe=lambda head: {"kind": "bank_per_set", "feature": "features"}))
    yield spec
    unregister("toy")


def test_a_method_registered_in_a_test_trains_exports_and_enrolls(toy, tmp_path):
    from edge_inspect.export.bundle_writer import export_bundle
    from edge_inspect.runtime.bundle import load_bundle
    from edge_inspect.runtime.engines import open_engine
    from edge_inspect.runtime.enroll import enroll
    from edge_inspect.trainer.config import ConfigError, RunConfig
    from edge_inspect.trainer.evaluate import evaluate_run
    from edge_inspect.trainer.fit import train

    raw = {"name": "toy", "method": "toy", "backbone": {"kind": "texture", "input_size": 120},
           "shots": 2, "fit": "center_crop",
           "data": {"train": [{"name": "aux", "kind": "synthetic", "split": "test", "classes": ["stripes"],
                               "per_class": 12, "seed": 1}],
                    "target": [{"name": "tgt", "kind": "synthetic", "classes": ["weave"],
                                "per_class": 16, "seed": 2}]},
           "head": {"tap": 1}, "calibration": {"false_alarm_rate": 0.2, "normals": 5},
           "eval": {"overlays": 0}}
    cfg = RunConfig.from_dict(raw, "toy.yaml")
    assert cfg.train["steps"] == 3 and cfg.train["lr"] == 1e-2  # the spec's training defaults
    with pytest.raises(ConfigError, match=r"head \(toy\): unknown keys \['tapz'\]"):
        RunConfig.from_dict(raw | {"head": {"tapz": 1}}, "toy.yaml")
    with pytest.raises(ConfigError, match="toy needs a backbone of kind texture"):
        RunConfig.from_dict(raw | {"backbone": {"kind": "clip", "arch": "tiny-p8-w96"}}, "toy.yaml")

    run = tmp_path / "run"
    before = torch.ones(1)
    ckpt = train(cfg, run)
    from edge_inspect.trainer.checkpoint import load_checkpoint

    assert not torch.equal(load_checkpoint(ckpt).params["scale"][:1], before)  # it trained
    evaluate_run(cfg, ckpt, run / "eval")
    (enrolled,) = sorted((run / "eval" / "enrolled").glob("*.safetensors"))
    bundle_dir = export_bundle(run, tmp_path / "bundle", enrolled, parity_count=4)
    bundle = load_bundle(bundle_dir)
    assert bundle.manifest["method"] == "toy" and bundle.memory_recipe["kind"] == "bank_per_set"

    normals = tmp_path / "normals"
    normals.mkdir()
    ds = cfg.target_data[0].open()
    goods = [s for s in (ds[i] for i in range(len(ds))) if s.label == 0]
    for i, s in enumerate(goods[:8]):
        cv2.imwrite(str(normals / f"{i}.png"), s.image[..., ::-1])
    new = load_bundle(enroll(bundle_dir, normals, shots=3, out=tmp_path / "b2", false_alarm_rate=0.2))
    assert new.memory["bank"].shape[1] == 3 * bundle.memory["bank"].shape[1] // 2  # K = 3 vs 2
    head = get_method("toy").build(cfg)
    head.load_trainable_state(load_checkpoint(ckpt).params)
    from edge_inspect.trainer.data.transforms import fit_image, to_batch

    picked = new.manifest["enrollment"]["shots"]  # the files enroll drew as shots
    shots = [fit_image(cv2.imread(str(normals / f))[..., ::-1], (120, 120), "center_crop") for f in picked]
    head.enroll(to_batch(shots, (120, 120), head.backbone.normalization, "center_crop"))
    np.testing.assert_allclose(new.memory["bank"], head.memory_state()["bank"].numpy(), atol=1e-5)
    frame = {"image": np.stack(shots[:1])}
    assert open_engine(new).infer(frame)["image_score"].shape == (1,)
