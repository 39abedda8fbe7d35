"""Engine backends behind one interface (:class:`runtime.engines.base.Engine`).

Backends import their libraries only when chosen: ``onnxruntime`` for ``ort``, and
``tensorrt`` only for the native TensorRT backend.
"""

from __future__ import annotations

import inspect

from edge_inspect.runtime.engines.base import Engine, EngineError

BACKENDS = ("ort", "tensorrt")


def open_engine(bundle, backend: str = "ort", **options) -> Engine:
    """The engine for ``bundle`` on ``backend`` (options go to the backend's constructor; an
    unknown option or a value of the wrong type is an :class:`EngineError` naming it)."""
    if backend == "ort":
        from edge_inspect.runtime.engines.ort import OrtEngine as cls
    elif backend == "tensorrt":
        from edge_inspect.runtime.engines.tensorrt import TensorRTEngine as cls
    else:
        raise EngineError(f"engine backend {backend!r} unknown; choose one of {BACKENDS}")
    allowed = [name for name in inspect.signature(cls).parameters if name != "bundle"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise EngineError(f"backend {backend!r} has no options {unknown}; its options: {allowed}")
    try:
        return cls(bundle, **options)
    except TypeError as exc:  # e.g. threads: "x" (the libraries' messages name the argument)
        raise EngineError(f"backend {backend!r} options {options}: a value of the wrong type "
                          f"({str(exc).splitlines()[0]})") from None


__all__ = ["BACKENDS", "Engine", "EngineError", "open_engine"]
