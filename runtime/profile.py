"""Runtime profiles (``configs/runtime/<profile>.yaml``) parsed into typed dataclasses.

Every section is checked key by key: a misspelt key is a one-line error naming it and the
allowed keys; a YAML syntax error is one line with its line and column. Camera options
are checked by the source registry (:mod:`edge_inspect.runtime.source_registry`).

Profile YAML::

    bundle: bundles/textile            # from `edge-inspect export` / `enroll`
    backend: ort                        # ort | tensorrt
    backend_options: {providers: [cpu]}
    mode: live                          # live | every_part
    endpoint_dir: /tmp/edge-inspect     # ipc endpoints live here (tcp: set frames/results)
    model_name: textile                 # label of the model in metrics (default: bundle name)
    cameras:
      - {id: cam0, source: folder, path: replay/, fps: 20, loop: true}
      - {id: cam1, source: capture, uri: "rtsp://10.0.0.5/stream", stall_s: 5}
      - {id: cam2, source: synthetic, size: [480, 640], fps: 30}
      - {id: cam3, source: external}    # sent by another machine to `frames` (every_part, tcp)
    transport: {kind: zmq}              # zmq | shm (frames in shared memory; slots: 8,
                                        #   frame_pixels: 2073600 = 1080p, the largest frame)
    pipeline: {max_batch: 4, max_wait_ms: 5, heatmap_size: [64, 64], camera_timeout_s: 5,
               max_frame_pixels: 16777216}   # larger frame parts are refused (ZeroMQ MAXMSGSIZE)
    captures: {folder: captures, retain: 200}   # retain: per camera
    http: {host: 127.0.0.1, port: 9108}
    mqtt: {host: broker.local, port: 1883, topic: "edge-inspect/{camera}/result", qos: 1,
           retain: true, client_id: line1}   # results to the plant (runtime/mqtt_sink.py)
    security:                           # CURVE on every tcp endpoint the runtime binds
      server_key: keys/server.key_secret   # from `edge-inspect keys --name server`
      client_keys: keys/clients/           # public keys (*.key) allowed to connect
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from edge_inspect.runtime.engines import BACKENDS
from edge_inspect.runtime.metrics import UNATTRIBUTED
from edge_inspect.runtime.mqtt_sink import MqttSection
from edge_inspect.runtime.transport.sockets import MODES
from edge_inspect.runtime.transport.wire import CAMERA_ID

LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


class ProfileError(ValueError):
    """A profile that cannot be served: the file, the key and the fix, in one line."""


def _section(cls, raw: object, where: str):
    """``cls(**raw)`` after checking that ``raw`` is a mapping with only ``cls``'s keys."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ProfileError(f"{where} must be a mapping, got {type(raw).__name__}")
    allowed = [f.name for f in fields(cls)]
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ProfileError(f"{where}: unknown keys {unknown}; allowed: {allowed}")
    return cls(**raw)


