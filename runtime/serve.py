"""``edge-inspect serve --config configs/runtime/<profile>.yaml``: cameras -> pipeline -> results.

One process per camera source (OpenCV and file reading stay out of the inference loop)
publishes frames over ZeroMQ; the pipeline runs in the main process with the health server
(``/metrics``, ``/healthz``, ``/readyz``). SIGTERM or Ctrl-C stops everything: the sources
stop at their next frame, the pipeline after its current batch; children still running
after the grace period are killed.

Profile YAML::

    bundle: bundles/textile            # from `edge-inspect export` / `enroll`
    backend: ort                        # ort | tensorrt
    backend_options: {providers: [cpu]}
    mode: live                          # live | every_part
    endpoint_dir: /tmp/edge-inspect     # ipc endpoints live here (tcp: set frames/results)
    cameras:
      - {id: cam0, source: folder, path: replay/, fps: 20, loop: true}
      - {id: cam1, source: capture, uri: "rtsp://10.0.0.5/stream", stall_s: 5}
      - {id: cam2, source: synthetic, size: [480, 640], fps: 30}
    pipeline: {max_batch: 4, max_wait_ms: 5, heatmap_size: [64, 64], camera_timeout_s: 5}
    captures: {dir: captures, retain: 200}
    http: {host: 127.0.0.1, port: 9108}
"""

from __future__ import annotations

import argparse
import inspect
import logging
import multiprocessing as mp
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from runtime.supervisor import SourceSupervisor

log = logging.getLogger(__name__)
SOURCE_KINDS = ("folder", "capture", "synthetic")
SUBSCRIBER_LOG_S = 5.0  # a live source waiting this long for its subscriber says so
TOP_KEYS = ("bundle", "backend", "backend_options", "mode", "endpoint_dir", "frames", "results",
            "cameras", "pipeline", "captures", "http", "model_name")


@dataclass
class RuntimeConfig:
    bundle: str
    cameras: list[dict]
    backend: str = "ort"
    backend_options: dict = field(default_factory=dict)
    mode: str = "live"
    endpoint_dir: str = "/tmp/edge-inspect"
    frames: str | None = None  # every_part: one endpoint; live: a prefix, one endpoint per camera
    results: str | None = None
    pipeline: dict = field(default_factory=dict)
    captures: dict | None = None
    http: dict = field(default_factory=lambda: {"host": "127.0.0.1", "port": 9108})
    model_name: str | None = None

    @classmethod
    def from_dict(cls, raw: dict, source: str = "runtime config") -> RuntimeConfig:
        unknown = set(raw) - set(TOP_KEYS)
        if unknown:
            raise ValueError(f"{source}: unknown keys {sorted(unknown)}; allowed: {list(TOP_KEYS)}")
        for key in ("bundle", "cameras"):
            if key not in raw:
                raise ValueError(f"{source}: '{key}' is required")
        ids = [c.get("id") for c in raw["cameras"]]
        if len(set(ids)) != len(ids) or not all(ids):
            raise ValueError(f"{source}: every camera needs a unique id, got {ids}")
        for cam in raw["cameras"]:
            if cam.get("source") not in SOURCE_KINDS:
                raise ValueError(f"{source}: camera {cam['id']}: source must be one of {SOURCE_KINDS}")
        return cls(**raw)

    @classmethod
    def from_yaml(cls, path: str | Path) -> RuntimeConfig:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"runtime config {path} not found")
        return cls.from_dict(yaml.safe_load(path.read_text()) or {}, str(path))

    def frames_endpoint(self, camera: str) -> str:
        base = self.frames or f"ipc://{self.endpoint_dir}/frames"
        return base if self.mode == "every_part" else f"{base}-{camera}"

    @property
    def results_endpoint(self) -> str:
        return self.results or f"ipc://{self.endpoint_dir}/results"


def _source_class(kind: str):
    from runtime.sources import CaptureSource, FolderSource, SyntheticSource

    return {"folder": FolderSource, "capture": CaptureSource, "synthetic": SyntheticSource}[kind]


