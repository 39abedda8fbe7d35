"""``edge-inspect monitor``: a live web page of a running line (no torch).

A separate process, like ``watch``: it subscribes to the runtime's results and serves a page
with one tile per camera (the latest frame under its heatmap, score against threshold,
verdict, frames/s, capture-to-result latency, the serving bundle, drops, camera down), a
score timeline per camera and the last anomalies with their pictures.

Frames: results carry only the small heatmap; while the monitor runs it renews a lease on
the runtime's control server (``POST /preview?seconds=30`` every 10 s), and only then do
results carry a downscaled frame (at most 320 px), so a line without a monitor pays nothing.
The monitor draws the overlay itself (JPEG) and reads drops and camera state from the
runtime's ``/metrics``.

To the browser: server-sent events (``/events``, one JSON snapshot of every camera twice a
second) and plain JPEG URLs. SSE rather than a websocket: the data flows one way, it is plain
HTTP (proxies, basic tools, the same token check as every other path), the browser's
``EventSource`` reconnects by itself, and it needs no dependency. Bound to 127.0.0.1 by
default; binding any other address needs ``--token`` (then every request carries
``?token=...`` or ``Authorization: Bearer ...``).
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import re
import signal
import threading
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlparse

import cv2
import numpy as np

from edge_inspect.runtime.overlay import render_overlay
from edge_inspect.runtime.transport.sockets import Receiver, TransportConfig
from edge_inspect.runtime.transport.wire import MalformedMessage, decode

log = logging.getLogger(__name__)
LOOPBACK = ("127.0.0.1", "localhost", "::1")
HISTORY = 300  # scores kept per camera for the timeline
ANOMALIES = 12  # last anomalies kept (with pictures)
DOWN_AFTER_S = 5.0  # no result for this long: the tile says the camera is down
LEASE_S, RENEW_S = 30, 10


@dataclass
class CameraView:
    """What the page shows of one camera."""

    camera: str
    seq: int = -1
    score: float = float("nan")
    threshold: float | None = None
    label: bool = False
    bundle: str = ""
    model: str = ""
    fps: float = 0.0
    latency_ms: float = float("nan")
    last_result: float = 0.0  # monotonic
    frames: int = 0
    anomalies: int = 0
    jpeg: bytes = b""
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY))

    def snapshot(self, now: float, drops: dict, up: float | None) -> dict:
        down = (now - self.last_result > DOWN_AFTER_S) or up == 0
        return {"camera": self.camera, "seq": self.seq, "score": _num(self.score),
                "threshold": self.threshold, "label": self.label, "bundle": self.bundle,
                "model": self.model, "fps": round(self.fps, 2), "latency_ms": _num(self.latency_ms),
                "frames": self.frames, "anomalies": self.anomalies, "down": bool(down),
                "drops": drops, "history": [[round(t, 2), _num(s)] for t, s in self.history],
                "has_frame": bool(self.jpeg)}


def _num(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 6)


class MonitorState:
    """Cameras and recent anomalies, updated by the results thread, read by the web server."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cameras: dict[str, CameraView] = {}
        self.anomalies: deque = deque(maxlen=ANOMALIES)  # (id, camera, seq, time, score, capture, jpeg)
        self.next_anomaly = 0
        self.drops: dict[str, dict[str, float]] = {}
        self.up: dict[str, float] = {}
        self.preview: str = "not requested yet"
        self.t0 = time.monotonic()

    def add(self, msg) -> None:
        now = time.monotonic()
        h = msg.header
        planes = msg.planes
        heat = np.asarray(planes.get("heatmap", np.zeros((2, 2))), np.float32)
        frame = planes.get("preview")
        score, threshold = float(h.get("score", float("nan"))), h.get("threshold")
        label = bool(h.get("label"))
        jpeg = b""
        if frame is not None and frame.ndim == 3:
            picture = render_overlay(frame, heat, score, threshold, label, f"{msg.camera} #{msg.seq}")
            ok, buf = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, 80])
            jpeg = buf.tobytes() if ok else b""
        with self.lock:
            cam = self.cameras.get(msg.camera)
            if cam is None:
                cam = self.cameras[msg.camera] = CameraView(msg.camera)
            if cam.last_result:
                dt = max(now - cam.last_result, 1e-3)
                cam.fps = 1 / dt if cam.fps == 0 else 0.9 * cam.fps + 0.1 / dt
            cam.seq, cam.score, cam.threshold, cam.label = msg.seq, score, threshold, label
            cam.bundle, cam.model = str(h.get("bundle", "")), str(h.get("model", ""))
            cam.latency_ms = (time.monotonic_ns() - msg.t_capture_ns) / 1e6
            cam.last_result, cam.frames = now, cam.frames + 1
            cam.history.append((now - self.t0, score))
            if jpeg:
                cam.jpeg = jpeg
            if label:
                cam.anomalies += 1
                self.anomalies.appendleft((self.next_anomaly, msg.camera, msg.seq, time.time(), score,
                                           str(h.get("capture") or ""), jpeg))
                self.next_anomaly += 1

    def snapshot(self) -> dict:
        now = time.monotonic()
        with self.lock:
            views = dict(self.cameras)
            for name in set(self.up) - set(views):  # configured, no result yet (down from the start)
                views[name] = CameraView(name)
            cams = [c.snapshot(now, self.drops.get(c.camera, {}), self.up.get(c.camera))
                    for c in sorted(views.values(), key=lambda c: c.camera)]
            anomalies = [{"id": i, "camera": c, "seq": s, "time": t, "score": _num(sc), "capture": cap,
                          "has_picture": bool(j)} for i, c, s, t, sc, cap, j in self.anomalies]
        return {"cameras": cams, "anomalies": anomalies, "preview": self.preview, "now": now - self.t0}

    def camera_jpeg(self, camera: str) -> bytes | None:
        with self.lock:
            cam = self.cameras.get(camera)
            return cam.jpeg if cam is not None and cam.jpeg else None

    def anomaly_jpeg(self, ident: int) -> bytes | None:
        with self.lock:
            return next((j for i, *_, j in self.anomalies if i == ident and j), None)


