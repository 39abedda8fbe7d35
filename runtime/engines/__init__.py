"""Engine backends behind one interface (:class:`runtime.engines.base.Engine`).

Backends import their libraries only when chosen: ``onnxruntime`` for ``ort``, and
``tensorrt`` only for the native TensorRT backend.
"""

from __future__ import annotations

from edge_inspect.runtime.engines.base import Engine, EngineError

BACKENDS = ("ort", "tensorrt")


def open_engine(bundle, backend: str = "ort", **options) -> Engine:
    """The engine for ``bundle`` on ``backend`` (options go to the backend)."""
    if backend == "ort":
        from edge_inspect.runtime.engines.ort import OrtEngine

        return OrtEngine(bundle, **options)
    if backend == "tensorrt":
        from edge_inspect.runtime.engines.tensorrt import TensorRTEngine

        return TensorRTEngine(bundle, **options)
    raise EngineError(f"engine backend {backend!r} unknown; choose one of {BACKENDS}")


__all__ = ["BACKENDS", "Engine", "EngineError", "open_engine"]