def source_options(kind: str) -> tuple[str, ...]:
    """A source kind's camera options: its constructor's parameters (``path`` is the folder
    source's name for ``images`` given as a folder)."""
    names = tuple(n for n in inspect.signature(_source_class(kind)).parameters if n != "stop")
    return names + ("path",) if kind == "folder" else names


SOURCE_OPTIONS = {kind: source_options(kind) for kind in SOURCE_KINDS}


def check_source(cam: dict) -> None:
    """Build a camera's source once here, so a misspelt option or a missing folder or file
    stops ``serve`` at start with a message naming the camera, instead of killing that
    camera's process later."""
    kind, opts = cam["source"], set(cam) - {"id", "source"}
    unknown = opts - set(SOURCE_OPTIONS[kind])
    if unknown:
        raise ValueError(f"camera {cam['id']}: unknown {kind} options {sorted(unknown)}; "
                         f"allowed: {list(SOURCE_OPTIONS[kind])}")
    if kind == "folder" and len(opts & {"path", "images"}) != 1:
        raise ValueError(f"camera {cam['id']}: a folder source needs path or images (one of them)")
    if kind == "capture" and "uri" not in opts:
        raise ValueError(f"camera {cam['id']}: a capture source needs uri")
    try:
        make_source(cam, threading.Event())
    except (ValueError, FileNotFoundError) as exc:
        raise type(exc)(f"camera {cam['id']}: {exc}") from None


def make_source(cam: dict, stop):
    opts = {k: v for k, v in cam.items() if k not in ("id", "source")}
    if cam["source"] == "folder" and "path" in opts:
        opts["images"] = opts.pop("path")
    if "size" in opts:
        opts["size"] = tuple(opts["size"])
    return _source_class(cam["source"])(stop=stop, **opts)


def source_process(cam: dict, endpoint: str, mode: str) -> None:
    """Body of a camera process: publish frames until the source ends or SIGTERM arrives.

    The stop flag is local to the process (set by the SIGTERM handler): a shared
    multiprocessing Event would deadlock its ``set()`` if a sibling was SIGKILLed while
    waiting on it.
    """
    from runtime.sources import publish
    from runtime.transport.sockets import Sender, TransportConfig

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides
    sender = Sender(TransportConfig(endpoint, mode=mode, send_timeout_ms=1000), await_subscribers=True)
    t0, logged = time.monotonic(), False
    while not sender.wait_for_subscriber(100):  # live: frame 0 only once the pipeline listens
        if stop.is_set():
            sender.close(linger_ms=0)
            return
        if not logged and time.monotonic() - t0 > SUBSCRIBER_LOG_S:
            log.warning("camera %s: no subscriber on %s yet; waiting", cam["id"], endpoint)
            logged = True
    try:
        publish(make_source(cam, stop), sender, cam["id"], stop)
    except TimeoutError:
        pass  # every_part and the pipeline went away: nothing more to do
    finally:
        # a finished source delivers what is queued (the context waits for it: the process
        # ends with os._exit, which would otherwise drop ZeroMQ's queue); a stopped one leaves
        sender.close(linger_ms=0 if stop.is_set() else None)
        sender.ctx.term()


