"""`edge-inspect train` / `eval`: run folders, checkpoints, resume, metrics and pictures."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from edge_inspect.runtime.cli import main
from edge_inspect.trainer.checkpoint import CheckpointError, load_checkpoint
from edge_inspect.trainer.config import ConfigError, RunConfig
from edge_inspect.trainer.fit import RunDirError, train

ROOT = Path(__file__).resolve().parents[2]
CMAD = ROOT / "configs/cmad/tiny-synthetic.yaml"


def test_train_then_eval_writes_the_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", str(CMAD), "--run-dir", str(run),
                 "--set", "train.steps=6"]) == 0
    assert "| weave | **mean** |" in capsys.readouterr().out
    # resolved config, checkpoint with only the trainable tensors + config + method
    cfg = RunConfig.from_dict(__import__("yaml").safe_load((run / "config.yaml").read_text()))
    assert cfg.train["steps"] == 6 and cfg.head["tau"] == 0.07
    with safe_open(str(run / "checkpoint.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["params/global_prototypes", "params/local_prototypes"]
        assert f.metadata()["method"] == "cmad"
    report = json.loads((run / "eval" / "metrics.json").read_text())
    row = report["datasets"]["weave"]["classes"]["weave"]
    for key in ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "aupro"):
        assert 0.0 <= row[key] <= 1.0
    assert report["datasets"]["weave"]["mean"]["image_auroc"] == row["image_auroc"]
    assert row["calibration"]["chosen"] == "false_alarm" and len(row["shots"]) == 2
    for name in ("roc-weave.png", "histograms-weave.png", "overlays/weave-weave.png"):
        assert (run / "eval" / name).stat().st_size > 1000
    enrolled = load_checkpoint(run / "eval" / "enrolled" / "weave-weave.safetensors")
    assert list(enrolled.memory) == ["bank"] and enrolled.memory["bank"].shape[0] == 3  # 3 taps
    assert enrolled.calibration["method"] == "normal_false_alarm_rate"
    # the same run folder is never overwritten
    assert main(["train", "--config", str(CMAD), "--run-dir", str(run)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_continues_to_the_same_parameters(tmp_path, monkeypatch):
    overrides = ["train.steps=10", "train.checkpoint_every=3"]
    cfg = RunConfig.from_yaml(CMAD, overrides)
    full = load_checkpoint(train(cfg, tmp_path / "full")).params

    from edge_inspect.trainer.heads.cmad.train import CmadTraining

    original, calls = CmadTraining.loss, {"n": 0}

    def crash_in_second_phase(self, *args):
        calls["n"] += 1
        if calls["n"] == 15:  # phase 2 ("grain"), step 5: last save was at its step 3
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(CmadTraining, "loss", crash_in_second_phase)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut")
    monkeypatch.setattr(CmadTraining, "loss", original)
    state = torch.load(tmp_path / "cut" / "train_state.pt", weights_only=True)
    assert (state["phase"], state["step"]) == (1, 3)
    with pytest.raises(RunDirError, match="--resume"):
        train(cfg, tmp_path / "cut")
    resumed = load_checkpoint(train(cfg, tmp_path / "cut", resume=True)).params
    for name, tensor in full.items():
        assert torch.allclose(resumed[name], tensor, atol=1e-6), name
    with pytest.raises(RunDirError, match="differs"):
        train(RunConfig.from_yaml(CMAD, ["train.steps=11"]), tmp_path / "cut", resume=True)


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: afclip\nbackbone: {kind: clip, arch: tiny-p8-w96}\nhead: {tapz: [1]}\n")
    with pytest.raises(ConfigError, match="tapz"):
        RunConfig.from_yaml(bad)
    bad.write_text("method: afclip\nbackbone: {kind: texture}\n")
    with pytest.raises(ConfigError, match="needs a backbone of kind clip"):
        RunConfig.from_yaml(bad)
    bad.write_text("method: memory\nshots: 0\n")
    with pytest.raises(ConfigError, match="shots >= 1"):
        RunConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match="lr must be a float"):
        RunConfig.from_yaml(CMAD, ["train.lr=fast"])
    with pytest.raises(ValueError, match="unknown keys"):
        RunConfig.from_yaml(CMAD, ["data.target=[{name: x, kind: synthetic, colour: red}]"])


def test_checkpoint_errors(tmp_path, capsys):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(junk)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")
    assert main(["eval", "--config", str(CMAD), "--out", str(tmp_path / "e")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
