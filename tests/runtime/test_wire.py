"""Wire format: round trip, and every malformed message named (never an exception type leak)."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_inspect.runtime.transport.wire import CAMERA_ID, WIRE_VERSION, MalformedMessage, decode, encode
from tests.hostile import corpus


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


# -- hostile input (issue 12): bounded numbers, strict types, ids by the encode rule --------------

@pytest.mark.parametrize("name", sorted(corpus()))
def test_hostile_messages_are_refused_or_well_formed(name):
    """Each of these once escaped decode as OverflowError / ValueError / RecursionError or was
    accepted with an id that encode refuses; now each is a MalformedMessage, or a message
    within the format's ranges (the pipeline then drops it as not a usable frame)."""
    try:
        msg = decode(corpus()[name])
    except MalformedMessage:
        return
    _assert_within_format(msg)
    assert name in ("zero-size frame", "one-dimensional frame", "float32 frame", "result on the frame link")


def _assert_within_format(msg):
    assert CAMERA_ID.fullmatch(msg.camera)
    for value in (msg.seq, msg.t_capture_ns):
        assert type(value) is int and 0 <= value < 2**63
    for a in msg.arrays:
        assert a.ndim <= 4 and all(0 <= d < 2**31 for d in a.shape)
    encode(msg.kind, msg.camera, msg.seq, msg.t_capture_ns, msg.arrays, planes=msg.plane_names)


def test_ids_that_encode_refuses_do_not_decode():
    for camera in ("line.1", "line 1", "", "x" * 65, "caf\u00e9"):
        with pytest.raises(ValueError):
            encode("frame", camera, 0, 0)
        raw = [f"frame.{camera}".encode(), json.dumps({"v": 1, "camera": camera, "seq": 0,
                                                      "t_capture_ns": 0, "parts": []}).encode()]
        with pytest.raises(MalformedMessage):
            decode(raw)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(field=st.sampled_from(["v", "camera", "seq", "t_capture_ns", "parts", "shape", "dtype", "plane"]),
       value=json_values)
def test_fuzz_one_field_of_a_valid_frame(field, value):
    """Any JSON value in any field of a valid frame: refused by name, or within the format."""
    header = json.loads(_parts()[1])
    if field in ("shape", "dtype", "plane"):
        header["parts"][0][field] = value
    else:
        header[field] = value
    raw = json.dumps(header, allow_nan=True).encode()
    try:
        msg = decode([_parts()[0], raw, _parts()[2]])
    except MalformedMessage:
        return
    _assert_within_format(msg)


@settings(max_examples=400, deadline=None)
@given(parts=st.lists(st.binary(max_size=64), min_size=0, max_size=5),
       topic=st.sampled_from([b"frame.cam0", b"result.cam0", b"frame.", b"frame.a.b"]),
       header=st.binary(max_size=200))
def test_fuzz_raw_bytes(parts, topic, header):
    """Arbitrary bytes, with and without a plausible topic: only MalformedMessage escapes."""
    for message in (parts, [topic, header] + parts):
        try:
            msg = decode(message)
        except MalformedMessage:
            continue
        _assert_within_format(msg)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet='[]{}",:0123456789-eE.INaftrueln ', max_size=300))
def test_fuzz_json_shaped_headers(text):
    """Bracket soup, huge numbers, Infinity / NaN spellings: a header never raises anything else."""
    try:
        msg = decode([b"frame.cam0", text.encode()])
    except MalformedMessage:
        return
    _assert_within_format(msg)