def _number(where: str, value, kind=float, minimum: float | None = None):
    wrong_type = not isinstance(value, int | float) or (kind is int and not isinstance(value, int))
    if isinstance(value, bool) or wrong_type:
        raise ProfileError(f"{where} must be a{'n integer' if kind is int else ' number'}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ProfileError(f"{where} must be >= {minimum}, got {value!r}")
    return kind(value)


@dataclass
class PipelineSection:
    max_batch: int = 4
    max_wait_ms: float = 5.0
    heatmap_size: tuple[int, int] | None = (64, 64)
    camera_timeout_s: float = 5.0
    max_frame_pixels: int = 4096 * 4096  # x the bundle's largest bytes per pixel = MAXMSGSIZE

    def check(self, where: str) -> PipelineSection:
        self.max_batch = _number(f"{where}.max_batch", self.max_batch, int, 1)
        self.max_frame_pixels = _number(f"{where}.max_frame_pixels", self.max_frame_pixels, int, 1)
        self.max_wait_ms = _number(f"{where}.max_wait_ms", self.max_wait_ms, float, 0)
        self.camera_timeout_s = _number(f"{where}.camera_timeout_s", self.camera_timeout_s, float, 0)
        if self.heatmap_size is not None:
            hs = self.heatmap_size
            if not isinstance(hs, list | tuple) or len(hs) != 2:
                raise ProfileError(f"{where}.heatmap_size must be [height, width] or null, got {hs!r}")
            self.heatmap_size = tuple(_number(f"{where}.heatmap_size", v, int, 1) for v in hs)
        return self


@dataclass
class TransportSection:
    """How frames reach the pipeline: ``zmq`` (the pixels in the message) or ``shm`` (each
    camera process writes into its own ring of ``slots`` in shared memory, each slot holding
    a frame of up to ``frame_pixels`` with the planes the bundle reads; only a reference
    crosses ZeroMQ). External cameras always send their pixels."""

    kind: str = "zmq"
    slots: int = 8
    frame_pixels: int = 1920 * 1080

    def check(self, where: str, max_frame_pixels: int) -> TransportSection:
        from edge_inspect.runtime.transport.shm_frames import TRANSPORTS

        if self.kind not in TRANSPORTS:
            raise ProfileError(f"{where}.kind {self.kind!r} unknown; choose one of {list(TRANSPORTS)}")
        self.slots = _number(f"{where}.slots", self.slots, int, 2)
        if self.slots > 64:
            raise ProfileError(f"{where}.slots must be <= 64, got {self.slots} (each slot holds a frame)")
        self.frame_pixels = _number(f"{where}.frame_pixels", self.frame_pixels, int, 1)
        if self.kind == "shm" and self.frame_pixels > max_frame_pixels:
            raise ProfileError(f"{where}.frame_pixels {self.frame_pixels} exceeds pipeline.max_frame_pixels "
                               f"{max_frame_pixels}; lower it or raise pipeline.max_frame_pixels")
        return self


@dataclass
class CapturesSection:
    folder: str = "captures"
    retain: int = 200

    def check(self, where: str) -> CapturesSection:
        self.retain = _number(f"{where}.retain", self.retain, int, 1)
        self.folder = str(self.folder)
        return self


@dataclass
class HttpSection:
    host: str = "127.0.0.1"
    port: int | None = 9108  # None: no HTTP server; 0: any free port

    def check(self, where: str) -> HttpSection:
        if self.port is not None:
            self.port = _number(f"{where}.port", self.port, int, 0)
        return self


@dataclass
class SecuritySection:
    """CURVE for tcp: the runtime's secret key file and a folder of allowed client public keys."""

    server_key: str | None = None
    client_keys: str | None = None

    def check(self, where: str) -> SecuritySection:
        if not self.server_key or not self.client_keys:
            raise ProfileError(f"{where}: needs server_key (a secret key file) and client_keys (a "
                               "folder of public keys); make them with `edge-inspect keys`")
        return self


@dataclass
class CameraConfig:
    """One camera: its id (the only camera labels metrics ever get), source kind and options."""

    id: str
    source: str
    options: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"id": self.id, "source": self.source, **self.options}


TOP_KEYS = ("bundle", "backend", "backend_options", "mode", "endpoint_dir", "frames", "results",
            "cameras", "pipeline", "captures", "http", "model_name", "security", "mqtt", "transport")


