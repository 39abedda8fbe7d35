"""``edge-inspect watch``: subscribe to results and show a live table per camera.

Columns: frames, frames/s over the last window, last score and label, anomalies,
p50 / p99 capture-to-result latency (measured here, on the same host as the cameras).
Redraws every ``--interval`` seconds; ``--duration`` stops it (scripts, tests).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict, deque

import numpy as np

from edge_inspect.runtime.transport.sockets import Receiver, TransportConfig
from edge_inspect.runtime.transport.wire import MalformedMessage, decode


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", default="ipc:///tmp/edge-inspect/results",
                        help="the pipeline's results endpoint (serve prints it)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between redraws")
    parser.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    parser.add_argument("--plain", action="store_true", help="append tables instead of redrawing")


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


def run(args: argparse.Namespace) -> int:
    rx = Receiver(TransportConfig(args.endpoint, mode="live", hwm=1000))
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
    print(table.render() if table.frames else "no results received")
    return 0
