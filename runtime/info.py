"""``edge-inspect info``: what is installed and which engine backends can run here."""

from __future__ import annotations

import argparse
import importlib.metadata as md
import platform

from edge_inspect.runtime import __version__

_PACKAGES = ("numpy", "opencv-python-headless", "pyzmq", "prometheus-client", "onnxruntime",
             "torch", "tensorrt")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options."""


def _version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"


def run(args: argparse.Namespace) -> int:
    """Print versions and ONNX Runtime execution providers."""
    print(f"edge-inspect {__version__} on Python {platform.python_version()} "
          f"({platform.machine()})")
    for name in _PACKAGES:
        print(f"  {name:24s} {_version(name)}")
    try:
        import onnxruntime as ort

        print("  onnxruntime providers: " + ", ".join(ort.get_available_providers()))
    except ImportError:
        print("  onnxruntime providers: (onnxruntime not importable)")
    return 0
