"""The wire format: multipart ``[topic, header, payload...]``, never pickle.

* ``topic``: ``frame.<camera>`` or ``result.<camera>`` (ASCII).
* ``header``: UTF-8 JSON with ``v`` (schema version), ``camera``, ``seq`` (per camera,
  monotonic), ``t_capture_ns`` (``time.monotonic_ns()`` at the source, comparable across
  processes on one host), ``parts`` (one ``{plane, shape, dtype, layout}`` per payload part:
  a frame carries one part per plane, ``rgb``, ``depth``, ``xyz`` ...) and any extra
  fields (results carry ``score``, ``label``, ``threshold``, ...).
* ``payload``: raw C-order buffers, sent with ``copy=False``; or, with the shared-memory
  transport, none: the header's ``shm`` (``{ring, slot, generation}``) says where the planes
  listed in ``parts`` lie (:mod:`.shm_ring`; the receiver reads them in place).

:func:`decode` checks everything and raises :class:`MalformedMessage` with a short
``reason`` for anything outside the format: integers are bounded (``seq`` and
``t_capture_ns`` in ``[0, 2**63)``, dimensions below ``2**31``; JSON's ``Infinity`` / ``NaN``,
numbers of more than 20 digits and booleans where integers belong are refused), camera ids
follow :data:`CAMERA_ID` (the rule of :func:`encode` and of profiles), nesting is bounded.
Callers count it under ``reason="malformed"`` and go on. Arrays are read-only views of the
received frames.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from edge_inspect.runtime.transport.shm_ring import NAME as RING_NAME
from edge_inspect.runtime.transport.shm_ring import SlotRef

WIRE_VERSION = 1
KINDS = ("frame", "result")
DTYPES = ("uint8", "uint16", "int32", "float16", "float32")
MAX_HEADER_BYTES = 64 * 1024
MAX_PARTS = 16  # payload parts of one message
MAX_NDIM = 4
MAX_DIM = 2**31 - 1
MAX_INT = 2**63 - 1  # seq and t_capture_ns are int64 on every side of the wire
MAX_INT_DIGITS = 20
PLANE_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
CAMERA_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # also the profile's rule: no dots, spaces, unicode


class MalformedMessage(ValueError):
    """A message that does not follow the wire format; ``reason`` says how, briefly."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Message:
    """A decoded message: kind (``frame`` / ``result``), header fields and payload arrays."""

    kind: str
    camera: str
    seq: int
    t_capture_ns: int
    header: dict
    arrays: list[np.ndarray] = field(default_factory=list)
    plane_names: list[str] = field(default_factory=list)
    ref: SlotRef | None = None  # shared-memory frame: where the planes lie (arrays empty until read)

    @property
    def planes(self) -> dict[str, np.ndarray]:
        """Payload arrays by plane name (a frame: ``{"rgb": ..., "depth": ...}``)."""
        return dict(zip(self.plane_names, self.arrays, strict=True))

    @property
    def plane_specs(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Shape and dtype by plane name, for payload and shared-memory frames alike."""
        if self.ref is not None:
            return {name: (shape, np.dtype(dtype)) for name, shape, dtype in self.ref.planes}
        return {name: (a.shape, a.dtype) for name, a in zip(self.plane_names, self.arrays, strict=True)}


def topic(kind: str, camera: str) -> bytes:
    return f"{kind}.{camera}".encode("ascii")


def encode_frame(camera: str, seq: int, t_capture_ns: int, planes: Mapping[str, np.ndarray],
                 source: str | None = None) -> list:
    """A frame message with one payload part per named plane (``source``: the replayed
    file's name, carried into results and captures)."""
    extra = {"source": source} if source else {}
    return encode("frame", camera, seq, t_capture_ns, list(planes.values()), planes=list(planes), **extra)


def encode_frame_ref(camera: str, seq: int, t_capture_ns: int, ref: SlotRef,
                     source: str | None = None) -> list:
    """A frame message that carries no pixels: where they lie in a shared-memory ring."""
    extra = {"source": source} if source else {}
    specs = [{"plane": name, "shape": list(shape), "dtype": dtype, "layout": "HWC"}
             for name, shape, dtype in ref.planes]
    # no arrays: ``parts`` comes from the slot's specs (extra fields replace the header's own)
    return encode("frame", camera, seq, t_capture_ns, (), planes=[], parts=specs, shm=ref.as_header(),
                  **extra)


def encode(kind: str, camera: str, seq: int, t_capture_ns: int, arrays: list[np.ndarray] = (),
           layouts: list[str] | None = None, planes: list[str] | None = None, **extra) -> list:
    """Multipart parts for ``socket.send_multipart(parts, copy=False)``; a part without a
    plane name is ``rgb`` (frames) or ``heatmap`` (results)."""
    if kind not in KINDS:
        raise ValueError(f"message kind {kind!r} unknown; use {KINDS}")
    if not isinstance(camera, str) or not CAMERA_ID.fullmatch(camera):
        raise ValueError(f"camera id {camera!r} must be 1-64 ASCII letters, digits, - or _")
    if not (0 <= int(seq) <= MAX_INT and 0 <= int(t_capture_ns) <= MAX_INT):
        raise ValueError(f"seq {seq} and t_capture_ns {t_capture_ns} must lie in [0, 2**63)")
    arrays = [np.ascontiguousarray(a) for a in arrays]
    for a in arrays:
        if a.dtype.name not in DTYPES:
            raise ValueError(f"payload dtype {a.dtype} not in the wire format ({DTYPES})")
    layouts = layouts or ["HWC" if a.ndim == 3 else "raw" for a in arrays]
    planes = planes or [_default_plane(kind, i) for i in range(len(arrays))]
    for name in planes:
        if not isinstance(name, str) or not PLANE_NAME.fullmatch(name):
            raise ValueError(f"plane name {name!r} must be lower-case letters, digits and _ (<= 32)")
    header = {"v": WIRE_VERSION, "camera": camera, "seq": int(seq), "t_capture_ns": int(t_capture_ns),
              "parts": [{"plane": name, "shape": list(a.shape), "dtype": a.dtype.name, "layout": lay}
                        for a, lay, name in zip(arrays, layouts, planes, strict=True)], **extra}
    return [topic(kind, camera), json.dumps(header, separators=(",", ":")).encode()] + arrays


def decode(parts: list) -> Message:
    """Parse received parts (bytes or ``zmq.Frame``); :class:`MalformedMessage` if anything is off."""
    if len(parts) < 2:
        raise MalformedMessage("too few parts")
    if len(parts) > MAX_PARTS + 2:
        raise MalformedMessage("too many parts")
    try:
        raw = [memoryview(p.buffer if hasattr(p, "buffer") else p).cast("B") for p in parts]
    except TypeError:
        raise MalformedMessage("part is not a buffer") from None
    try:
        kind, _, cam_topic = bytes(raw[0]).decode("ascii").partition(".")
    except UnicodeDecodeError:
        raise MalformedMessage("topic not ASCII") from None
    if kind not in KINDS or not CAMERA_ID.fullmatch(cam_topic):
        raise MalformedMessage("unknown topic")
    header = _parse_header(raw[1])
    if not _is_int(header.get("v")) or header["v"] != WIRE_VERSION:
        raise MalformedMessage("wrong schema version")
    camera, seq, t_ns = header.get("camera"), header.get("seq"), header.get("t_capture_ns")
    if camera != cam_topic:
        raise MalformedMessage("camera does not match topic")
    if not (_is_int(seq, MAX_INT) and _is_int(t_ns, MAX_INT)):
        raise MalformedMessage("bad seq or timestamp")
    specs, shm = header.get("parts"), header.get("shm")
    payloads = raw[2:]
    if shm is not None and (kind != "frame" or payloads):
        raise MalformedMessage("shared-memory reference with a payload or on a result")
    if not isinstance(specs, list) or (shm is None and len(specs) != len(payloads)) \
            or (shm is not None and not 0 < len(specs) <= MAX_PARTS):
        raise MalformedMessage("payload count does not match header")
    arrays, names, described = [], [], []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise MalformedMessage("bad part spec")
        shape, name = spec.get("shape"), spec.get("plane", _default_plane(kind, i))
        if (not isinstance(shape, list) or len(shape) > MAX_NDIM
                or not all(_is_int(d, MAX_DIM) for d in shape)):
            raise MalformedMessage("bad part spec")
        if not isinstance(name, str) or not PLANE_NAME.fullmatch(name) or name in names:
            raise MalformedMessage("bad or repeated plane name")
        names.append(name)
        if spec.get("dtype") not in DTYPES:
            raise MalformedMessage("unknown dtype")
        dtype = np.dtype(spec["dtype"])
        if shm is not None:
            described.append((name, tuple(shape), dtype.name))
            continue
        if math.prod(shape) * dtype.itemsize != len(payloads[i]):
            raise MalformedMessage("payload size does not match shape")
        arrays.append(np.frombuffer(payloads[i], dtype=dtype).reshape(shape))
    ref = _slot_ref(shm, described) if shm is not None else None
    return Message(kind, camera, seq, t_ns, header, arrays, names, ref)


def _slot_ref(shm, planes: list) -> SlotRef:
    """The header's ``shm`` object checked for form (whether it fits a ring is the ring's call)."""
    if not isinstance(shm, dict) or set(shm) != {"ring", "slot", "generation"}:
        raise MalformedMessage("bad shared-memory reference")
    ring, slot, generation = shm["ring"], shm["slot"], shm["generation"]
    if not isinstance(ring, str) or not RING_NAME.fullmatch(ring) or not _is_int(slot, MAX_DIM) \
            or not _is_int(generation):
        raise MalformedMessage("bad shared-memory reference")
    return SlotRef(ring, slot, generation, tuple(planes))


def _is_int(value, maximum: int = MAX_INT) -> bool:
    """A JSON integer in ``[0, maximum]`` (``True`` is an int to Python, not to the format)."""
    return type(value) is int and 0 <= value <= maximum


def _refuse_constant(name: str):
    raise MalformedMessage(f"header holds {name}")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise MalformedMessage("number out of range")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise MalformedMessage("number out of range")
    return value


def _parse_header(buf: memoryview) -> dict:
    """The JSON header object; numbers bounded, ``Infinity``/``NaN`` and deep nesting refused."""
    if len(buf) > MAX_HEADER_BYTES:
        raise MalformedMessage("header too large")
    try:
        header = json.loads(bytes(buf).decode("utf-8"), parse_constant=_refuse_constant,
                            parse_int=_bounded_int, parse_float=_finite_float)
    except MalformedMessage:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError):  # JSONDecodeError is a ValueError
        raise MalformedMessage("header not JSON") from None
    if not isinstance(header, dict):
        raise MalformedMessage("header not an object")
    return header


def _default_plane(kind: str, index: int) -> str:
    base = "rgb" if kind == "frame" else "heatmap"
    return base if index == 0 else f"{base}_{index}"
