"""``edge-inspect train --config X.yaml``: fit the head, then evaluate on the targets."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from edge_inspect.trainer.config import RunConfig

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="run config YAML (configs/)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="run folder (default: runs/<config name>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run in --run-dir from its last saved step")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.steps=50 (repeatable)")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")


def run(args: argparse.Namespace) -> int:
    from edge_inspect.trainer.evaluate import eval_dir_for, evaluate_run, summary_table
    from edge_inspect.trainer.fit import train

    cfg = RunConfig.from_yaml(args.config, args.overrides)
    run_dir = args.run_dir or Path("runs") / cfg.name
    checkpoint = train(cfg, run_dir, resume=args.resume)
    print(f"checkpoint: {checkpoint}")
    if args.no_eval or not cfg.target_data:
        print(f"evaluate with: edge-inspect eval --config {run_dir / 'config.yaml'} "
              f"--checkpoint {checkpoint}")
        return 0
    out = eval_dir_for(run_dir, cfg)
    report = evaluate_run(cfg, checkpoint, out)
    print(summary_table(report))
    print(f"metrics and pictures: {out}")
    return 0
