"""Wire format: round trip, and every malformed message named (never an exception type leak)."""

import json

import numpy as np
import pytest

from edge_inspect.runtime.transport.wire import WIRE_VERSION, MalformedMessage, decode, encode


def _parts(**extra):
    frame = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    return [bytes(memoryview(p)) if isinstance(p, np.ndarray) else p
            for p in encode("frame", "cam0", 7, 123, [frame], **extra)]


def test_round_trip():
    heat = np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3)
    parts = encode("result", "line-2", 3, 999, [heat], score=0.7, label=1)
    msg = decode([bytes(memoryview(p)) if isinstance(p, np.ndarray) else p for p in parts])
    assert (msg.kind, msg.camera, msg.seq, msg.t_capture_ns) == ("result", "line-2", 3, 999)
    assert msg.header["score"] == 0.7 and msg.header["v"] == WIRE_VERSION
    assert np.array_equal(msg.arrays[0], heat) and msg.arrays[0].dtype == np.float32
    assert decode(_parts()).arrays[0].shape == (4, 5, 3)


def _with_header(change):
    parts = _parts()
    header = json.loads(parts[1])
    change(header)
    parts[1] = json.dumps(header).encode()
    return parts


@pytest.mark.parametrize("parts,reason", [
    ([b"\x00\xff garbage"], "too few parts"),
    ([b"\xff\xfe", b"{}"], "topic not ASCII"),
    ([b"video.cam0", b"{}"], "unknown topic"),
    ([b"frame.cam0", b"\xff{not json"], "header not JSON"),
    ([b"frame.cam0", b"[1, 2]"], "header not an object"),
    (_with_header(lambda h: h.update(v=99)), "wrong schema version"),
    (_with_header(lambda h: h.update(camera="cam9")), "camera does not match topic"),
    (_with_header(lambda h: h.update(seq=-1)), "bad seq or timestamp"),
    (_with_header(lambda h: h["parts"][0].update(dtype="complex128")), "unknown dtype"),
    (_with_header(lambda h: h["parts"][0].update(shape=[4, 5, 4])), "payload size does not match shape"),
    (_parts()[:2], "payload count does not match header"),
    (_parts()[:2] + [b"\x00" * 59], "payload size does not match shape"),  # truncated
])
def test_malformed_messages_are_named(parts, reason):
    with pytest.raises(MalformedMessage) as err:
        decode(parts)
    assert err.value.reason == reason


def test_random_bytes_never_escape_as_other_errors():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 5))
        parts = [rng.bytes(int(rng.integers(0, 40))) for _ in range(n)]
        with pytest.raises(MalformedMessage):
            decode(parts)


def test_encode_refuses_bad_input():
    with pytest.raises(ValueError, match="camera id"):
        encode("frame", "cam.0", 0, 0)
    with pytest.raises(ValueError, match="dtype"):
        encode("frame", "cam0", 0, 0, [np.zeros(3, np.float64)])
