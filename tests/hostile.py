"""Hostile frame messages: each one stopped, bloated or fooled `serve` once (issue 12).

Used by the wire fuzz tests, the hostile-sender integration test and
``benchmarks/reliability.py``. Every message is a list of parts for ``send_multipart``.
"""

from __future__ import annotations

import json
import time

import numpy as np

from edge_inspect.runtime.transport.wire import encode


def _header(camera: str = "cam0", **fields) -> bytes:
    header = {"v": 1, "camera": camera, "seq": 0, "t_capture_ns": time.monotonic_ns(),
              "parts": [{"plane": "rgb", "shape": [4, 4, 3], "dtype": "uint8", "layout": "HWC"}]}
    header.update(fields)
    return json.dumps(header).encode()


def _raw(camera: str, header: bytes, payload: bytes = bytes(48)) -> list[bytes]:
    return [f"frame.{camera}".encode(), header, payload]


def corpus(camera: str = "cam0") -> dict[str, list]:
    """Named hostile messages aimed at the profile camera ``camera``; none may be scored,
    stop the service or move that camera's counters."""
    part = {"plane": "rgb", "dtype": "uint8", "layout": "HWC"}
    huge_seq = _header(camera).replace(b'"seq": 0', b'"seq": ' + b"9" * 5000)
    out = {
        "infinity in shape": _raw(camera, _header(camera).replace(b"[4, 4, 3]", b"[Infinity, 4, 3]")),
        "NaN seq": _raw(camera, _header(camera).replace(b'"seq": 0', b'"seq": NaN')),
        "5000-digit seq": _raw(camera, huge_seq),
        "60000 nested [": [f"frame.{camera}".encode(), b"[" * 60000],
        "t_capture_ns 10**309": _raw(camera, _header(camera, t_capture_ns=10**309)),
        "seq 10**309": _raw(camera, _header(camera, seq=10**309)),
        "float 1e999": _raw(camera, _header(camera, score=1).replace(b'"score": 1', b'"score": 1e999')),
        "boolean seq": _raw(camera, _header(camera, seq=True)),
        "boolean version": _raw(camera, _header(camera, v=True)),
        "dot in camera id": _raw("line.1", _header("line.1")),
        "space in camera id": _raw("line 1", _header("line 1")),
        "unicode camera id": [b"frame.kamera\xc3\xa9", _header("kamera\u00e9"), bytes(48)],
        "negative dimension": _raw(camera, _header(camera, parts=[{**part, "shape": [-4, -4, 3]}])),
        "fractional dimension": _raw(camera, _header(camera, parts=[{**part, "shape": [4.0, 4, 3]}])),
        "ten dimensions": _raw(camera, _header(camera, parts=[{**part, "shape": [1] * 9 + [48]}])),
        "2**40 dimension": _raw(camera, _header(camera, parts=[{**part, "shape": [2**40, 0, 3]}])),
        "zero-size frame": _raw(camera, _header(camera, parts=[{**part, "shape": [0, 4, 3]}]), b""),
        "one-dimensional frame": _raw(camera, _header(camera, parts=[{**part, "shape": [48]}])),
        "float32 frame": _raw(camera, _header(camera, parts=[{**part, "shape": [4, 4, 3],
                                                               "dtype": "float32"}]), bytes(192)),
        "part spec not a mapping": _raw(camera, _header(camera, parts=["rgb"])),
        "repeated plane": [f"frame.{camera}".encode(),
                           _header(camera, parts=[{**part, "shape": [4, 4, 3]}] * 2), bytes(48), bytes(48)],
        "header too large": _raw(camera, _header(camera, pad="x" * 70_000)),
        "header not an object": [f"frame.{camera}".encode(), b"[1, 2, 3]"],
        "200 parts": [f"frame.{camera}".encode(), _header(camera)] + [b""] * 200,
        "random bytes": [np.random.default_rng(0).bytes(64)],
        "empty message": [b""],
        "result on the frame link": encode("result", camera, 0, time.monotonic_ns(),
                                           [np.zeros((4, 4), np.float16)], score=1.0),
    }
    return out


def spoofed_seq(camera: str = "cam0", seq: int = 10**15) -> list:
    """A well-formed frame claiming ``camera`` with a far-future seq (today: 10**15 hwm drops)."""
    return encode("frame", camera, seq, time.monotonic_ns(), [np.zeros((250, 250, 3), np.uint8)])


def invented_camera(i: int) -> list:
    """A well-formed small frame from a camera id the profile does not list."""
    return encode("frame", f"intruder-{i}", 0, time.monotonic_ns(), [np.zeros((8, 8, 3), np.uint8)])
