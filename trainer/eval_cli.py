"""``edge-inspect eval --config X.yaml --checkpoint C``: metrics JSON and pictures."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_inspect.trainer.config import RunConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="run config YAML")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="checkpoint.safetensors from `edge-inspect train` (not needed by "
                             "the training-free memory method)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder, must not exist (default: <checkpoint folder>/eval-<K>shot, "
                             "or runs/<name>/eval-<K>shot; -2, -3... when taken)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set shots=4 (repeatable)")


def run(args: argparse.Namespace) -> int:
    from edge_inspect.trainer.evaluate import eval_dir_for, evaluate_run, summary_table

    cfg = RunConfig.from_yaml(args.config, args.overrides)
    if args.out is not None:
        out = args.out
    else:
        out = eval_dir_for(args.checkpoint.parent if args.checkpoint else Path("runs") / cfg.name, cfg)
    report = evaluate_run(cfg, args.checkpoint, out)
    print(summary_table(report))
    print(f"metrics and pictures: {out}")
    return 0
