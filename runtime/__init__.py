"""edge-inspect runtime: sources, wire format, engines, pipeline, metrics.

This package must import with only numpy, opencv, pyzmq, prometheus-client and
onnxruntime installed: it is what runs on a Jetson. Never import torch, ``trainer`` or
``export`` at module level here.
"""

__version__ = "0.1.0"

# The Python API of ``edge-inspect predict`` (README "Predict"), imported on first use so
# that ``import edge_inspect.runtime`` stays light.
_API = {"load_bundle": "edge_inspect.runtime.bundle", "open_engine": "edge_inspect.runtime.engines",
        "predict": "edge_inspect.runtime.prediction", "Prediction": "edge_inspect.runtime.prediction"}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
