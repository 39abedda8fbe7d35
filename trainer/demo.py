"""``edge-inspect demo``: the offline demo, runnable with no downloaded weights.

It runs the project's own evaluation (:mod:`trainer.evaluate`) on
``configs/memory/textile-texture.yaml``: the weight-free ``texture`` backbone and the
few-shot memory head, fit on K nominal textile images of ``conformal-clip-data`` (no
defective image seen), a threshold calibrated for a 1 % false-alarm rate on 100 held-out
nominal images, then scored on held-out nominal, local-defect and global-defect images.
It prints image AUROC / AP / F1-max and the calibrated decisions per defect kind and writes
metrics.json, ROC curves, score histograms, heatmap overlays and the enrolled checkpoint.
The streaming demo (camera -> ZeroMQ -> engine) replaces this when the runtime lands.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "memory" / "textile-texture.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shots", type=int, default=4, help="nominal images in the memory")
    parser.add_argument("--limit", type=int, default=400,
                        help="held-out test images per defect kind (nominal + defective)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("demo-output"),
                        help="folder for metrics.json and the pictures")


def run(args: argparse.Namespace) -> int:
    from trainer.config import RunConfig
    from trainer.evaluate import evaluate_run, summary_table

    cfg = RunConfig.from_yaml(DEMO_CONFIG, [f"shots={args.shots}", f"seed={args.seed}",
                                            f"eval.limit={args.limit}"])
    report = evaluate_run(cfg, None, args.out)
    print(f"\ntexture backbone + few-shot memory, {cfg.shots} nominal shots, seed {cfg.seed}")
    print(summary_table(report))
    for name, d in report["datasets"].items():
        cal = d["classes"]["textile"]["calibration"]
        if cal.get("chosen") == "false_alarm":
            print(f"{name}: threshold {cal['false_alarm']['threshold']:.4g} for a "
                  f"{cal['false_alarm']['target_false_alarm_rate']:.0%} false-alarm rate -> on the "
                  f"test images: false alarms {cal['test_false_alarm_rate']:.1%}, "
                  f"missed defects {cal['test_miss_rate']:.1%}")
    print(f"\npictures and metrics.json in {args.out}/ (roc-*.png, histograms-*.png, overlays/)")
    return 0