@dataclass
class Profile:
    bundle: str
    cameras: list[CameraConfig]
    backend: str = "ort"
    backend_options: dict = field(default_factory=dict)
    mode: str = "live"
    endpoint_dir: str = "/tmp/edge-inspect"
    frames: str | None = None  # every_part: one endpoint; live: a prefix, one endpoint per camera
    results: str | None = None
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    transport: TransportSection = field(default_factory=TransportSection)
    captures: CapturesSection | None = None
    http: HttpSection = field(default_factory=HttpSection)
    model_name: str | None = None
    security: SecuritySection | None = None
    mqtt: MqttSection | None = None  # results to an MQTT broker (runtime/mqtt_sink.py)
    source: str = "profile"

    @classmethod
    def from_dict(cls, raw: object, source: str = "profile") -> Profile:
        if not isinstance(raw, dict):
            raise ProfileError(f"{source} must hold a mapping of settings, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(TOP_KEYS))
        if unknown:
            raise ProfileError(f"{source}: unknown keys {unknown}; allowed: {list(TOP_KEYS)}")
        for key in ("bundle", "cameras"):
            if key not in raw:
                raise ProfileError(f"{source}: '{key}' is required")
        if raw.get("mode", "live") not in MODES:
            raise ProfileError(f"{source}: mode {raw.get('mode')!r} unknown; choose one of {list(MODES)}")
        for key in ("bundle", "backend", "endpoint_dir", "frames", "results", "model_name"):
            if raw.get(key) is not None and not isinstance(raw[key], str):
                raise ProfileError(f"{source}: '{key}' must be a string, got {raw[key]!r}")
        if raw.get("backend", "ort") not in BACKENDS:
            raise ProfileError(f"{source}: backend {raw.get('backend')!r} unknown; choose one of "
                               f"{list(BACKENDS)}")
        if not isinstance(raw.get("backend_options", {}), dict):
            raise ProfileError(f"{source}: 'backend_options' must be a mapping")
        cameras = _cameras(raw["cameras"], source)
        frames = raw.get("frames")
        if frames is not None and not frames.startswith(("ipc://", "tcp://")):
            raise ProfileError(f"{source}: frames {frames!r} must start with ipc:// or tcp://")
        if frames and frames.startswith("tcp://"):
            port = frames.rpartition(":")[2]
            if not port.isdigit() or not 0 < int(port) < 65536 - len(cameras):
                raise ProfileError(f"{source}: frames {frames!r} needs a port, e.g. tcp://127.0.0.1:5555 "
                                   "(live mode: one port per camera from there up)")
        for key in ("frames", "results"):
            endpoint = raw.get(key) or ""
            host = endpoint[len("tcp://"):].rpartition(":")[0]
            if endpoint.startswith("tcp://") and host not in LOOPBACK and raw.get("security") is None:
                raise ProfileError(f"{source}: {key} {endpoint} is reachable from other machines and "
                                   "would take anyone's messages: add a security section (CURVE keys "
                                   "from `edge-inspect keys`) or bind 127.0.0.1")
        external = [c.id for c in cameras if c.source == "external"]
        if external and raw.get("mode", "live") != "every_part":
            raise ProfileError(f"{source}: cameras {external} are external (sent by another "
                               "machine): they need mode: every_part, where the runtime binds `frames`")
        captures, security, mqtt = raw.get("captures"), raw.get("security"), raw.get("mqtt")
        pipeline = (_section(PipelineSection, raw.get("pipeline"), f"{source}: pipeline")
                    .check(f"{source}: pipeline"))
        return cls(bundle=raw["bundle"], cameras=cameras, backend=raw.get("backend", "ort"),
                   backend_options=dict(raw.get("backend_options") or {}), mode=raw.get("mode", "live"),
                   endpoint_dir=raw.get("endpoint_dir", "/tmp/edge-inspect"), frames=raw.get("frames"),
                   results=raw.get("results"), pipeline=pipeline,
                   transport=_section(TransportSection, raw.get("transport"), f"{source}: transport")
                   .check(f"{source}: transport", pipeline.max_frame_pixels),
                   captures=(_section(CapturesSection, captures, f"{source}: captures")
                             .check(f"{source}: captures") if captures is not None else None),
                   http=_section(HttpSection, raw.get("http"), f"{source}: http").check(f"{source}: http"),
                   model_name=raw.get("model_name"),
                   security=(_section(SecuritySection, security, f"{source}: security")
                             .check(f"{source}: security") if security is not None else None),
                   mqtt=(_section(MqttSection, mqtt, f"{source}: mqtt").check(f"{source}: mqtt")
                         if mqtt is not None else None),
                   source=source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Profile:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"runtime profile {path} not found")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ProfileError(f"{path}: YAML syntax error{where}: {problem}") from None
        return cls.from_dict(raw or {}, str(path))

    def frames_endpoint(self, camera: str) -> str:
        """every_part: the one endpoint all cameras send to; live: one per camera (each
        camera's publisher binds it): ``<frames>-<camera>`` for ipc, for tcp the port of
        ``frames`` plus the camera's index in the profile."""
        base = self.frames or f"ipc://{self.endpoint_dir}/frames"
        if self.mode == "every_part":
            return base
        if base.startswith("tcp://"):
            host, _, port = base[len("tcp://"):].rpartition(":")
            index = [c.id for c in self.cameras].index(camera)
            return f"tcp://{host}:{int(port) + index}"
        return f"{base}-{camera}"

    @property
    def tcp_endpoints(self) -> list[str]:
        """The profile's endpoints that are tcp (the ones CURVE protects)."""
        ends = [self.frames_endpoint(c.id) for c in self.cameras] + [self.results_endpoint]
        return sorted({e for e in ends if e.startswith("tcp://")})

    @property
    def results_endpoint(self) -> str:
        return self.results or f"ipc://{self.endpoint_dir}/results"


def _cameras(raw: object, source: str) -> list[CameraConfig]:
    from edge_inspect.runtime.source_registry import SOURCE_KINDS

    if not isinstance(raw, list) or not raw:
        raise ProfileError(f"{source}: 'cameras' must be a non-empty list of cameras")
    out = []
    for i, cam in enumerate(raw):
        if not isinstance(cam, dict):
            raise ProfileError(f"{source}: cameras[{i}] must be a mapping with id and source")
        cid = cam.get("id")
        if not isinstance(cid, str) or not CAMERA_ID.fullmatch(cid):
            raise ProfileError(f"{source}: cameras[{i}]: id {cid!r} must be 1-64 ASCII letters, "
                               "digits, - or _")
        if cid == UNATTRIBUTED:
            raise ProfileError(f"{source}: cameras[{i}]: id {cid!r} is reserved for frames from "
                               "cameras not in the profile; choose another id")
        if cam.get("source") not in SOURCE_KINDS:
            raise ProfileError(f"{source}: camera {cid}: source must be one of {list(SOURCE_KINDS)}, "
                               f"got {cam.get('source')!r}")
        options = {k: v for k, v in cam.items() if k not in ("id", "source")}
        out.append(CameraConfig(cid, cam["source"], options))
    ids = [c.id for c in out]
    if len(set(ids)) != len(ids):
        raise ProfileError(f"{source}: camera ids must be unique, got {ids}")
    return out
