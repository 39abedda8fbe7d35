"""The inference pipeline: frames in from a receiver, results out to sinks, metrics on the side.

The pipeline builds no sockets: it reads raw messages from a frame receiver (anything with
``drain(timeout_ms, limit)`` and ``close()``, :mod:`edge_inspect.runtime.transport`), takes
the model from a :class:`~edge_inspect.runtime.model_slot.ModelSlot` once per batch, and
hands every result to a list of sinks (:mod:`edge_inspect.runtime.sinks`). Frames are
mappings plane name -> array from the source to the engine; each bundle input plane is fed
from the frame plane of its modality and fitted with its own fit mode and interpolation.

Three threads overlap so that the engine runs back to back (the Python work of one frame
happens while the engine scores another; the engine releases the GIL):

1. **intake**: receive (``live`` drains everything queued and keeps the newest frame per
   camera, older ones are ``stale`` drops, ``seq`` gaps are ``hwm`` drops; ``every_part``
   takes frames in order), decode (messages that do not decode, lack a plane the bundle
   needs or carry planes of mismatched sizes are counted as ``malformed`` and skipped;
   frames naming a camera the profile does not list, as ``unknown_camera`` under the one
   label ``camera="unknown"``; nothing a message holds can raise out of intake),
   preprocess (``runtime.preprocess``), hand over
   (:mod:`runtime.handoff`). A frame in shared memory (``transport: shm``) is fitted in
   place, the one copy the pipeline makes; if its slot was rewritten meanwhile it is dropped
   as ``overwritten`` (a reference that does not fit its camera's ring, as ``malformed``).
2. **infer** (the thread that calls :meth:`Pipeline.run`): takes up to ``max_batch``
   frames (``every_part`` waits at most ``max_wait_ms`` for the batch to fill; ``live``
   takes what is there), one engine call per micro-batch (frames of a batch > 1 are copied
   into a preallocated batch buffer per input). Between engine calls this thread
   runs only a few lines of Python and nothing that releases the GIL, so it gets straight
   back into the engine (which releases it) instead of queueing behind the other stages.
3. **publish**: postprocess (label = score > threshold; heatmap downsampled to
   ``heatmap_size``), metrics, and a :class:`~edge_inspect.runtime.sinks.Result` (score,
   label, threshold, model, seq, capture time, per-stage seconds, float16 heatmap) for every
   sink (results socket, captures).

Per-stage seconds cover work only; time spent waiting between stages shows in the
end-to-end latency.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from dataclasses import dataclass

import cv2
import numpy as np

from edge_inspect.runtime.handoff import FrameHandoff
from edge_inspect.runtime.logs import ThrottledLog
from edge_inspect.runtime.metrics import UNATTRIBUTED, RuntimeMetrics, calibrated_score
from edge_inspect.runtime.model_slot import ModelSlot, ServingModel
from edge_inspect.runtime.preprocess import fit_image
from edge_inspect.runtime.sinks import Result
from edge_inspect.runtime.transport.shm_frames import RingSet
from edge_inspect.runtime.transport.shm_ring import StaleReference
from edge_inspect.runtime.transport.wire import MalformedMessage, Message, decode

log = logging.getLogger(__name__)


@dataclass
class PipelineConfig:
    """``cameras``: the only ids frames are scored from (the profile's); a frame naming any
    other is dropped as ``unknown_camera`` under one fixed label, so no sender can create
    series or state by inventing ids."""

    cameras: tuple[str, ...]
    mode: str = "live"  # live | every_part (the frame transport's delivery mode)
    max_batch: int = 4
    max_wait_ms: float = 5.0
    heatmap_size: tuple[int, int] | None = (64, 64)
    camera_timeout_s: float = 5.0
    max_fps: float = 1000.0  # a seq gap beyond what a camera could send at this rate is a restart

    def __post_init__(self) -> None:
        if isinstance(self.cameras, str) or not self.cameras:
            raise ValueError(f"PipelineConfig.cameras must list camera ids, got {self.cameras!r}")
        self.cameras = tuple(self.cameras)


@dataclass
class Prepared:
    """A decoded frame fitted to the bundle's input planes, on its way to the engine."""

    msg: Message
    t_recv: int  # monotonic ns when it was received
    planes: dict[str, np.ndarray]  # input name -> fitted, contiguous (H, W, C)
    preprocess_s: float
    restart: bool = False  # the first frame of a new sequence of its camera
    bundle: object = None  # the bundle its planes were fitted for (a reload may change it)


class Pipeline:
    """Runs the slot's model on frames from ``frames`` and hands results to ``sinks``."""

    def __init__(self, slot: ModelSlot, frames, sinks: list, cfg: PipelineConfig,
                 metrics: RuntimeMetrics, rings: RingSet | None = None) -> None:
        """``rings``: the cameras' shared-memory frame rings (``transport: shm``), if any."""
        self.slot, self.receiver, self.sinks, self.cfg, self.metrics = slot, frames, list(sinks), cfg, metrics
        self.rings = rings or RingSet({})
        self._batch_buffers: dict[str, np.ndarray] = {}  # input name -> (max_batch, H, W, C)
        self.known = frozenset(cfg.cameras)
        self._restarting: set[str] = set()  # cameras whose last decoded frame began a new sequence
        self._restart_unscored: set[str] = set()  # ... and that frame could not be fitted
        self.last_seq: dict[str, int] = {}  # keys: profile cameras only
        self.last_seen: dict[str, float] = {}
        self.noisy_log = ThrottledLog(log, every_s=60.0)  # lines a sender could repeat at will
        self.warm = False
        self.frames_done = 0
        self.handoff = FrameHandoff(latest_wins=cfg.mode == "live", capacity=cfg.max_batch)
        self.to_publish: queue.Queue = queue.Queue(maxsize=2)  # inferred batches
        self._warned_unfit: set[str] = set()
        metrics.start_cameras(cfg.cameras, slot.current.name)
        # results carry a downscaled frame until this time (a monitor's lease: POST /preview)
        self.preview_until = 0.0

    @property
    def bundle(self):
        return self.slot.current.bundle

    @property
    def engine(self):
        return self.slot.current.engine

    # -- readiness ---------------------------------------------------------------------------
    def ready(self) -> dict[str, bool]:
        now = time.monotonic()
        checks = {"engine_warm": self.warm}
        for cam in self.cfg.cameras:
            checks[f"camera_{cam}_fresh"] = now - self.last_seen.get(cam, -1e9) < self.cfg.camera_timeout_s
        return checks

    def warmup(self) -> None:
        model = self.slot.current
        model.engine.warmup()
        self.warm = True
        self.announce_model(model)

    def announce_model(self, model, old=None) -> None:
        """``model_info`` and the threshold gauge name ``model`` (and no longer ``old``)."""
        if old is not None:
            try:
                self.metrics.model_info.remove(old.name, old.bundle_id, old.backend, old.precision)
                if old.name != model.name:
                    self.metrics.threshold.remove(old.name)
            except KeyError:
                pass
        self.metrics.model_info.labels(model.name, model.bundle_id, model.backend, model.precision).set(1)
        self.metrics.threshold.labels(model.name).set(
            float("nan") if model.threshold is None else model.threshold)

    # -- receive -----------------------------------------------------------------------------
    def _decode(self, parts: list) -> Message | None:
        """A frame of a profile camera, or None (counted): whatever a message holds, nothing
        it carries may raise out of here, add series or move counters without bound."""
        try:
            msg = decode(parts)
        except MalformedMessage as exc:
            log.debug("malformed message dropped: %s", exc.reason)
            self.metrics.drop(UNATTRIBUTED, "malformed")
            return None
        except Exception as exc:  # noqa: BLE001 - a decoder bug must cost one message, not the service
            self.noisy_log.warning(("decoder", type(exc).__name__), "message dropped: the decoder "
                                     "failed on it with %s: %s", type(exc).__name__, exc)
            self.metrics.drop(UNATTRIBUTED, "malformed")
            return None
        cam = msg.camera
        if cam not in self.known:
            self.metrics.drop(UNATTRIBUTED, "unknown_camera")
            return None
        if msg.kind != "frame" or not self._planes_fit(msg):
            self.rings.release(msg)
            self.metrics.drop(cam, "malformed")
            return None
        series = self.metrics.camera(cam, self.slot.current.name)
        series.received.inc()
        series.last_frame.set(time.time())
        series.up.set(1)
        now = time.monotonic()
        prev, seen = self.last_seq.get(cam), self.last_seen.get(cam, now)
        self.last_seen[cam] = now
        if prev is not None and msg.seq > prev + 1:
            gap = msg.seq - prev - 1
            if gap <= self.cfg.max_fps * (now - seen + 1.0):
                self.metrics.drop(cam, "hwm", gap)
            else:  # more frames than the camera could have sent: a new sequence, not losses
                self.noisy_log.info(cam, "camera %s: seq jumped from %d to %d; taken as a restart "
                                      "of its sequence", cam, prev, msg.seq)
                self._restarting.add(cam)
        elif prev is not None and msg.seq <= prev:
            self.noisy_log.info(cam, "camera %s restarted its sequence (%d after %d)", cam, msg.seq, prev)
            self._restarting.add(cam)
        self.last_seq[cam] = msg.seq
        return msg

    def _reset_sequence(self, camera: str) -> None:
        """A new sequence is a new scene (a restarted camera, a new batch of parts): the
        camera's carried state goes. In every_part this runs just before the sequence's first
        frame is scored, so frames of the old sequence still queued are scored (and carry)
        before it."""
        if self.slot.reset_state(camera, "sequence_restart"):
            self.metrics.state_resets.labels("sequence_restart").inc()

    def _planes_fit(self, msg: Message) -> bool:
        """Every input plane of the bundle is in the frame (by modality) with its channel count
        and dtype, and all of the frame's planes have one size."""
        specs = msg.plane_specs
        sizes = {shape[:2] for shape, _ in specs.values()}
        if len(sizes) != 1 or any(len(shape) != 3 or 0 in shape for shape, _ in specs.values()):
            return False
        for p in self.bundle.inputs:
            shape, dtype = specs.get(p.modality, ((), None))
            if len(shape) != 3 or shape[2] != p.channels or dtype != np.dtype(p.dtype):
                return False
        return True

    def _decode_marked(self, parts: list) -> tuple[Message, bool] | None:
        """:meth:`_decode`, and whether the frame begins a new sequence of its camera."""
        msg = self._decode(parts)
        if msg is None:
            return None
        restart = msg.camera in self._restarting
        self._restarting.discard(msg.camera)
        return msg, restart

    def receive(self) -> list[tuple[Message, int, bool]]:
        """Decoded frames with their receive time (ns) and whether each begins a new sequence
        of its camera, per the delivery mode."""
        if self.cfg.mode == "live":
            raw = self.receiver.drain(timeout_ms=100)
            now = time.monotonic_ns()
            newest: dict[str, tuple[Message, bool]] = {}
            for parts in raw:
                decoded = self._decode_marked(parts)
                if decoded is None:
                    continue
                msg, restart = decoded
                if msg.camera in newest:  # (live: its ring slot needs no release, see prepare)
                    self.metrics.drop(msg.camera, "stale")
                    restart = restart or newest[msg.camera][1]  # a restart among the dropped
                newest[msg.camera] = (msg, restart)
            return [(m, now, r) for m, r in newest.values()]  # one per camera
        out = []  # every_part: in order, nothing dropped (the batch fills in the hand-over)
        for parts in self.receiver.drain(timeout_ms=100, limit=self.cfg.max_batch):
            decoded = self._decode_marked(parts)
            if decoded is not None:
                out.append((decoded[0], time.monotonic_ns(), decoded[1]))
        return out

    # -- the three stages ----------------------------------------------------------------------
    def prepare(self, msg: Message, t_recv: int, restart: bool = False) -> Prepared | None:
        """Fit a decoded frame's planes to the bundle's inputs; a frame that cannot be fitted
        (smaller than the crop) is counted as ``malformed`` and dropped (a restart it began
        passes to the camera's next frame)."""
        t0 = time.perf_counter()
        if msg.camera in self._restart_unscored:
            self._restart_unscored.discard(msg.camera)
            restart = True
        bundle = self.bundle  # once: a reload may swap it meanwhile (infer re-fits then)
        try:
            if msg.ref is not None:
                self.rings.read(msg)  # views in place; StaleReference if overwritten or forged
            # contiguous here, on the intake thread: a copy in the inference thread would
            # release the GIL between engine calls and let the other stages take it
            fitted = fit_planes(msg.planes, bundle)
        except StaleReference as exc:
            return self._unscored(msg, restart, exc.reason)
        except Exception as exc:  # noqa: BLE001 - ValueError (too small), or cv2 on odd input
            if msg.camera not in self._warned_unfit:  # profile cameras only: bounded
                log.warning("camera %s: %s (frames dropped as malformed)", msg.camera, exc)
                self._warned_unfit.add(msg.camera)
            self.rings.release(msg)
            return self._unscored(msg, restart, "malformed")
        if msg.ref is not None:
            fitted = owned_copies(fitted, msg.arrays)
            # every_part keeps the slot until the frame is in the engine (a reload may fit
            # it again); a live camera never waits for a slot, so nothing is handed back
            if not self.rings.unchanged(msg):  # rewritten meanwhile
                return self._unscored(msg, restart, "overwritten")
        return Prepared(msg, t_recv, fitted, time.perf_counter() - t0, restart, bundle)

    def _unscored(self, msg: Message, restart: bool, reason: str) -> None:
        """Count a frame dropped before scoring; a restart it began passes to the next frame."""
        self.metrics.drop(msg.camera, reason)
        if restart:
            self._restart_unscored.add(msg.camera)
        return None

    def _refit(self, item: Prepared, bundle) -> bool:
        """Fit a frame prepared before a reload for the new bundle: nothing to do when the
        inputs are the same; else from the frame again (False when that is no longer possible:
        it does not fit the new inputs, or its shared-memory slot has been rewritten)."""
        if item.bundle is None or item.bundle is bundle:
            return True
        if item.bundle.inputs == bundle.inputs:
            item.bundle = bundle
            return True
        try:
            planes = fit_planes(item.msg.planes, bundle)
        except Exception:  # noqa: BLE001 - it does not fit the new inputs: dropped, counted
            self.metrics.drop(item.msg.camera, "malformed")
            return False
        if item.msg.ref is not None:
            planes = owned_copies(planes, item.msg.arrays)
            if not self.rings.unchanged(item.msg):
                self.metrics.drop(item.msg.camera, "overwritten")
                return False
        item.planes, item.bundle = planes, bundle
        return True

    def _batch_feeds(self, batch: list[Prepared], bundle) -> dict[str, np.ndarray]:
        """The engine's inputs: one frame as a view; more, copied into a preallocated buffer
        per input (made once, again only when a reload changes the input's shape)."""
        if len(batch) == 1:
            return {name: plane[None] for name, plane in batch[0].planes.items()}
        feeds = {}
        for p in bundle.inputs:
            first = batch[0].planes[p.name]
            buf = self._batch_buffers.get(p.name)
            shape = (max(self.cfg.max_batch, len(batch)), *first.shape)
            if buf is None or buf.shape != shape or buf.dtype != first.dtype:  # first batch or a reload
                names = {q.name for q in bundle.inputs}  # drop inputs a reloaded bundle no longer has
                self._batch_buffers = {k: v for k, v in self._batch_buffers.items() if k in names}
                buf = self._batch_buffers[p.name] = np.empty(shape, first.dtype)
            for i, item in enumerate(batch):
                buf[i] = item.planes[p.name]
            feeds[p.name] = buf[:len(batch)]
        return feeds

    def infer(self, batch: list[Prepared]) -> tuple[ServingModel, dict, float]:
        """One engine call for the micro-batch with the slot's current model; returns the
        model, its outputs and seconds per frame.

        A single frame goes in as a view: a copy here (into the batch buffer) releases the GIL
        just before the engine call, the intake and publish threads take it, and the engine waits
        for them (a thread trace on 2 cores showed 0.25-1.9 ms idle between engine calls with
        the copy, ~0.1 ms without).
        """
        t0 = time.perf_counter()
        model = self.slot.current  # once per batch: a swap takes effect between batches
        bundle = model.bundle
        kept = [item for item in batch if self._refit(item, bundle)]  # prepared before a reload
        if self.cfg.mode == "every_part":
            for item in batch:  # fitted for this bundle now: the camera may reuse the slots
                self.rings.release(item.msg)
        batch[:] = kept
        if not batch:
            return model, {bundle.score_output: np.zeros(0), bundle.map_output: np.zeros((0, 1, 1))}, 0.0
        feeds = self._batch_feeds(batch, bundle)
        names = [bundle.score_output, bundle.map_output]
        if bundle.state:
            out = self._infer_stateful(model, batch, feeds, names + [s.output for s in bundle.state])
        else:
            out = model.engine.infer(feeds, names)
        return model, out, (time.perf_counter() - t0) / len(batch)

    def _infer_stateful(self, model: ServingModel, batch: list[Prepared], feeds: dict,
                        names: list[str]) -> dict:
        """Engine calls for a bundle with per-camera state: frames of one camera in turn
        (round r holds each camera's r-th frame of the batch), each starting from the state
        the previous one left, restarts applied in frame order."""
        rounds: list[list[int]] = []
        seen: dict[str, int] = {}
        for i, item in enumerate(batch):
            r = seen.get(item.msg.camera, 0)
            seen[item.msg.camera] = r + 1
            if r == len(rounds):
                rounds.append([])
            rounds[r].append(i)
        parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
        for idx in rounds:
            for i in idx:
                if batch[i].restart:
                    self._reset_sequence(batch[i].msg.camera)
            cameras = [batch[i].msg.camera for i in idx]
            generations = self.slot.generations(cameras)
            sub = feeds if len(rounds) == 1 else {k: v[idx] for k, v in feeds.items()}
            out = model.engine.infer(sub | self.slot.state_feeds(model, cameras), names)
            self.slot.keep_state(model, cameras, out, generations)
            for name in names:
                parts[name].append(out[name])
        if len(rounds) == 1:
            return {name: p[0] for name, p in parts.items()}
        order = np.argsort(np.concatenate(rounds), kind="stable")  # back to the batch's order
        return {name: np.concatenate(p)[order] for name, p in parts.items()}

    def publish(self, batch: list[Prepared], model: ServingModel, out: dict, infer_s: float) -> None:
        """Postprocess, observe metrics, hand a result per frame to every sink."""
        threshold = model.threshold
        scores, maps = out[model.bundle.score_output], out[model.bundle.map_output]
        for i, item in enumerate(batch):
            t0 = time.perf_counter()
            amap = maps[i]
            if self.cfg.heatmap_size:
                amap = cv2.resize(amap, self.cfg.heatmap_size[::-1], interpolation=cv2.INTER_AREA)
            heat = amap.astype(np.float16)
            score = float(scores[i])
            label = threshold is not None and score > threshold
            t1 = time.perf_counter()
            msg, cam = item.msg, item.msg.camera
            stages = {"transport": max(0.0, (item.t_recv - msg.t_capture_ns) / 1e9),
                      "preprocess": item.preprocess_s, "infer": infer_s, "postprocess": t1 - t0}
            preview = preview_of(item.planes) if time.monotonic() < self.preview_until else None
            result = Result(cam, msg.seq, msg.t_capture_ns, score, bool(label), threshold, model.name,
                            stages, heat, item.planes, source_name(msg.header), bundle=model.bundle_id,
                            preview=preview)
            for sink in self.sinks:
                sink.publish(result)
            series = self.metrics.camera(cam, model.name)
            for stage, secs in stages.items():
                series.stages[stage].observe(secs)
            series.stages["publish"].observe(time.perf_counter() - t1)
            series.e2e.observe((time.monotonic_ns() - msg.t_capture_ns) / 1e9)
            series.inferred.inc()
            series.score.observe(calibrated_score(score, threshold))
            series.raw_score.set(score)
            if label:
                series.anomalies.inc()
            self.frames_done += 1

    def update_camera_up(self) -> None:
        now = time.monotonic()
        for cam, seen in list(self.last_seen.items()):
            up = int(now - seen < self.cfg.camera_timeout_s)
            self.metrics.camera(cam, self.slot.current.name).up.set(up)

    # -- threads -------------------------------------------------------------------------------
    def _intake_loop(self, done: threading.Event) -> None:
        next_up_check = 0.0
        while not done.is_set():
            for msg, t_recv, restart in self.receive():
                item = self.prepare(msg, t_recv, restart)
                if item is None:
                    continue
                if item.restart and self.handoff.latest_wins:
                    # live: no older frame of the camera waits (it would be replaced), so
                    # the reset needs no ordering; a batch in the engine keeps nothing
                    item.restart = False
                    self._reset_sequence(msg.camera)
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
        live = self.cfg.mode == "live"
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
            for sink in self.sinks:
                sink.flush()
        if errors:
            raise errors[0]

    def count_unreceived_tail(self, camera: str, sent: int) -> int:
        """Count as ``hwm`` drops the frames a finished source sent after the last one received
        (seq gaps show only losses between received frames); returns how many."""
        last = self.last_seq.get(camera, -1)
        missing = max(0, sent - 1 - last)
        if missing:
            self.metrics.drop(camera, "hwm", missing)
            self.last_seq[camera] = sent - 1
        return missing

    def close(self) -> None:
        self.receiver.close()
        for sink in self.sinks:
            sink.close()


SOURCE_NAME = re.compile(r"[\w.\- ()+,=@]{1,255}")  # a file name a replay camera sends


def source_name(header: dict) -> str | None:
    """The frame's ``source`` (a replayed file's name) when it is a plain file name, else None:
    a sender's odd value is ignored, never fatal, never a path."""
    name = header.get("source")
    return name if isinstance(name, str) and SOURCE_NAME.fullmatch(name) else None


def fit_planes(planes: dict[str, np.ndarray], bundle) -> dict[str, np.ndarray]:
    """A frame's planes fitted to each of ``bundle``'s inputs, contiguous (raises when a
    plane is missing or too small)."""
    return {p.name: np.ascontiguousarray(fit_image(planes[p.modality], (p.height, p.width), p.fit,
                                                   p.interpolation))
            for p in bundle.inputs}


def owned_copies(fitted: dict[str, np.ndarray], sources: list[np.ndarray]) -> dict[str, np.ndarray]:
    """``fitted`` with every plane that is still a view of ``sources`` (shared memory the
    camera will rewrite: a frame already at the input size, a crop of whole rows) copied."""
    return {name: plane.copy() if any(np.may_share_memory(plane, src) for src in sources) else plane
            for name, plane in fitted.items()}


PREVIEW_SIDE = 320  # pixels, the longer side of a monitor's preview


def preview_of(planes: dict[str, np.ndarray]) -> np.ndarray | None:
    """The fitted RGB frame shrunk to at most :data:`PREVIEW_SIDE` (None without an RGB plane)."""
    images = [p for p in planes.values() if p.dtype == np.uint8 and p.ndim == 3 and p.shape[2] == 3]
    if not images:
        return None
    frame = images[0]
    scale = PREVIEW_SIDE / max(frame.shape[:2])
    if scale >= 1:
        return np.ascontiguousarray(frame)
    size = (max(1, round(frame.shape[1] * scale)), max(1, round(frame.shape[0] * scale)))
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
