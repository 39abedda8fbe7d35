"""The inference pipeline: frames in over ZeroMQ, scores and heatmaps out, metrics on the side.

Three threads overlap so that the engine runs back to back (the Python work of one frame
happens while the engine scores another; the engine releases the GIL):

1. **intake**: receive (``live`` drains everything queued and keeps the newest frame per
   camera, older ones are ``stale`` drops, ``seq`` gaps are ``hwm`` drops; ``every_part``
   takes frames in order), decode (messages that do not decode are counted as
   ``malformed`` and skipped), preprocess (``runtime.preprocess``), hand over
   (:mod:`runtime.handoff`).
2. **infer** (the thread that calls :meth:`Pipeline.run`): takes up to ``max_batch``
   frames (``every_part`` waits at most ``max_wait_ms`` for the batch to fill; ``live``
   takes what is there), one engine call per micro-batch. Between engine calls this thread
   runs only a few lines of Python and nothing that releases the GIL, so it gets straight
   back into the engine (which releases it) instead of queueing behind the other stages.
3. **publish**: postprocess (label = score > threshold; heatmap downsampled to
   ``heatmap_size``), ``result.<camera>`` with a JSON header (score, label, threshold,
   model, seq, capture time, per-stage seconds) and the heatmap as float16 payload, metrics;
   anomalous frames go to the capture store.

Per-stage seconds cover work only; time spent waiting between stages shows in the
end-to-end latency.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import cv2
import numpy as np

from runtime.bundle import Bundle
from runtime.capture import CaptureStore
from runtime.handoff import FrameHandoff
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


@dataclass
class Prepared:
    """A decoded frame fitted to the bundle's input, on its way to the engine."""

    msg: Message
    t_recv: int  # monotonic ns when it was received
    frame: np.ndarray
    preprocess_s: float


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
        self.input_size = (bundle.image.height, bundle.image.width)
        self.handoff = FrameHandoff(latest_wins=cfg.frames.mode == "live", capacity=cfg.max_batch)
        self.to_publish: queue.Queue = queue.Queue(maxsize=2)  # inferred batches
        self._warned_unfit: set[str] = set()

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
            return [(m, now) for m in newest.values()]  # one per camera
        out = []  # every_part: in order, nothing dropped (the batch fills in the hand-over)
        for parts in self.receiver.drain(timeout_ms=100, limit=self.cfg.max_batch):
            msg = self._decode(parts)
            if msg is not None:
                out.append((msg, time.monotonic_ns()))
        return out

    # -- the three stages ----------------------------------------------------------------------
    def prepare(self, msg: Message, t_recv: int) -> Prepared | None:
        """Fit a decoded frame to the bundle's input; a frame that cannot be fitted (smaller
        than the crop) is counted as ``malformed`` and dropped."""
        t0 = time.perf_counter()
        try:
            # contiguous here, on the intake thread: a copy in the inference thread would
            # release the GIL between engine calls and let the other stages take it
            frame = np.ascontiguousarray(fit_image(msg.arrays[0], self.input_size, self.bundle.image.fit))
        except ValueError as exc:
            if msg.camera not in self._warned_unfit:
                log.warning("camera %s: %s (frames dropped as malformed)", msg.camera, exc)
                self._warned_unfit.add(msg.camera)
            self.metrics.drop(msg.camera, "malformed")
            return None
        return Prepared(msg, t_recv, frame, time.perf_counter() - t0)

    def infer(self, batch: list[Prepared]) -> tuple[dict, float]:
        """One engine call for the micro-batch; returns the outputs and seconds per frame.

        A single frame goes in as a view: a copy here (``np.stack``) releases the GIL just
        before the engine call, the intake and publish threads take it, and the engine waits
        for them (a thread trace on 2 cores showed 0.25-1.9 ms idle between engine calls with
        the copy, ~0.1 ms without).
        """
        t0 = time.perf_counter()
        images = batch[0].frame[None] if len(batch) == 1 else np.stack([p.frame for p in batch])
        out = self.engine.infer(images)
        return out, (time.perf_counter() - t0) / len(batch)

    def publish(self, batch: list[Prepared], out: dict, infer_s: float) -> None:
        """Postprocess, publish ``result.<camera>``, observe metrics, submit captures."""
        threshold = self.bundle.threshold
        for i, item in enumerate(batch):
            t0 = time.perf_counter()
            amap = out["anomaly_map"][i]
            if self.cfg.heatmap_size:
                amap = cv2.resize(amap, self.cfg.heatmap_size[::-1], interpolation=cv2.INTER_AREA)
            heat = amap.astype(np.float16)
            score = float(out["image_score"][i])
            label = threshold is not None and score > threshold
            t1 = time.perf_counter()
            msg, cam = item.msg, item.msg.camera
            stages = {"transport": max(0.0, (item.t_recv - msg.t_capture_ns) / 1e9),
                      "preprocess": item.preprocess_s, "infer": infer_s, "postprocess": t1 - t0}
            header = {"score": score, "label": int(label), "threshold": threshold,
                      "model": self.cfg.model_name, "stages": stages}
            try:
                self.sender.send(encode("result", cam, msg.seq, msg.t_capture_ns, [heat], **header))
            except TimeoutError as exc:  # an every_part results consumer stalled: keep serving
                log.warning("result of %s seq %d not delivered: %s", cam, msg.seq, exc)
            series = self.metrics.camera(cam, self.cfg.model_name)
            for stage, secs in stages.items():
                series.stages[stage].observe(secs)
            series.stages["publish"].observe(time.perf_counter() - t1)
            series.e2e.observe((time.monotonic_ns() - msg.t_capture_ns) / 1e9)
            series.inferred.inc()
            series.score.observe(calibrated_score(score, threshold))
            if label:
                series.anomalies.inc()
                if self.cfg.captures is not None:  # PNG encoding happens on the writer thread
                    self.cfg.captures.submit(cam, msg.seq, item.frame, heat,
                                             {"camera": cam, "seq": msg.seq,
                                              "t_capture_ns": msg.t_capture_ns, **header})
            self.frames_done += 1

    def update_camera_up(self) -> None:
        now = time.monotonic()
        for cam, seen in list(self.last_seen.items()):
            self.metrics.camera(cam, self.cfg.model_name).up.set(int(now - seen < self.cfg.camera_timeout_s))

    # -- threads -------------------------------------------------------------------------------
    def _intake_loop(self, done: threading.Event) -> None:
        next_up_check = 0.0
        while not done.is_set():
            for msg, t_recv in self.receive():
                item = self.prepare(msg, t_recv)
                if item is None:
                    continue
                replaced = self.handoff.put(msg.camera, item, done.is_set)
                if replaced is not None and self.handoff.latest_wins:
                    self.metrics.drop(msg.camera, "stale")
            if time.monotonic() >= next_up_check:  # a frame sets its camera up; this finds silent ones
                self.update_camera_up()
                next_up_check = time.monotonic() + 0.1

    def _publish_loop(self, done: threading.Event) -> None:
        while True:
            try:
                job = self.to_publish.get(timeout=0.1)
            except queue.Empty:
                if done.is_set():
                    return
                continue
            self.publish(*job)

    def _guarded(self, body, done: threading.Event, errors: list) -> None:
        """Run a stage thread; its failure stops the whole pipeline and is re-raised by run()."""
        try:
            body(done)
        except BaseException as exc:  # noqa: BLE001 - handed to run() to re-raise
            errors.append(exc)
            done.set()

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set: intake, inference (this thread) and publishing overlap.

        On stop, batches already inferred are published and captures flushed; frames received
        but not yet inferred (at most ``max_batch`` + 1, or one per camera) are left unscored.
        """
        if not self.warm:
            self.warmup()
        done, errors = threading.Event(), []
        threads = [threading.Thread(target=self._guarded, args=(body, done, errors), name=name,
                                    daemon=True)
                   for name, body in (("pipeline-intake", self._intake_loop),
                                      ("pipeline-publish", self._publish_loop))]
        for t in threads:
            t.start()
        live = self.cfg.frames.mode == "live"
        try:
            while not stop.is_set() and not done.is_set():
                batch = self.handoff.take(self.cfg.max_batch, 0.0 if live else self.cfg.max_wait_ms / 1000,
                                          timeout_s=0.1)
                if batch:
                    job = (batch, *self.infer(batch))
                    while not done.is_set():  # the publisher may have failed: do not block on it
                        try:
                            self.to_publish.put(job, timeout=0.1)
                            break
                        except queue.Full:
                            continue
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()
            for t in threads:
                t.join()
            if self.cfg.captures is not None:
                self.cfg.captures.flush()
        if errors:
            raise errors[0]

    def close(self) -> None:
        self.receiver.close()
        self.sender.close()
