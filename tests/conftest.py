"""Shared test settings and fixtures.

Torch runs with 2 threads. The session fixtures build small runs and bundles once (tiny
CLIP, texture); the trainer is imported inside them, so tests that need no torch never
import it.
"""

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

ROOT = Path(__file__).resolve().parents[1]

RUNS = {
    "afclip": ("configs/afclip/tiny-synthetic.yaml", ["train.steps=4", "shots=2"]),
    "cmad": ("configs/cmad/tiny-synthetic.yaml", ["train.steps=3", "shots=2"]),
    "memory": ("configs/memory/textile-texture.yaml",
               ["eval.limit=30", "data.target=[{name: textile-local, kind: textile, "
                "kinds: [nominal, local]}]", "head.shift_reference=30", "head.shot_turns=4",
                "calibration.normals=100",
                "calibration.false_alarm_rate=0.05"]),
}


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[str, Path]:
    """``{method: run folder}``; each run has a checkpoint and an enrolled one (K = 2 or 4)."""
    from edge_inspect.trainer.config import RunConfig
    from edge_inspect.trainer.evaluate import evaluate_run
    from edge_inspect.trainer.fit import train

    base = tmp_path_factory.mktemp("runs")
    out = {}
    for method, (config, overrides) in RUNS.items():
        cfg = RunConfig.from_yaml(ROOT / config, overrides)
        run = base / method
        ckpt = train(cfg, run)
        evaluate_run(cfg, ckpt, run / "eval")
        out[method] = run
    return out


def enrolled(run: Path) -> Path:
    (file,) = sorted((run / "eval" / "enrolled").glob("*.safetensors"))
    return file


@pytest.fixture(scope="session")
def bundles(runs, tmp_path_factory) -> dict[str, Path]:
    """Bundles: zero-shot ``afclip`` / ``cmad``, few-shot ``afclip+`` / ``cmad+`` / ``memory``."""
    from edge_inspect.export.bundle_writer import export_bundle

    base = tmp_path_factory.mktemp("bundles")
    out = {}
    for name, run, few in (("afclip", runs["afclip"], False), ("afclip+", runs["afclip"], True),
                           ("cmad", runs["cmad"], False), ("cmad+", runs["cmad"], True),
                           ("memory", runs["memory"], True)):
        out[name] = export_bundle(run, base / name, enrolled(run) if few else None)
    return out


@pytest.fixture(scope="session")
def iipad_run(tmp_path_factory):
    """``(config, run folder, eval report)``: the tiny IIPAD config trained on its three
    generated categories and evaluated one-for-all (enrolled checkpoints in ``eval/``)."""
    from edge_inspect.trainer.config import RunConfig
    from edge_inspect.trainer.evaluate import evaluate_run
    from edge_inspect.trainer.fit import train

    run = tmp_path_factory.mktemp("iipad") / "run"
    cfg = RunConfig.from_yaml(ROOT / "configs/iipad/tiny-synthetic.yaml")
    train(cfg, run)
    return cfg, run, evaluate_run(cfg, run / "checkpoint.safetensors", run / "eval")


@pytest.fixture(scope="session")
def kanoclip_run(tmp_path_factory):
    """``(config, run folder, eval report)``: the tiny KAnoCLIP config trained on stripes and
    grain, evaluated zero-shot on weave."""
    from edge_inspect.trainer.config import RunConfig
    from edge_inspect.trainer.evaluate import evaluate_run
    from edge_inspect.trainer.fit import train

    run = tmp_path_factory.mktemp("kanoclip") / "run"
    cfg = RunConfig.from_yaml(ROOT / "configs/kanoclip/tiny-synthetic.yaml")
    train(cfg, run)
    return cfg, run, evaluate_run(cfg, run / "checkpoint.safetensors", run / "eval")


@pytest.fixture(scope="session")
def pirn_bundle(tmp_path_factory):
    """A tiny PIRN (RGB + normals) bundle, barely trained: the runtime only needs its contract."""
    from edge_inspect.export.bundle_writer import export_bundle
    from edge_inspect.trainer.config import RunConfig
    from edge_inspect.trainer.fit import train

    base = tmp_path_factory.mktemp("pirn-bundle")
    cfg = RunConfig.from_yaml(ROOT / "configs/pirn/tiny-rgbd.yaml", ["train.epochs=1", "shots=4"])
    train(cfg, base / "run")
    return export_bundle(base / "run", base / "bundle")