METRIC = re.compile(r'^(edge_inspect_frames_dropped_total|edge_inspect_camera_up)\{([^}]*)\} (\S+)$', re.M)


def read_runtime_metrics(text: str) -> tuple[dict, dict]:
    """Drops per camera and reason, camera_up per camera, from the runtime's /metrics."""
    drops: dict[str, dict[str, float]] = {}
    up: dict[str, float] = {}
    for name, labels, value in METRIC.findall(text):
        lab = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if name == "edge_inspect_camera_up":
            up[lab.get("camera", "")] = float(value)
        else:
            drops.setdefault(lab.get("camera", ""), {})[lab.get("reason", "")] = float(value)
    return drops, up


class Monitor:
    """Results subscriber, preview lease and metrics reader, and the web server."""

    def __init__(self, endpoint: str, control: str | None, host: str = "127.0.0.1", port: int = 8090,
                 token: str | None = None) -> None:
        if host not in LOOPBACK and not token:
            raise ValueError(f"--host {host} would show the line's images to the network: give "
                             "--token (or EDGE_INSPECT_MONITOR_TOKEN), or keep --host 127.0.0.1")
        self.endpoint, self.control, self.token = endpoint, (control or "").rstrip("/"), token
        self.state = MonitorState()
        self.stop = threading.Event()
        self.rx = Receiver(TransportConfig(endpoint, mode="live", hwm=1000))
        self.page = resources.files("edge_inspect.runtime").joinpath("monitor.html").read_bytes()
        try:
            self.server = ThreadingHTTPServer((host, port), self._handler())
        except OSError as exc:
            self.rx.close()
            raise ValueError(f"cannot serve the monitor on {host}:{port} ({exc.strerror or exc}); "
                             "choose another --port (0 picks a free one)") from None
        self.server.daemon_threads = True
        self.threads = [threading.Thread(target=f, daemon=True, name=n) for f, n in (
            (self._results, "monitor-results"), (self._control_loop, "monitor-control"),
            (self.server.serve_forever, "monitor-http"))]

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> Monitor:
        for t in self.threads:
            t.start()
        return self

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()
        self.threads[0].join(2)  # the results thread stops using the socket first
        self.rx.close()  # the preview lease runs out by itself (other monitors may hold one)

    def _results(self) -> None:
        while not self.stop.is_set():
            parts = self.rx.recv(200)
            if parts is None:
                continue
            try:
                msg = decode(parts)
                if msg.kind == "result":
                    self.state.add(msg)
            except MalformedMessage:
                continue
            except Exception:  # noqa: BLE001 - one odd result must not stop the page
                log.exception("monitor: a result could not be shown")

    def _post_preview(self, seconds: int) -> bool:
        if not self.control:
            return False
        try:
            req = urllib.request.Request(f"{self.control}/preview?seconds={seconds}", method="POST")
            with urllib.request.urlopen(req, timeout=3) as r:
                return r.status == 200
        except OSError:
            return False

    def _control_loop(self) -> None:
        renew = 0.0
        while not self.stop.is_set():
            if not self.control:
                self.state.preview = "no --control URL: heatmaps only"
            else:
                if time.monotonic() >= renew:
                    ok = self._post_preview(LEASE_S)
                    self.state.preview = "on" if ok else f"control {self.control} unreachable: heatmaps only"
                    renew = time.monotonic() + RENEW_S
                try:
                    with urllib.request.urlopen(f"{self.control}/metrics", timeout=3) as r:
                        drops, up = read_runtime_metrics(r.read().decode())
                    with self.state.lock:
                        self.state.drops, self.state.up = drops, up
                except OSError:
                    pass
            self.stop.wait(2.0)

    def _authorized(self, handler: BaseHTTPRequestHandler, query: dict) -> bool:
        if not self.token:
            return True
        given = (query.get("token") or [""])[0]
        auth = handler.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            given = auth[len("Bearer "):]
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _handler(self):
        monitor = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                url = urlparse(self.path)
                query = parse_qs(url.query)
                if not monitor._authorized(self, query):
                    return self._send(401, b"missing or wrong token\n", "text/plain")
                if url.path == "/":
                    return self._send(200, monitor.page, "text/html; charset=utf-8")
                if url.path == "/state":
                    return self._send(200, json.dumps(monitor.state.snapshot()).encode(), "application/json")
                if url.path == "/events":
                    return self._events()
                m = re.fullmatch(r"/frame/([A-Za-z0-9_-]{1,64})\.jpg", url.path)
                if m:
                    jpeg = monitor.state.camera_jpeg(m.group(1))
                    return self._send(200 if jpeg else 404, jpeg or b"no frame yet\n",
                                      "image/jpeg" if jpeg else "text/plain")
                m = re.fullmatch(r"/anomaly/(\d{1,9})\.jpg", url.path)
                if m:
                    jpeg = monitor.state.anomaly_jpeg(int(m.group(1)))
                    return self._send(200 if jpeg else 404, jpeg or b"gone\n",
                                      "image/jpeg" if jpeg else "text/plain")
                self._send(404, b"not found\n", "text/plain")

            def _events(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                try:
                    while not monitor.stop.is_set():
                        data = json.dumps(monitor.state.snapshot())
                        self.wfile.write(f"data: {data}\n\n".encode())
                        self.wfile.flush()
                        monitor.stop.wait(0.5)
                except OSError:  # the page went away
                    return

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        return Handler


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", default="ipc:///tmp/edge-inspect/results",
                        help="the runtime's results endpoint (serve prints it)")
    parser.add_argument("--control", default="http://127.0.0.1:9108",
                        help="the runtime's http address (previews, drops, camera state); '' for none")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve the page on")
    parser.add_argument("--port", type=int, default=8090, help="port of the page (0: any free one)")
    parser.add_argument("--token", default=os.environ.get("EDGE_INSPECT_MONITOR_TOKEN"),
                        help="required when --host is not loopback (default: $EDGE_INSPECT_MONITOR_TOKEN)")
    parser.add_argument("--duration", type=float, default=None, help="stop after this many seconds")


def run(args: argparse.Namespace) -> int:
    monitor = Monitor(args.endpoint, args.control or None, args.host, args.port, args.token).start()
    suffix = f"/?token={args.token}" if args.token else "/"
    print(f"monitor on http://{args.host}:{monitor.port}{suffix} (results from {args.endpoint})", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait(args.duration)
    monitor.close()
    return 0


__all__ = ["Monitor", "MonitorState", "read_runtime_metrics"]
