"""``/metrics``, ``/healthz`` and ``/readyz`` over HTTP, from a daemon thread.

Bound to 127.0.0.1 by default (expose it deliberately). ``/healthz`` answers 200 while the
process runs; ``/readyz`` answers 200 only when every readiness check passes (engine warm,
cameras fresh) and 503 with the failing checks as JSON otherwise.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

ReadyCheck = Callable[[], dict[str, bool]]


class HealthServer:
    """Serves one registry and one readiness check; ``port=0`` picks a free port."""

    def __init__(self, registry: CollectorRegistry, ready: ReadyCheck, host: str = "127.0.0.1",
                 port: int = 9108) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path == "/metrics":
                    self._send(200, generate_latest(owner.registry), CONTENT_TYPE_LATEST)
                elif self.path == "/healthz":
                    self._send(200, b"ok\n", "text/plain")
                elif self.path == "/readyz":
                    checks = owner.ready()
                    ok = bool(checks) and all(checks.values())
                    self._send(200 if ok else 503, json.dumps(checks).encode(), "application/json")
                else:
                    self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # keep scrapes out of the logs
                pass

        self.registry, self.ready = registry, ready
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="health", daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> HealthServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
