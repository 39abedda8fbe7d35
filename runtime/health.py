"""``/metrics``, ``/healthz`` and ``/readyz`` over HTTP, and control commands, from a daemon
thread.

Bound to 127.0.0.1 by default (expose it deliberately: the control commands act on the
running service). ``/healthz`` answers 200 while the process runs; ``/readyz`` answers 200
only when every readiness check passes (engine warm, cameras fresh) and 503 with the
failing checks as JSON otherwise. Commands are POSTs to their path with query parameters
(``POST /state/reset?camera=cam0``); each answers JSON: 200, 400 for a malformed request
(a body, a repeated parameter), 404 for an unknown command, 500 (logged) when it fails.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)
ReadyCheck = Callable[[], dict[str, bool]]
# a control command: query parameters -> (HTTP status, JSON-able answer)
Command = Callable[[dict[str, str]], tuple[int, dict]]


class HealthServer:
    """Serves one registry and one readiness check; ``port=0`` picks a free port."""

    def __init__(self, registry: CollectorRegistry, ready: ReadyCheck, host: str = "127.0.0.1",
                 port: int = 9108, commands: dict[str, Command] | None = None) -> None:
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
                elif self.path.split("?")[0] in owner.commands:
                    self._send(405, b"control commands are POST requests\n", "text/plain")
                else:
                    self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")

            def do_POST(self) -> None:  # noqa: N802
                url = urlsplit(self.path)
                code, answer = owner.answer(url.path, url.query, self.headers.get("Content-Length"))
                self._send(code, json.dumps(answer).encode() + b"\n", "application/json")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # keep scrapes out of the logs
                pass

        self.registry, self.ready, self.commands = registry, ready, dict(commands or {})
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="health", daemon=True)

    def answer(self, path: str, query: str, body_length: str | None) -> tuple[int, dict]:
        """Run a command: 404 unknown, 400 a malformed request, 500 a failure (logged)."""
        command = self.commands.get(path)
        if command is None:
            return 404, {"error": f"no command {path}; commands: {sorted(self.commands)}"}
        if body_length not in (None, "0"):
            return 400, {"error": "command parameters go in the query string (?key=value), not the body"}
        pairs = parse_qsl(query, keep_blank_values=True)
        keys = [k for k, _ in pairs]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            return 400, {"error": f"parameters {repeated} given more than once"}
        try:
            return command(dict(pairs))
        except Exception as exc:  # noqa: BLE001 - a failed command must not cost the server
            log.exception("control command %s failed", path)
            return 500, {"error": f"{path} failed: {type(exc).__name__}: {exc}"}

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> HealthServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def port_free(host: str, port: int) -> bool:
    """Whether ``host:port`` can be bound now (port 0, any free port, always can)."""
    import socket

    if port == 0:
        return True
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
