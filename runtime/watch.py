"""``edge-inspect watch``: subscribe to results and show a live table per camera.

Columns: frames, frames/s over the last window, last score and label, anomalies,
p50 / p99 capture-to-result latency (measured here, on the same host as the cameras).
Redraws every ``--interval`` seconds; ``--duration`` stops it (scripts, tests) and exits 1
with the likely reason when no result arrived. A tcp endpoint guarded by CURVE needs
``--server-key`` (the runtime's public ``.key``) and ``--key`` (this viewer's ``.key_secret``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict, deque
from pathlib import Path

import numpy as np
import zmq

from edge_inspect.runtime.keys import load_keypair, load_public_key
from edge_inspect.runtime.transport.sockets import Receiver, TransportConfig
from edge_inspect.runtime.transport.wire import MalformedMessage, decode


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", default="ipc:///tmp/edge-inspect/results",
                        help="the pipeline's results endpoint (serve prints it)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between redraws")
    parser.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    parser.add_argument("--plain", action="store_true", help="append tables instead of redrawing")
    parser.add_argument("--server-key", type=Path, default=None,
                        help="the runtime's public key file (CURVE over tcp)")
    parser.add_argument("--key", type=Path, default=None,
                        help="this viewer's secret key file (CURVE over tcp; its .key in the "
                             "runtime's client_keys)")


class Table:
    """Per-camera counters over a sliding window of recent results."""

    def __init__(self, window: int = 200) -> None:
        self.frames = defaultdict(int)
        self.anomalies = defaultdict(int)
        self.last: dict[str, dict] = {}
        self.recent = defaultdict(lambda: deque(maxlen=window))  # (arrival s, latency s)
        self.malformed = 0

    def add(self, parts: list) -> None:
        try:
            msg = decode(parts)
        except MalformedMessage:
            self.malformed += 1
            return
        cam = msg.camera
        self.frames[cam] += 1
        self.anomalies[cam] += int(msg.header.get("label", 0))
        self.last[cam] = msg.header
        self.recent[cam].append((time.monotonic(), (time.monotonic_ns() - msg.t_capture_ns) / 1e9))

    def render(self) -> str:
        rows = [f"{'camera':12s} {'frames':>8s} {'fps':>6s} {'score':>8s} {'label':>8s} "
                f"{'anomalies':>9s} {'p50 ms':>7s} {'p99 ms':>7s}"]
        for cam in sorted(self.frames):
            rec = self.recent[cam]
            span = rec[-1][0] - rec[0][0] if len(rec) > 1 else 0.0
            fps = (len(rec) - 1) / span if span > 0 else 0.0
            lat = np.array([x[1] for x in rec]) * 1000
            h = self.last[cam]
            label = "ANOMALY" if h.get("label") else "ok"
            rows.append(f"{cam:12s} {self.frames[cam]:8d} {fps:6.1f} {h.get('score', float('nan')):8.3f} "
                        f"{label:>8s} {self.anomalies[cam]:9d} {np.percentile(lat, 50):7.1f} "
                        f"{np.percentile(lat, 99):7.1f}")
        if self.malformed:
            rows.append(f"({self.malformed} malformed result messages ignored)")
        return "\n".join(rows)


def _receiver(args: argparse.Namespace) -> Receiver:
    """The results subscriber, or a one-line ValueError naming the endpoint and the fix."""
    endpoint = args.endpoint
    if not endpoint.startswith(("ipc://", "tcp://")):
        raise ValueError(f"--endpoint {endpoint!r} must start with ipc:// or tcp:// (serve prints its "
                         "results endpoint when it starts)")
    keys = {}
    if (args.server_key is None) != (args.key is None):
        raise ValueError("CURVE needs both --server-key (the runtime's .key) and --key (your .key_secret)")
    if args.server_key is not None:
        public, secret = load_keypair(args.key, "--key")
        keys = {"curve_server_public": load_public_key(args.server_key),
                "curve_client_public": public, "curve_client_secret": secret}
    try:
        return Receiver(TransportConfig(endpoint, mode="live", hwm=1000, **keys))
    except zmq.ZMQError as exc:
        raise ValueError(f"cannot connect to --endpoint {endpoint!r}: {exc}; use the results endpoint "
                         "serve printed (e.g. ipc:///tmp/edge-inspect/results or tcp://host:port)") from None


def _silence_hint(endpoint: str) -> str:
    if endpoint.startswith("ipc://") and not Path(endpoint[len("ipc://"):]).exists():
        return (f"nothing listens on {endpoint} (no such socket file): is serve running, and is "
                "this the results endpoint it printed?")
    return (f"no results on {endpoint}: is serve running and scoring, is this the results endpoint "
            "it printed, and (tcp with CURVE) are --server-key / --key right?")


def run(args: argparse.Namespace) -> int:
    rx = _receiver(args)
    table = Table()
    start = next_draw = time.monotonic()
    try:
        while args.duration is None or time.monotonic() - start < args.duration:
            parts = rx.recv(timeout_ms=100)
            if parts is not None:
                table.add(parts)
            if time.monotonic() >= next_draw:
                next_draw += args.interval
                text = table.render() if table.frames else f"waiting for results on {args.endpoint} ..."
                sys.stdout.write(text + "\n\n" if args.plain else "\x1b[2J\x1b[H" + text + "\n")
                sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    finally:
        rx.close()
    if not table.frames:
        print(f"edge-inspect watch: {_silence_hint(args.endpoint)}", file=sys.stderr)
        return 1
    print(table.render())
    return 0
