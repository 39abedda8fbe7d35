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
    assert (run / "loss.png").stat().st_size > 5000  # the loss curve, per phase
    report = json.loads((run / "eval-2shot" / "metrics.json").read_text())
    row = report["datasets"]["weave"]["classes"]["weave"]
    for key in ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "aupro"):
        assert 0.0 <= row[key] <= 1.0
    assert report["datasets"]["weave"]["mean"]["image_auroc"] == row["image_auroc"]
    assert row["calibration"]["chosen"] == "false_alarm" and len(row["shots"]) == 2
    for name in ("roc-weave.png", "histograms-weave.png", "overlays/weave-weave.png"):
        assert (run / "eval-2shot" / name).stat().st_size > 1000
    enrolled = load_checkpoint(run / "eval-2shot" / "enrolled" / "weave-weave.safetensors")
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
    # the log holds each step once: records past the resumed step were dropped, not repeated
    records = [json.loads(line) for line in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    full_log = (tmp_path / "full" / "train_log.jsonl").read_text().splitlines()
    assert [(r["phase"], r["step"]) for r in records] == [
        (json.loads(line)["phase"], json.loads(line)["step"]) for line in full_log]
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


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_eval_never_overwrites_and_marks_incomplete_output(tmp_path, capsys, monkeypatch):
    """eval used to rewrite <run>/eval (the enrolled checkpoint README exports included),
    and an interrupted eval left a folder that looked complete."""
    run = tmp_path / "run"
    cfg = RunConfig.from_yaml(CMAD, ["train.steps=2", "eval.overlays=0"])
    ckpt = train(cfg, run)
    config = str(run / "config.yaml")
    assert main(["eval", "--config", config, "--checkpoint", str(ckpt)]) == 0
    first = _tree(run / "eval-2shot")
    assert "enrolled/weave-weave.safetensors" in first
    # same command again: a new folder, the first one byte for byte as it was
    assert main(["eval", "--config", config, "--checkpoint", str(ckpt), "--set", "seed=5"]) == 0
    assert "eval-2shot-2" in capsys.readouterr().out
    assert _tree(run / "eval-2shot") == first
    # zero-shot names its folder the same way
    assert main(["eval", "--config", config, "--checkpoint", str(ckpt), "--set", "shots=0"]) == 0
    assert (run / "eval-0shot" / "metrics.json").exists()
    # an explicit --out that exists is refused, nothing changed
    assert main(["eval", "--config", config, "--checkpoint", str(ckpt),
                 "--out", str(run / "eval-2shot")]) == 2
    assert "already holds results" in capsys.readouterr().err
    assert _tree(run / "eval-2shot") == first
    # interrupted half-way: only <out>.partial exists; the retry replaces it and completes
    from edge_inspect.trainer import evaluate as ev

    original = ev.evaluate_dataset

    def interrupted(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "evaluate_dataset", interrupted)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate_run(cfg, ckpt, out)
    assert not out.exists() and (tmp_path / "cut.partial" / "enrolled").is_dir()
    monkeypatch.setattr(ev, "evaluate_dataset", original)
    ev.evaluate_run(cfg, ckpt, out)
    assert (out / "metrics.json").exists() and not (tmp_path / "cut.partial").exists()


def test_a_failed_start_does_not_block_the_retry(tmp_path, monkeypatch, capsys):
    """A start that failed before its first saved step used to leave config.yaml behind:
    the retry was refused (already holds a run) and --resume refused too (config differs)."""
    run = tmp_path / "run"
    # a config mistake found while building: nothing is written at all
    missing = ["data.train=[{name: a, kind: mvtec, root: " + str(tmp_path / "nowhere") + "}]"]
    assert main(["train", "--config", str(CMAD), "--run-dir", str(run), "--no-eval",
                 *sum((["--set", m] for m in missing), [])]) == 2
    assert not run.exists()
    # interrupted at the first step, before anything was saved
    from edge_inspect.trainer.heads.cmad.train import CmadTraining

    def broken(self, *args):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(CmadTraining, "loss", broken)
    with pytest.raises(RuntimeError):
        train(RunConfig.from_yaml(CMAD, ["train.steps=3"]), run)
    assert (run / "config.yaml").exists() and not (run / "train_state.pt").exists()
    monkeypatch.undo()
    # the retry, with a corrected config and without --resume, just works
    ckpt = train(RunConfig.from_yaml(CMAD, ["train.steps=2"]), run)
    assert ckpt.exists() and "steps: 2" in (run / "config.yaml").read_text()
    # a run that did save is still protected
    with pytest.raises(RunDirError, match="--resume"):
        train(RunConfig.from_yaml(CMAD, ["train.steps=2"]), run)


def test_few_shot_protocol_over_shot_seeds(tmp_path):
    """eval.shot_seeds: the K shots are drawn once per seed; metrics.json reports the mean
    and spread over the draws, each draw keeps its own folder."""
    import numpy as np

    from edge_inspect.trainer.evaluate import evaluate_run

    cfg = RunConfig.from_yaml(CMAD, ["train.steps=2", "eval.overlays=0", "eval.shot_seeds=[1, 2, 3]"])
    ckpt = train(cfg, tmp_path / "run")
    report = evaluate_run(cfg, ckpt, tmp_path / "run" / "eval-2shot")
    assert report["shot_seeds"] == [1, 2, 3]
    per_seed = report["datasets"]["weave"]["per_seed"]
    assert sorted(per_seed) == ["1", "2", "3"]
    aurocs = [per_seed[s]["image_auroc"] for s in ("1", "2", "3")]
    assert report["datasets"]["weave"]["mean"]["image_auroc"] == pytest.approx(np.mean(aurocs))
    assert report["datasets"]["weave"]["std"]["image_auroc"] == pytest.approx(np.std(aurocs))
    shots = [tuple(report["seeds"][s]["weave"]["classes"]["weave"]["shots"]) for s in ("1", "2", "3")]
    assert len(set(shots)) == 3  # three different draws
    for s in (1, 2, 3):
        folder = tmp_path / "run" / "eval-2shot" / f"seed-{s}"
        assert (folder / "enrolled" / "weave-weave.safetensors").exists()
    with pytest.raises(ConfigError, match="shot_seeds must be a list of integers"):
        RunConfig.from_yaml(CMAD, ["eval.shot_seeds=5"])


def test_per_batch_harmonization_is_evaluated_without_a_threshold(tmp_path):
    from edge_inspect.trainer.evaluate import evaluate_run

    cfg = RunConfig.from_yaml(CMAD, ["train.steps=2", "eval.overlays=2", "eval.batch_size=16",
                                     "head.harmonization=per_batch"])
    ckpt = train(cfg, tmp_path / "run")
    report = evaluate_run(cfg, ckpt, tmp_path / "run" / "e")
    cal = report["datasets"]["weave"]["classes"]["weave"]["calibration"]
    assert cal["chosen"] is None and "depend on the batch" in cal["note"]
    assert (tmp_path / "run" / "e" / "overlays" / "weave-weave.png").exists()


def test_targets_are_evaluated_on_their_test_split():
    with pytest.raises(ConfigError, match="target dataset 'weave' has split all"):
        RunConfig.from_yaml(CMAD, ["data.target=[{name: weave, kind: synthetic, split: all}]"])


def test_a_running_evaluation_keeps_its_folder(tmp_path):
    """A .partial another live process writes is neither deleted nor shared."""
    import subprocess
    import sys

    from edge_inspect.trainer.evaluate import EvalDirError, _start_partial, eval_dir_for

    cfg = RunConfig.from_yaml(CMAD)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        partial = tmp_path / "eval-2shot.partial"
        partial.mkdir()
        (partial / ".owner").write_text(str(sleeper.pid))
        (partial / "metrics-so-far").write_text("x")
        with pytest.raises(EvalDirError, match="being written by another evaluation"):
            _start_partial(tmp_path / "eval-2shot")
        assert (partial / "metrics-so-far").exists()
        assert eval_dir_for(tmp_path, cfg).name == "eval-2shot-2"
    finally:
        sleeper.kill()
        sleeper.wait()
    assert eval_dir_for(tmp_path, cfg).name == "eval-2shot"  # its owner is gone: stale
    assert _start_partial(tmp_path / "eval-2shot") == partial
    assert not (partial / "metrics-so-far").exists()


def test_cosine_schedule_is_torchs_per_epoch_annealing_and_reaches_the_optimizer(tmp_path, monkeypatch):
    from edge_inspect.trainer.fit import learning_rate

    # IIPAD's official schedule: eta_min above the base rate, so the rate climbs
    settings = {"schedule": "cosine", "lr": 1e-5, "eta_min": 0.05}
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20, eta_min=0.05)
    for epoch in range(20):
        for step in range(epoch * 3, epoch * 3 + 3):  # 3 steps an epoch, 60 in all
            assert learning_rate(settings, step, 3, 60) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        sched.step()
    assert learning_rate({"schedule": "constant", "lr": 1e-3}, 7, 3, 60) == 1e-3
    # 12 shots in batches of 4: 3 steps an epoch, 4 epochs
    cfg = RunConfig.from_yaml(ROOT / "configs/iipad/tiny-synthetic.yaml", [
        "train.epochs=4", "train.log_every=1", "train.schedule=cosine", "train.eta_min=0.01",
        "train.weight_decay=1.0e-4"])
    seen = []
    real_step = torch.optim.Adam.step

    def spy(self, *args, **kwargs):  # what the optimizer itself holds at each step
        seen.append((self.param_groups[0]["lr"], self.param_groups[0]["weight_decay"]))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    train(cfg, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    want = [learning_rate(cfg.train, step, 3, 12) for step in range(12)]
    assert [lr for lr, _ in seen] == pytest.approx(want) and {wd for _, wd in seen} == {1e-4}
    assert [r["lr"] for r in records] == pytest.approx(want)
    assert records[0]["lr"] == pytest.approx(1e-3) and records[-1]["lr"] > 5e-3  # climbing to 0.01
    with pytest.raises(ConfigError, match="train.schedule 'linear' unknown"):
        RunConfig.from_yaml(CMAD, ["train.schedule=linear"])
