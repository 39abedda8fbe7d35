"""The ``edge-inspect`` console command.

Each subcommand names the module that implements it as a string and imports it only when
chosen, so ``edge-inspect serve`` on a Jetson never imports torch, while ``train`` or
``export`` pull in the trainer layer. The runtime package itself does not depend on the
trainer: the only link is this table of names.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Subcommand:
    """A subcommand: its name, one-line help, and the module that implements it.

    The module must define ``add_arguments(parser)`` and ``run(args) -> int``.
    """

    name: str
    help: str
    module: str


SUBCOMMANDS: tuple[Subcommand, ...] = (
    Subcommand("demo", "offline demo on the textile images (no weights needed)", "trainer.demo"),
    Subcommand("train", "train a method's head from a run config (then evaluate)", "trainer.train_cli"),
    Subcommand("eval", "evaluate a checkpoint: metrics JSON, ROC, histograms, overlays",
               "trainer.eval_cli"),
    Subcommand("export", "export a run as a bundle (ONNX + manifest), with a parity gate",
               "export.cli"),
    Subcommand("enroll", "rebuild a bundle's few-shot memory and threshold from normal images "
               "(no torch)", "runtime.enroll"),
    Subcommand("serve", "run cameras -> ZeroMQ -> engine -> results, with /metrics (no torch)",
               "runtime.serve"),
    Subcommand("watch", "live table of the results a pipeline publishes", "runtime.watch"),
    Subcommand("info", "versions and available engine backends", "runtime.info"),
    Subcommand(
        "inspect-weights",
        "detect the layout and architecture of a CLIP / DINOv2 weights file",
        "trainer.backbones.inspect_cli",
    ),
)


def _load(sub: Subcommand):
    try:
        return importlib.import_module(sub.module)
    except ImportError as exc:
        raise SystemExit(
            f"edge-inspect {sub.name}: cannot import {sub.module} ({exc}). This subcommand "
            "needs the trainer extra: run `bash .ci/setup` or "
            "`pip install torch==2.13.0 && pip install -e .[trainer]`."
        ) from exc


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser, for ``--help``: it lists subcommands without importing them."""
    parser = argparse.ArgumentParser(
        prog="edge-inspect",
        description="Streaming visual anomaly inspection: train, export, serve.",
        epilog="Run `edge-inspect COMMAND --help` for a command's options.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for sub in SUBCOMMANDS:
        subparsers.add_parser(sub.name, help=sub.help)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edge-inspect`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    by_name = {sub.name: sub for sub in SUBCOMMANDS}
    sub = by_name.get(argv[0])
    if sub is None:
        parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(by_name)}")
    module = _load(sub)
    sub_parser = argparse.ArgumentParser(prog=f"edge-inspect {sub.name}", description=sub.help)
    sub_parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    module.add_arguments(sub_parser)
    args = sub_parser.parse_args(argv[1:])
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        # Errors a user can cause (bad config, path, checkpoint, dataset) carry a message
        # that names the problem and the fix; a traceback only with --verbose.
        if args.verbose:
            raise
        print(f"edge-inspect {sub.name}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
