"""PIRN stateless vs carried prototypes on a stream of the generated RGB-D task.

Trains the tiny RGB-D config (``configs/pirn/tiny-rgbd.yaml``: 16 normal shots, 200 epochs)
twice, as the paper (from the codebook only) and with ``head.carried_training: true``,
calibrates each as ``edge-inspect eval`` does (stateless, 5 % false alarms on 100 normals),
then scores a stream of 90 scenes (good, dent, stain in turn) two ways: stateless, and
carried as a ``--carry-state`` bundle runs in ``serve`` (the last layer's refined prototypes
of a frame scored at or below the threshold start the next frame; an anomalous frame leaves
them). Reported per run and mode: mean score of the normal frames, false alarms, misses per
kind at the threshold, and AUROC of normal vs each kind.

    .venv/bin/python benchmarks/pirn_carried_state.py      # ~3 min on 2 cores

Writes <out>/pirn_carried_state.{json,md} (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from edge_inspect.runtime.synthetic_rgbd import render
from edge_inspect.trainer.checkpoint import load_checkpoint
from edge_inspect.trainer.config import RunConfig
from edge_inspect.trainer.evaluate import evaluate_run, load_head
from edge_inspect.trainer.fit import train
from edge_inspect.trainer.metrics import auroc

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
CONFIG = ROOT / "configs/pirn/tiny-rgbd.yaml"
KINDS = ("good", "dent", "stain")


def stream(head, frames, threshold: float, carried: bool) -> np.ndarray:
    """Scores of ``frames`` in order; carried: the state moves only on frames scored normal."""
    state = head.initial_state()[None]
    scores = []
    with torch.no_grad():
        for rgb, xyz in frames:
            score, _, nxt = head.forward_carried(rgb, xyz, state=state)
            scores.append(float(score[0]))
            if carried and scores[-1] <= threshold:
                state = nxt
    return np.array(scores)


def summarize(scores: np.ndarray, kinds: np.ndarray, threshold: float) -> dict:
    good = scores[kinds == "good"]
    out = {"mean_normal_score": float(good.mean()), "false_alarm": float((good > threshold).mean())}
    for kind in KINDS[1:]:
        bad = scores[kinds == kind]
        out[f"miss_{kind}"] = float((bad <= threshold).mean())
        out[f"auroc_{kind}"] = auroc(np.r_[np.zeros(good.size), np.ones(bad.size)], np.r_[good, bad])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=90)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.manual_seed(0)
    kinds = np.array([KINDS[i % 3] for i in range(args.frames)])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for carried_training in (False, True):
            cfg = RunConfig.from_yaml(CONFIG, [f"head.carried_training={str(carried_training).lower()}"])
            run = Path(tmp) / f"run-{carried_training}"
            evaluate_run(cfg, train(cfg, run), run / "eval")
            (ckpt,) = (run / "eval" / "enrolled").glob("*.safetensors")
            threshold = float(load_checkpoint(ckpt).calibration["threshold"])
            head = load_head(cfg, ckpt).eval()
            norm = head.backbone.normalization
            mean, std = torch.tensor(norm.mean).view(1, 3, 1, 1), torch.tensor(norm.std).view(1, 3, 1, 1)
            size = head.backbone.input_size[0]
            frames = []
            for i, kind in enumerate(kinds):  # scenes no training or calibration image used
                image, xyz, _ = render(size, np.random.default_rng([11, i]), kind)
                rgb = (torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255 - mean) / std
                frames.append((rgb, torch.from_numpy(xyz).permute(2, 0, 1)[None].float()))
            for carried in (False, True):
                rows.append({"carried_training": carried_training, "carried": carried,
                             "threshold": threshold} | summarize(stream(head, frames, threshold, carried),
                                                                 kinds, threshold))
    lines = [f"PIRN, tiny RGB-D config, a stream of {args.frames} generated scenes (good, dent, "
             "stain in turn); thresholds from stateless calibration (5 % target).",
             "Command: `.venv/bin/python benchmarks/pirn_carried_state.py`", "",
             "| trained | scored | mean normal score | false alarms | missed dents | missed stains "
             "| AUROC dent | AUROC stain |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {'with carried starts' if r['carried_training'] else 'from the codebook'} | "
                     f"{'carried' if r['carried'] else 'stateless'} | {r['mean_normal_score']:.4f} | "
                     f"{r['false_alarm']:.0%} | {r['miss_dent']:.0%} | {r['miss_stain']:.0%} | "
                     f"{r['auroc_dent']:.3f} | {r['auroc_stain']:.3f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"config": str(CONFIG.relative_to(ROOT)), "frames": args.frames, "rows": rows}
    (args.out / "pirn_carried_state.json").write_text(json.dumps(report, indent=2))
    (args.out / "pirn_carried_state.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
