"""The ``edge-inspect`` console command.

Each subcommand names the module that implements it (relative to the ``edge_inspect``
namespace) as a string and imports it only when chosen, so ``edge-inspect serve`` on a
Jetson never imports torch, while ``train`` or ``export`` pull in the trainer layer. A
missing third-party module is reported as the extra to install; an import error inside the
project is re-raised as it is. The runtime package itself does not depend on the
trainer: the only link is this table of names.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from edge_inspect.runtime.engines.base import EngineError


@dataclass(frozen=True)
class Subcommand:
    """A subcommand: its name, one-line help, and the module that implements it.

    The module must define ``add_arguments(parser)`` and ``run(args) -> int``.
    """

    name: str
    help: str
    module: str


PACKAGE = "edge_inspect"
SUBCOMMANDS: tuple[Subcommand, ...] = (
    Subcommand("demo", "offline demo on the textile images (no weights needed)", "export.demo"),
    Subcommand("train", "train a method's head from a run config (then evaluate)", "trainer.train_cli"),
    Subcommand("eval", "evaluate a checkpoint: metrics JSON, ROC, histograms, overlays",
               "trainer.eval_cli"),
    Subcommand("draws", "few-shot protocol of a method trained on its shots: one run per class and "
               "shot draw, then the mean over draws", "trainer.draws_cli"),
    Subcommand("export", "export a run as a bundle (ONNX + manifest), with a parity gate",
               "export.cli"),
    Subcommand("enroll", "rebuild a bundle's few-shot memory and threshold from normal images "
               "(no torch)", "runtime.enroll"),
    Subcommand("predict", "score image files or folders with a bundle: CSV and overlay pictures "
               "(no torch)", "runtime.prediction"),
    Subcommand("serve", "run cameras -> ZeroMQ -> engine -> results, with /metrics (no torch)",
               "runtime.serve"),
    Subcommand("watch", "live table of the results a pipeline publishes", "runtime.watch"),
    Subcommand("monitor", "live web page of a running line: tiles per camera, timelines, anomalies "
               "(no torch)", "runtime.monitor"),
    Subcommand("keys", "make a CURVE key pair for authenticated tcp links", "runtime.keys"),
    Subcommand("info", "versions and available engine backends", "runtime.info"),
    Subcommand(
        "inspect-weights",
        "detect the layout and architecture of a CLIP / DINOv2 weights file",
        "trainer.backbones.inspect_cli",
    ),
)
# Third-party modules an extra brings, and the extra to install for them.
EXTRAS = {"torch": "trainer", "safetensors": "trainer", "ftfy": "trainer", "regex": "trainer",
          "scipy": "trainer", "tifffile": "trainer", "onnx": "trainer", "matplotlib": "trainer",
          "conformal_clip_data": "demo"}


def missing_dependency(exc: ImportError) -> str | None:
    """The top-level name of a third-party module that is not installed, else None.

    Only a :class:`ModuleNotFoundError` for a module outside this project counts: an
    ImportError raised inside the project (a renamed function, a circular import, a module
    of ours that is missing) is a bug to show, never to be dressed up as a missing extra.
    """
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    top = exc.name.split(".")[0]
    return None if top == PACKAGE else top


def missing_extra_message(sub: Subcommand, exc: ImportError) -> str | None:
    """The one-line message for a missing optional dependency; None for anything else."""
    missing = missing_dependency(exc)
    if missing is None:
        return None
    extra = EXTRAS.get(missing, "trainer")
    return (f"edge-inspect {sub.name}: the module {missing!r} is not installed; this subcommand "
            f"needs the {extra} extra: run `bash .ci/setup`, or "
            f"`pip install torch==2.13.0 && pip install -e \".[{extra}]\"`.")


def _load(sub: Subcommand):
    try:
        return importlib.import_module(f"{PACKAGE}.{sub.module}")
    except ImportError as exc:
        message = missing_extra_message(sub, exc)
        if message is None:
            raise
        raise SystemExit(message) from exc


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
    except ImportError as exc:  # a dependency imported late, inside run()
        message = missing_extra_message(sub, exc)
        if message is None:
            raise
        raise SystemExit(message) from exc
    except (ValueError, FileNotFoundError, PermissionError, EngineError) as exc:
        # Errors a user can cause (bad config, path, checkpoint, dataset, backend or
        # provider) carry a message that names the problem and the fix; a traceback only
        # with --verbose.
        if args.verbose:
            raise
        print(f"edge-inspect {sub.name}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
