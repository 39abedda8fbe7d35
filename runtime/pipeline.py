"""The inference pipeline: frames in over ZeroMQ, scores and heatmaps out, metrics on the side.

One loop per pipeline process:

1. **receive**: ``live`` drains everything queued and keeps the newest frame per camera
   (older ones are ``stale`` drops; ``seq`` gaps are ``hwm`` drops); ``every_part`` takes
   up to ``max_batch`` frames, waiting at most ``max_wait_ms`` for the batch to fill.
   Messages that do not decode are counted as ``malformed`` and skipped.
2. **preprocess**: fit each frame to the bundle's input (``runtime.preprocess``).
3. **infer**: one engine call for the micro-batch.
4. **postprocess**: label = score > threshold; heatmap downsampled to ``heatmap_size``.
5. **publish**: ``result.<camera>`` with a JSON header (score, label, threshold, model, seq,
   capture time, per-stage seconds) and the heatmap as float16 payload; anomalous frames go
   to the capture store.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import cv2
import numpy as np

from runtime.bundle import Bundle
from runtime.capture import CaptureStore
from runtime.metrics import RuntimeMetrics, calibrated_score
from runtime.preprocess import fit_image
from runtime.transport.sockets import Receiver, Sender, TransportConfig
from runtime.transport.wire import MalformedMessage, Message, decode, encode

log = logging.getLogger(__name__)


@dataclass
class PipelineConfig:
    frames: TransportConfig
    results: TransportConfig
    max_batch: int = 4
    max_wait_ms: float = 5.0
    heatmap_size: tuple[int, int] | None = (64, 64)
    camera_timeout_s: float = 5.0
    model_name: str = "model"
    captures: CaptureStore | None = None
    expected_cameras: list[str] = field(default_factory=list)


class Pipeline:
    """Runs a bundle's engine on frames from ``cfg.frames`` and publishes on ``cfg.results``."""

    def __init__(self, bundle: Bundle, engine, cfg: PipelineConfig, metrics: RuntimeMetrics,
                 ctx=None) -> None:
        self.bundle, self.engine, self.cfg, self.metrics = bundle, engine, cfg, metrics
        self.receiver = Receiver(cfg.frames, ctx)
        self.sender = Sender(cfg.results, ctx)
        self.last_seq: dict[str, int] = {}
        self.last_seen: dict[str, float] = {}
        self.warm = False
        self.frames_done = 0

    # -- readiness ---------------------------------------------------------------------------
    def ready(self) -> dict[str, bool]:
        now = time.monotonic()
        checks = {"engine_warm": self.warm}
        for cam in self.cfg.expected_cameras or list(self.last_seen):
            checks[f"camera_{cam}_fresh"] = now - self.last_seen.get(cam, -1e9) < self.cfg.camera_timeout_s
        return checks

    def warmup(self) -> None:
        self.engine.warmup()
        self.warm = True
        backend = getattr(self.engine, "backend", "?")
        precision = getattr(self.engine, "precision", "fp32")
        self.metrics.model_info.labels(self.cfg.model_name, backend, precision).set(1)

    # -- receive -----------------------------------------------------------------------------
    def _decode(self, parts: list) -> Message | None:
        try:
            msg = decode(parts)
        except MalformedMessage as exc:
            camera = "unknown"
            log.debug("malformed message dropped: %s", exc.reason)
            self.metrics.drop(camera, "malformed")
            return None
        if msg.kind != "frame" or len(msg.arrays) != 1 or msg.arrays[0].ndim != 3 \
                or msg.arrays[0].shape[2] != 3 or msg.arrays[0].dtype != np.uint8:
            self.metrics.drop(msg.camera, "malformed")
            return None
        cam = msg.camera
        series = self.metrics.camera(cam, self.cfg.model_name)
        series.received.inc()
        series.last_frame.set(time.time())
        series.up.set(1)
        self.last_seen[cam] = time.monotonic()
        prev = self.last_seq.get(cam)
        if prev is not None and msg.seq > prev + 1:
            self.metrics.drop(cam, "hwm", msg.seq - prev - 1)
        elif prev is not None and msg.seq <= prev:
            log.info("camera %s restarted its sequence (%d after %d)", cam, msg.seq, prev)
        self.last_seq[cam] = msg.seq
        return msg

    def receive(self) -> list[tuple[Message, int]]:
        """Decoded frames with their receive time (ns), per the delivery mode."""
        if self.cfg.frames.mode == "live":
            raw = self.receiver.drain(timeout_ms=100)
            now = time.monotonic_ns()
            newest: dict[str, Message] = {}
            for parts in raw:
                msg = self._decode(parts)
                if msg is None:
                    continue
                if msg.camera in newest:
                    self.metrics.drop(msg.camera, "stale")
                newest[msg.camera] = msg
            return [(m, now) for m in newest.values()]  # one per camera; run() batches them
        out = []
        deadline = time.monotonic() + self.cfg.max_wait_ms / 1000
        timeout = 100
        while len(out) < self.cfg.max_batch:
            parts = self.receiver.recv(timeout_ms=timeout)
            if parts is None:
                break
            msg = self._decode(parts)
            if msg is not None:
                out.append((msg, time.monotonic_ns()))
            timeout = max(0, int((deadline - time.monotonic()) * 1000))
        return out

    # -- one micro-batch -----------------------------------------------------------------------
    def process(self, batch: list[tuple[Message, int]]) -> None:
        if not batch:
            return
        t0 = time.perf_counter()
        size = (self.bundle.image.height, self.bundle.image.width)
        frames = [fit_image(msg.arrays[0], size, self.bundle.image.fit) for msg, _ in batch]
        t1 = time.perf_counter()
        out = self.engine.infer(np.stack(frames))
        t2 = time.perf_counter()
        threshold = self.bundle.threshold
        results = []
        for i in range(len(batch)):
            amap = out["anomaly_map"][i]
            if self.cfg.heatmap_size:
                amap = cv2.resize(amap, self.cfg.heatmap_size[::-1], interpolation=cv2.INTER_AREA)
            score = float(out["image_score"][i])
            results.append((score, threshold is not None and score > threshold, amap.astype(np.float16)))
        t3 = time.perf_counter()
        per_frame = {"preprocess": (t1 - t0) / len(batch), "infer": (t2 - t1) / len(batch),
                     "postprocess": (t3 - t2) / len(batch)}
        for (msg, t_recv), (score, label, heat), frame in zip(batch, results, frames, strict=True):
            cam = msg.camera
            transport = max(0.0, (t_recv - msg.t_capture_ns) / 1e9)
            header = {"score": score, "label": int(label), "threshold": threshold,
                      "model": self.cfg.model_name, "stages": {"transport": transport, **per_frame}}
            tp = time.perf_counter()
            try:
                self.sender.send(encode("result", cam, msg.seq, msg.t_capture_ns, [heat], **header))
            except TimeoutError as exc:  # an every_part results consumer stalled: keep serving
                log.warning("result of %s seq %d not delivered: %s", cam, msg.seq, exc)
            publish = time.perf_counter() - tp
            series = self.metrics.camera(cam, self.cfg.model_name)
            series.stages["transport"].observe(transport)
            for stage, secs in per_frame.items():
                series.stages[stage].observe(secs)
            series.stages["publish"].observe(publish)
            series.e2e.observe((time.monotonic_ns() - msg.t_capture_ns) / 1e9)
            series.inferred.inc()
            series.score.observe(calibrated_score(score, threshold))
            if label:
                series.anomalies.inc()
                if self.cfg.captures is not None:  # PNG encoding happens on the writer thread
                    self.cfg.captures.submit(cam, msg.seq, frame, heat,
                                             {"camera": cam, "seq": msg.seq,
                                              "t_capture_ns": msg.t_capture_ns, **header})
        self.frames_done += len(batch)

    def update_camera_up(self) -> None:
        now = time.monotonic()
        for cam, seen in self.last_seen.items():
            self.metrics.camera(cam, self.cfg.model_name).up.set(int(now - seen < self.cfg.camera_timeout_s))

    def run(self, stop: threading.Event) -> None:
        if not self.warm:
            self.warmup()
        try:
            while not stop.is_set():
                frames = self.receive()
                for start in range(0, len(frames), self.cfg.max_batch):  # more cameras than max_batch
                    self.process(frames[start:start + self.cfg.max_batch])
                self.update_camera_up()
        finally:
            if self.cfg.captures is not None:
                self.cfg.captures.flush()

    def close(self) -> None:
        self.receiver.close()
        self.sender.close()
