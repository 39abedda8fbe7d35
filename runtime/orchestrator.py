"""Starts and stops a runtime: camera processes, the pipeline and the health server.

It wires the parts the pipeline itself never builds: the frame receiver (ZeroMQ; one SUB
dialling every camera's PUB in ``live``, one bound PULL in ``every_part``, with
``MAXMSGSIZE`` from the bundle's largest plane), with ``transport: shm`` one shared-memory
frame ring per camera process (created, locked and removed here), the model slot (bundle +
engine), the sinks (results socket, captures, MQTT) and the metrics. The pipeline exists
(and is warm) before any camera sends. tcp endpoints use CURVE when the profile has a
``security`` section: the runtime binds with its server key and accepts the listed client
keys plus a key pair it makes for its own camera processes at start. One runtime per
``endpoint_dir`` and per captures folder (a lock). SIGTERM or Ctrl-C (handled by the CLI) stop everything: the
sources at their next frame, the pipeline after its current batch; children still running
after the grace period are killed; children of a runtime killed outright die with it.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time

import numpy as np
import zmq
from prometheus_client.core import CounterMetricFamily

from edge_inspect.runtime.bundle import Bundle, load_bundle
from edge_inspect.runtime.camera_process import EXIT_GAVE_UP, SOURCE_EVENTS, SourceEvents, camera_process
from edge_inspect.runtime.capture import CaptureStore
from edge_inspect.runtime.keys import CurveKeys, load_server_keys
from edge_inspect.runtime.locks import FolderLock
from edge_inspect.runtime.metrics import RuntimeMetrics
from edge_inspect.runtime.model_slot import ModelSlot
from edge_inspect.runtime.pipeline import Pipeline, PipelineConfig
from edge_inspect.runtime.profile import Profile
from edge_inspect.runtime.sinks import CaptureSink, ResultSocketSink
from edge_inspect.runtime.source_registry import EXTERNAL, check_planes, check_source, is_finite
from edge_inspect.runtime.supervisor import ENDED, SourceSupervisor
from edge_inspect.runtime.transport.shm_frames import RingSet
from edge_inspect.runtime.transport.shm_ring import aligned
from edge_inspect.runtime.transport.sockets import Receiver, Sender, TransportConfig, stop_authenticators

log = logging.getLogger(__name__)


def needed_planes(bundle: Bundle) -> dict[str, int]:
    """The frame planes ``bundle`` reads (modalities) and the bytes per pixel of each."""
    planes: dict[str, int] = {}
    for p in bundle.inputs:
        planes[p.modality] = max(planes.get(p.modality, 0), p.channels * np.dtype(p.dtype).itemsize)
    return planes


def frame_limit_bytes(bundle: Bundle, max_frame_pixels: int) -> int:
    """The largest frame part the runtime reads: ``max_frame_pixels`` x the largest bytes per
    pixel of the bundle's input planes (plus room for a small header part)."""
    return max(max_frame_pixels * max(needed_planes(bundle).values()), 64 * 1024)


class SourceEventsCollector:
    """``edge_inspect_source_events_total{camera,event}`` from the cameras' shared counters."""

    def __init__(self, events: dict[str, SourceEvents]) -> None:
        self.events = events

    def collect(self):
        family = CounterMetricFamily("edge_inspect_source_events", "Events inside camera processes: "
                                     f"{', '.join(SOURCE_EVENTS)}", labels=["camera", "event"])
        for cam, counters in self.events.items():
            for event, n in counters.counts().items():
                family.add_metric([cam, event], n)
        yield family