class Runtime:
    """Sources (processes) + pipeline + health server, started and stopped together."""

    def __init__(self, cfg: RuntimeConfig) -> None:
        from runtime.bundle import load_bundle
        from runtime.capture import CaptureStore
        from runtime.metrics import RuntimeMetrics
        from runtime.pipeline import PipelineConfig
        from runtime.transport.sockets import TransportConfig

        self.cfg = cfg
        for cam in cfg.cameras:
            check_source(cam)
        Path(cfg.endpoint_dir).mkdir(parents=True, exist_ok=True)
        self.bundle = load_bundle(cfg.bundle)
        self.metrics = RuntimeMetrics()
        p = dict(cfg.pipeline)
        if "heatmap_size" in p and p["heatmap_size"] is not None:
            p["heatmap_size"] = tuple(p["heatmap_size"])
        captures = CaptureStore(**cfg.captures) if cfg.captures else None
        first = cfg.cameras[0]["id"]
        self.pipeline_cfg = PipelineConfig(
            TransportConfig(cfg.frames_endpoint(first), mode=cfg.mode),
            TransportConfig(cfg.results_endpoint, mode="live", hwm=1000),  # small messages
            model_name=cfg.model_name or self.bundle.manifest.get("name", "model"),
            captures=captures, expected_cameras=[c["id"] for c in cfg.cameras], **p)
        self.stop = threading.Event()
        self.mp = mp.get_context("spawn")
        self.supervisor = SourceSupervisor(self._spawn_source, cfg.cameras, self.metrics.source_restarts)
        self.pipeline = None
        self.health = None
        self.error: BaseException | None = None  # why the pipeline thread ended, if it failed

    @property
    def processes(self) -> dict[str, mp.Process]:
        """The current process of every camera (a restarted camera has a new one)."""
        return self.supervisor.processes

    def _spawn_source(self, cam: dict) -> mp.Process:
        proc = self.mp.Process(target=source_process, name=f"source-{cam['id']}", daemon=True,
                               args=(cam, self.cfg.frames_endpoint(cam["id"]), self.cfg.mode))
        proc.start()
        return proc

    def start(self) -> Runtime:
        from runtime.engines import open_engine
        from runtime.health import HealthServer
        from runtime.pipeline import Pipeline

        # The pipeline exists (and is warm) before any source sends: every_part sources
        # connect to its bound PULL; live sources bind PUBs that its SUB is already dialling.
        self.pipeline = Pipeline(self.bundle, open_engine(self.bundle, self.cfg.backend,
                                                          **self.cfg.backend_options),
                                 self.pipeline_cfg, self.metrics)
        if self.cfg.mode == "live":
            for cam in self.cfg.cameras[1:]:
                self.pipeline.receiver.socket.connect(self.cfg.frames_endpoint(cam["id"]))
        self.pipeline.warmup()
        http = self.cfg.http or {}
        if http.get("port") is not None:
            host = http.get("host", "127.0.0.1")
            try:
                self.health = HealthServer(self.metrics.registry, self.pipeline.ready, host,
                                           http["port"]).start()
            except OSError as exc:
                self.pipeline.close()
                raise ValueError(f"cannot serve /metrics on {host}:{http['port']} ({exc}); "
                                 "choose another http.port (0 picks a free one)") from None
        self.supervisor.start_all()
        self.supervisor_thread = threading.Thread(target=self.supervisor.run, args=(self.stop,),
                                                  name="source-supervisor", daemon=True)
        self.supervisor_thread.start()
        self.thread = threading.Thread(target=self._run_pipeline, name="pipeline", daemon=True)
        self.thread.start()
        return self

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

    def sources_done(self) -> bool:
        """Every camera ended cleanly (a crashed one is restarted, so it is not done)."""
        return all(not p.is_alive() and p.exitcode == 0 for p in self.processes.values())

    def shutdown(self, grace_s: float = 1.5) -> None:
        self.stop.set()
        self.supervisor.stop()  # no restart from here on
        if getattr(self, "supervisor_thread", None) is not None:
            self.supervisor_thread.join(1)
        for proc in self.processes.values():
            if proc.is_alive():
                proc.terminate()  # SIGTERM: the source stops at its next frame
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
            self.pipeline.close()
        if self.health is not None:
            self.health.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="configs/runtime/<profile>.yaml")


def run(args: argparse.Namespace) -> int:
    cfg = RuntimeConfig.from_yaml(args.config)
    runtime = Runtime(cfg).start()
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    port = runtime.health.port if runtime.health else None
    print(f"serving {cfg.bundle} on {len(cfg.cameras)} camera(s); results on {cfg.results_endpoint}"
          + (f"; metrics on http://{cfg.http.get('host', '127.0.0.1')}:{port}/metrics" if port else ""),
          flush=True)
    try:
        while not stopping.is_set() and not runtime.sources_done() and runtime.error is None:
            stopping.wait(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        runtime.shutdown()
    print(f"stopped after {runtime.pipeline.frames_done} frames")
    runtime.check()  # a failed pipeline exits non-zero with its reason
    return 0
