"""Training on a device with mixed precision and a cache of frozen-backbone features.

The cache must not change what is learned: the loss curve with cached features equals
the one that recomputes the backbone every step (fp32 storage), and stays within rounding
of it with fp16 storage. Runs on the CPU; a GPU is exercised by benchmarks/train_gpu.py.
"""

import json
from pathlib import Path

import pytest
import torch

from edge_inspect.trainer.checkpoint import load_checkpoint
from edge_inspect.trainer.config import ConfigError, RunConfig
from edge_inspect.trainer.feature_cache import FeatureCache
from edge_inspect.trainer.fit import train

ROOT = Path(__file__).resolve().parents[2]
AFCLIP = ROOT / "configs/afclip/tiny-synthetic.yaml"
CMAD = ROOT / "configs/cmad/tiny-synthetic.yaml"
# 15 steps of 8 over 96 images: the second epoch (steps 13-15) reads the cache.
STEPS = ["train.steps=15", "train.log_every=1", "train.checkpoint_every=1000"]


def _losses(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def _train(tmp_path: Path, config: Path, name: str, *extra: str) -> tuple[list[dict], dict]:
    cfg = RunConfig.from_yaml(config, [*STEPS, *extra])
    ckpt = train(cfg, tmp_path / name)
    return _losses(tmp_path / name), load_checkpoint(ckpt).params


@pytest.mark.parametrize("config", [AFCLIP, CMAD], ids=["afclip", "cmad"])
def test_cached_features_give_the_recomputed_loss_curve(tmp_path, config, monkeypatch):
    seen = {}
    original = FeatureCache.features

    def counting(self, keys, images, compute, planes=()):
        out = original(self, keys, images, compute, planes)
        seen["hits"], seen["misses"] = self.hits, self.misses
        return out

    monkeypatch.setattr(FeatureCache, "features", counting)
    plain, p_plain = _train(tmp_path, config, "plain", "train.cache_features=false")
    assert not seen  # the cache was off
    cached, p_cached = _train(tmp_path, config, "cached", "train.cache_dtype=float32")
    assert seen["hits"] > 0 and seen["misses"] > 0
    assert [r["step"] for r in cached] == [r["step"] for r in plain]
    for a, b in zip(plain, cached, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), a["step"]
    for name, tensor in p_plain.items():
        assert torch.allclose(p_cached[name], tensor, atol=1e-5), name
    half, _ = _train(tmp_path, config, "half", "train.cache_dtype=float16")
    for a, b in zip(plain, half, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2), a["step"]


def test_bf16_autocast_trains_with_fp32_losses(tmp_path):
    """bf16 on the CPU: forward passes in bf16, probabilities and losses in fp32."""
    from edge_inspect.trainer.heads.afclip.train import AfClipTraining

    dtypes = {}
    original = AfClipTraining.loss

    def spy(self, head, inputs, labels, masks, phase):
        with torch.no_grad():
            sets = head.sets_from_taps({k: inputs[f"tap{k}"] for k in head.cfg.taps})
            p, z = head.probabilities(sets)
        dtypes["p"], dtypes["z"] = p.dtype, z.dtype
        loss, parts = original(self, head, inputs, labels, masks, phase)
        dtypes["loss"] = loss.dtype
        return loss, parts

    AfClipTraining.loss = spy
    try:
        bf16, _ = _train(tmp_path, AFCLIP, "bf16", "train.amp=bf16", "train.steps=4")
    finally:
        AfClipTraining.loss = original
    fp32, _ = _train(tmp_path, AFCLIP, "fp32", "train.steps=4")
    assert dtypes == {"p": torch.float32, "z": torch.bfloat16, "loss": torch.float32}
    for a, b in zip(fp32, bf16, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.1)


def test_device_and_precision_errors(tmp_path):
    cfg = RunConfig.from_yaml(CMAD, ["train.amp=fp16"])
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        train(cfg, tmp_path / "fp16")
    assert not (tmp_path / "fp16").exists()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
            train(RunConfig.from_yaml(CMAD, ["train.device=cuda"]), tmp_path / "cuda")
    with pytest.raises(ValueError, match="is not a device"):
        train(RunConfig.from_yaml(CMAD, ["train.device=gpu0"]), tmp_path / "bad")
    with pytest.raises(ConfigError, match="train.amp 'fp8' unknown"):
        RunConfig.from_yaml(CMAD, ["train.amp=fp8"])
    with pytest.raises(ConfigError, match="cache_dtype"):
        RunConfig.from_yaml(CMAD, ["train.cache_dtype=int8"])


def test_cache_budget_recomputes_the_rest():
    cache = FeatureCache(max_bytes=3 * 4 * 10, dtype="float32")
    calls = []

    def compute(x):
        calls.append(len(x))
        return {"f": x.reshape(len(x), -1)[:, :10] * 2}

    images = torch.randn(5, 1, 4, 4)
    first = cache.features([0, 1, 2, 3, 4], images, compute)
    assert len(cache) == 3 and calls == [5]
    again = cache.features([4, 0, 2], images[[4, 0, 2]], compute)
    assert calls == [5, 1]  # only sample 4 (over budget) is computed again
    assert torch.equal(again["f"], first["f"][[4, 0, 2]])


def test_gpu_benchmark_script_runs_on_the_cpu(tmp_path):
    """benchmarks/train_gpu.py is what a GPU machine runs; a tiny CPU run keeps it working."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/train_gpu.py"), "--device", "cpu",
                          "--arch", "tiny-p8-w96", "--size", "112", "--steps", "3", "--images", "8",
                          "--workers", "0", "--out", str(tmp_path)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "train_gpu.json").read_text())
    assert report["device"] == "CPU" and set(report["variants"]) == {
        "fp32, no cache", "fp32, cache", "bf16, no cache", "bf16, cache"}
    assert "| bf16, cache |" in (tmp_path / "train_gpu.md").read_text()