class Runtime:
    """Sources (processes) + pipeline + health server, started and stopped together."""

    def __init__(self, cfg: Profile) -> None:
        self.cfg = cfg
        self.cameras = [c.as_dict() for c in cfg.cameras]
        for cam in self.cameras:
            check_source(cam)
        self.bundle = load_bundle(cfg.bundle)
        self.planes = needed_planes(self.bundle)  # also what the frame rings carry (transport: shm)
        for cam in self.cameras:
            check_planes(cam, list(self.planes), cfg.bundle)
        self.curve: CurveKeys | None = None
        if cfg.security is not None:
            self.curve = load_server_keys(cfg.security.server_key, cfg.security.client_keys)
            if not cfg.tcp_endpoints:
                log.warning("security is set but no endpoint is tcp; ipc endpoints are guarded by "
                            "the permissions of %s", cfg.endpoint_dir)
        elif cfg.tcp_endpoints:
            log.warning("tcp endpoints %s take anyone's messages; add a security section to the "
                        "profile (`edge-inspect keys`)", cfg.tcp_endpoints)
        self.own_public, self.own_secret = zmq.curve_keypair()  # this runtime's camera processes
        self.max_frame_bytes = frame_limit_bytes(self.bundle, cfg.pipeline.max_frame_pixels)
        self.metrics = RuntimeMetrics()
        self.mp = mp.get_context("spawn")
        self.processed = [c for c in self.cameras if c["source"] != EXTERNAL]  # run as processes
        self.events = {c["id"]: SourceEvents(self.mp) for c in self.processed}
        self.metrics.registry.register(SourceEventsCollector(self.events))
        p = cfg.pipeline
        self.pipeline_cfg = PipelineConfig(tuple(c.id for c in cfg.cameras), cfg.mode, p.max_batch,
                                           p.max_wait_ms, p.heatmap_size, p.camera_timeout_s)
        self.stop = threading.Event()
        self.supervisor = SourceSupervisor(self._spawn_source, self.processed, self.metrics.source_restarts)
        self.pipeline: Pipeline | None = None
        self.rings: RingSet | None = None
        self.health = None
        self.locks: list[FolderLock] = []
        self.error: BaseException | None = None  # why the pipeline thread ended, if it failed

    @property
    def processes(self) -> dict[str, mp.Process]:
        """The current process of every camera (a restarted camera has a new one)."""
        return self.supervisor.processes

    def _curve(self, endpoint: str) -> bool:
        return self.curve is not None and endpoint.startswith("tcp://")

    def _camera_transport(self, endpoint: str) -> dict:
        """CURVE settings of a camera process's sender (empty without security or on ipc)."""
        if not self._curve(endpoint):
            return {}
        if self.cfg.mode == "every_part":  # the runtime's PULL is the server
            return {"curve_server_public": self.curve.server_public,
                    "curve_client_secret": self.own_secret, "curve_client_public": self.own_public}
        return {"curve_server_secret": self.curve.server_secret,  # live: the camera's PUB binds
                "curve_server_public": self.curve.server_public, "curve_client_keys": [self.own_public]}

    def _spawn_source(self, cam: dict) -> mp.Process:
        endpoint = self.cfg.frames_endpoint(cam["id"])
        ring = self.rings.name(cam["id"]) if self.rings is not None else None
        proc = self.mp.Process(target=camera_process, name=f"source-{cam['id']}", daemon=True,
                               args=(cam, endpoint, self.cfg.mode, os.getpid(), self.events[cam["id"]],
                                     self.max_frame_bytes, self._camera_transport(endpoint), ring,
                                     tuple(self.planes)))
        proc.start()
        return proc

    @property
    def slot_bytes(self) -> int:
        """``transport: shm``: a slot holds a frame of ``frame_pixels`` with the bundle's planes
        (each plane starting on a cache line)."""
        return sum(aligned(self.cfg.transport.frame_pixels * bpp) for bpp in self.planes.values())

    @property
    def ring_bytes(self) -> int:
        """Shared memory the frame rings take (0 without ``transport: shm``)."""
        if self.cfg.transport.kind != "shm":
            return 0
        return len(self.processed) * self.cfg.transport.slots * self.slot_bytes

    def _make_rings(self) -> RingSet | None:
        """``transport: shm``: a ring per camera process (reserved in full at start)."""
        t = self.cfg.transport
        if t.kind != "shm" or not self.processed:
            return None
        return RingSet.create([c["id"] for c in self.processed], t.slots, self.slot_bytes)

    def check_transport(self, bundle: Bundle) -> None:
        """A reloaded bundle must read the planes the frame rings carry (they are sized and
        filled at start); a ValueError says what differs."""
        if self.rings is None:
            return
        for plane, nbytes in needed_planes(bundle).items():
            if plane not in self.planes or nbytes > self.planes[plane]:
                raise ValueError(f"the shared-memory frame rings carry {self.planes} (plane: bytes per "
                                 f"pixel), the bundle needs {plane} with {nbytes}: restart serve to "
                                 "change the planes")

    def _frame_receiver(self) -> Receiver:
        endpoints = [self.cfg.frames_endpoint(c.id) for c in self.cfg.cameras]
        keys: dict = {}
        if self._curve(endpoints[0]):
            keys = ({"curve_server_secret": self.curve.server_secret,
                     "curve_server_public": self.curve.server_public,
                     "curve_client_keys": [*self.curve.clients, self.own_public]}
                    if self.cfg.mode == "every_part" else
                    {"curve_server_public": self.curve.server_public,
                     "curve_client_secret": self.own_secret, "curve_client_public": self.own_public})
        cfg = TransportConfig(endpoints[0], mode=self.cfg.mode, max_message_bytes=self.max_frame_bytes,
                              **keys)
        if self.cfg.mode == "every_part":
            return Receiver(cfg)
        return Receiver(cfg, also_connect=endpoints[1:])

    def _sinks(self) -> list:
        endpoint = self.cfg.results_endpoint
        keys = ({"curve_server_secret": self.curve.server_secret,
                 "curve_server_public": self.curve.server_public, "curve_client_keys": self.curve.clients}
                if self._curve(endpoint) else {})
        results = Sender(TransportConfig(endpoint, mode="live", hwm=1000, **keys))  # small messages
        sinks: list = []
        if self.cfg.captures is not None:  # first: it names the capture in the result (submit
            skipped = self.metrics.captures_skipped  # only queues it) for the sinks after it
            store = CaptureStore(self.cfg.captures.folder, self.cfg.captures.retain,
                                 on_skip=lambda cam: skipped.labels(cam).inc())
            sinks.append(CaptureSink(store))
        sinks.append(ResultSocketSink(results))
        if self.cfg.mqtt is not None:
            from edge_inspect.runtime.mqtt_sink import MqttSink

            sinks.append(MqttSink(self.cfg.mqtt, self.metrics.sink_messages, self.metrics.mqtt_connected))
        return sinks

    def start(self, sources: bool = True) -> Runtime:
        """Open the engine, the endpoints and /metrics, run the pipeline and (``sources``)
        the cameras; ``sources=False`` holds the cameras back for :meth:`start_sources`, so a
        caller can subscribe to the results before the first frame."""
        from edge_inspect.runtime.engines import open_engine
        from edge_inspect.runtime.health import HealthServer

        self.locks.append(FolderLock(self.cfg.endpoint_dir, "endpoint_dir", private=True))
        try:
            if self.cfg.captures is not None:
                self.locks.append(FolderLock(self.cfg.captures.folder, "captures folder"))
            engine = open_engine(self.bundle, self.cfg.backend, **self.cfg.backend_options)
            slot = ModelSlot(self.bundle, engine, self.cfg.model_name)
            self.rings = self._make_rings()
            frames = sinks = None
            try:
                frames = self._frame_receiver()
                sinks = self._sinks()
            except zmq.ZMQError as exc:  # an endpoint in use, a bad address or ipc folder
                for part in [frames, *(sinks or [])]:
                    if part is not None:
                        part.close()
                raise ValueError(f"cannot open the frames or results endpoint ({exc}); a tcp port "
                                 "may be in use or the address wrong: fix `frames` / `results` in "
                                 "the profile") from None
            self.pipeline = Pipeline(slot, frames, sinks, self.pipeline_cfg, self.metrics, self.rings)
        except BaseException:
            self._release()
            raise
        try:
            self.pipeline.warmup()
        except BaseException:  # an engine that fails its first call: nothing may stay behind
            self.pipeline.close()
            self._release()
            raise
        from edge_inspect.runtime.reload import Reloader

        self.reloader = Reloader(self)
        http = self.cfg.http
        if http.port is not None:
            try:
                self.health = HealthServer(self.metrics.registry, self.pipeline.ready, http.host,
                                           http.port, {"/state/reset": self._reset_command,
                                                       "/model/reload": self._reload_command,
                                                       "/preview": self._preview_command}).start()
            except OSError as exc:
                self.pipeline.close()
                self._release()
                raise ValueError(f"cannot serve /metrics on {http.host}:{http.port} ({exc.strerror or exc}); "
                                 "choose another http.port (0 picks a free one)") from None
        self.thread = threading.Thread(target=self._run_pipeline, name="pipeline", daemon=True)
        self.thread.start()
        if sources:
            self.start_sources()
        return self

    def start_sources(self) -> None:
        """Start the camera processes and their supervisor."""
        self.supervisor.start_all()
        self.supervisor_thread = threading.Thread(target=self.supervisor.run, args=(self.stop,),
                                                  name="source-supervisor", daemon=True)
        self.supervisor_thread.start()

    def reload(self, path: str | None = None, reason: str = "command") -> str:
        """Swap in the bundle at ``path`` (default: the profile's) between batches; returns its
        id, or raises :class:`~edge_inspect.runtime.reload.ReloadError` (old model kept)."""
        return self.reloader.reload(path, reason)

    def _reload_command(self, query: dict[str, str]) -> tuple[int, dict]:
        """``POST /model/reload`` (the profile's bundle again) or ``?bundle=PATH``; answers once
        the new model serves (200) or the reload failed and the old one still does (409)."""
        from edge_inspect.runtime.reload import ReloadError

        unknown = sorted(set(query) - {"bundle"})
        if unknown:
            return 400, {"error": f"/model/reload takes bundle=<path> or nothing, got {sorted(query)}"}
        try:
            return 200, {"serving": self.reload(query.get("bundle") or None, "command")}
        except ReloadError as exc:
            return 409, {"error": str(exc), "serving": self.pipeline.slot.current.bundle_id}

    def _preview_command(self, query: dict[str, str]) -> tuple[int, dict]:
        """``POST /preview?seconds=N`` (at most 300): results carry a downscaled frame for at
        least the next N seconds (each monitor renews its lease while it runs; one monitor
        never shortens another's)."""
        try:
            seconds = float(query.get("seconds", "30"))
        except ValueError:
            seconds = -1.0
        if set(query) - {"seconds"} or not 0 <= seconds <= 300:
            return 400, {"error": f"/preview takes seconds=<0..300>, got {dict(query)}"}
        self.pipeline.preview_until = max(self.pipeline.preview_until, time.monotonic() + seconds)
        return 200, {"preview_seconds": seconds}

    def reset_state(self, camera: str | None = None) -> bool:
        """Forget the carried model state of ``camera`` (every camera when None), as the
        control command does; False when the bundle carries none that a command resets."""
        ids = sorted(c["id"] for c in self.cameras)
        if camera is not None and camera not in ids:
            raise ValueError(f"unknown camera {camera!r}; the profile has {ids}")
        reset = self.pipeline.slot.reset_state(camera, "command")
        if reset:
            self.metrics.state_resets.labels("command").inc()
        return reset

    def _reset_command(self, query: dict[str, str]) -> tuple[int, dict]:
        """``POST /state/reset?camera=ID`` (one camera) or ``?camera=*`` (every camera: no
        camera id can be ``*``)."""
        unknown = sorted(set(query) - {"camera"})
        if unknown or not query.get("camera"):
            return 400, {"error": f"/state/reset takes camera=<id> or camera=* (every camera), got "
                                  f"{dict(query) or 'no parameters'}"}
        camera = query["camera"]
        try:
            reset = self.reset_state(None if camera == "*" else camera)
        except ValueError as exc:
            return 404, {"error": str(exc)}
        return 200, {"camera": camera, "state_reset": reset}

    def _run_pipeline(self) -> None:
        try:
            self.pipeline.run(self.stop)
        except BaseException as exc:  # noqa: BLE001 - reported by check()
            log.exception("the pipeline failed")
            self.error = exc

    def check(self) -> None:
        """Raise if the pipeline has failed (a dead pipeline must not look like a quiet one)."""
        if self.error is not None:
            raise RuntimeError(f"the pipeline stopped: {type(self.error).__name__}: {self.error}")

    def sources_ended(self) -> tuple[bool, str | None]:
        """(all camera processes have ended, why that is a failure or None when it is not).

        A runtime with an ``external`` camera never ends by itself. Finite replays ending
        is a normal end; a live source that gave up, or one that ended without being
        finite, is not.
        """
        if len(self.processed) != len(self.cameras) or not self.processes:
            return False, None
        # a crashed camera (any other exit code) is the supervisor's to restart, not an end
        if any(p.exitcode not in ENDED for p in self.processes.values()) or self.supervisor.pending():
            return False, None
        problems = []
        for cam in self.processed:
            code = self.processes[cam["id"]].exitcode
            if code == EXIT_GAVE_UP:
                problems.append(f"camera {cam['id']} gave up (max_reconnects reached; see its log)")
            elif not is_finite(cam):
                problems.append(f"camera {cam['id']} ended (exit code {code}) although its source "
                                "does not end by itself")
        return True, "; ".join(problems) or None

    def sources_done(self) -> bool:
        """Every camera process has ended on purpose (a crashed one is restarted)."""
        return self.sources_ended()[0]

    def shutdown(self, grace_s: float = 1.0) -> None:
        self.stop.set()
        self.supervisor.stop()  # no restart from here on
        for proc in self.processes.values():
            if proc.is_alive():
                proc.terminate()  # SIGTERM: the source stops at its next frame
        if getattr(self, "supervisor_thread", None) is not None:
            self.supervisor_thread.join(1)
        deadline = time.monotonic() + grace_s
        for proc in self.processes.values():
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.processes.values():
            if proc.is_alive():
                proc.kill()
                proc.join(1)
        if getattr(self, "thread", None) is not None:
            self.thread.join(max(0.1, deadline - time.monotonic()))
        if self.pipeline is not None:
            # a finished replay's frames sent after the last one received
            for cam, events in getattr(self, "events", {}).items():
                if events.finished_frames.value >= 0:
                    self.pipeline.count_unreceived_tail(cam, events.finished_frames.value)
            self.pipeline.close()
        if self.health is not None:
            self.health.stop()
        stop_authenticators()
        self._release()

    def _release(self) -> None:
        """Remove the frame rings and free the folder locks."""
        if self.rings is not None:
            self.rings.close()
            self.rings = None
        for lock in self.locks:
            lock.release()
        self.locks.clear()
