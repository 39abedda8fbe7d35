"""Where results go: a list of sinks the pipeline's publish stage hands every result to.

Each sink has ``publish(result)`` (called on the publish thread, never on the engine's)
and ``close()``. Here: :class:`ResultSocketSink` (``result.<camera>`` messages on the
results socket, heatmap as float16 payload) and :class:`CaptureSink` (anomalous frames to
a :class:`~edge_inspect.runtime.capture.CaptureStore`) and, in ``runtime/mqtt_sink.py``,
the MQTT sink. Order matters: the capture sink names its capture in the result for the
sinks after it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from edge_inspect.runtime.capture import CaptureStore
from edge_inspect.runtime.transport.wire import encode

log = logging.getLogger(__name__)


@dataclass
class Result:
    """One scored frame: what every sink receives."""

    camera: str
    seq: int
    t_capture_ns: int
    score: float
    label: bool
    threshold: float | None
    model: str
    stages: dict[str, float]
    heatmap: np.ndarray  # float16, downsampled
    planes: dict[str, np.ndarray] = field(default_factory=dict)  # the fitted frame, by plane
    source: str | None = None  # the replayed image's file name, when the camera sent one
    capture: str | None = None  # <camera>/<folder> of its capture (set by the CaptureSink)
    bundle: str | None = None  # <folder>@<manifest digest> of the bundle that scored it
    preview: np.ndarray | None = None  # downscaled RGB frame, only while a monitor asks for it

    @property
    def header(self) -> dict:
        extra = {"source": self.source} if self.source else {}
        if self.bundle:
            extra["bundle"] = self.bundle
        if self.capture:
            extra["capture"] = self.capture
        return {"score": self.score, "label": int(self.label), "threshold": self.threshold,
                "model": self.model, "stages": self.stages, **extra}


class ResultSocketSink:
    """Publishes ``result.<camera>`` on a sender (a stalled every_part consumer is logged)."""

    def __init__(self, sender) -> None:
        self.sender = sender

    def publish(self, result: Result) -> None:
        arrays, planes = [result.heatmap], ["heatmap"]
        if result.preview is not None:
            arrays.append(result.preview)
            planes.append("preview")
        try:
            self.sender.send(encode("result", result.camera, result.seq, result.t_capture_ns,
                                    arrays, planes=planes, **result.header))
        except TimeoutError as exc:  # an every_part results consumer stalled: keep serving
            log.warning("result of %s seq %d not delivered: %s", result.camera, result.seq, exc)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.sender.close()


class CaptureSink:
    """Anomalous frames (frame, heatmap overlay, header) to the capture store."""

    def __init__(self, store: CaptureStore) -> None:
        self.store = store

    def publish(self, result: Result) -> None:
        if result.label:  # PNG encoding happens on the store's writer thread
            images = {k: v for k, v in result.planes.items() if v.dtype == np.uint8}
            frame = images.get("rgb", next(iter(images.values()), None))
            geometry = {k: v for k, v in result.planes.items() if v.dtype != np.uint8}
            name = self.store.submit(result.camera, result.seq, frame, result.heatmap,
                                     {"camera": result.camera, "seq": result.seq,
                                      "t_capture_ns": result.t_capture_ns, **result.header}, geometry)
            if name:  # later sinks (MQTT) may name it
                result.capture = f"{result.camera}/{name}"

    def flush(self) -> None:
        self.store.flush(timeout_s=1.0)

    def close(self) -> None:
        self.store.flush(timeout_s=1.0)
