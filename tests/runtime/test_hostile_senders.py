"""Hostile senders against a running `serve` (issue 12): nothing they send stops it, grows its
memory or metric series without bound, or moves a real camera's counters."""

import time

import numpy as np
import pytest

from edge_inspect.runtime.bundle import load_bundle
from edge_inspect.runtime.engines import open_engine
from edge_inspect.runtime.metrics import RuntimeMetrics
from edge_inspect.runtime.model_slot import ModelSlot
from edge_inspect.runtime.pipeline import Pipeline, PipelineConfig
from edge_inspect.runtime.transport.sockets import Sender, TransportConfig
from edge_inspect.runtime.transport.wire import decode, encode
from tests.hostile import corpus, invented_camera, spoofed_seq
from tests.runtime.serve_proc import Serve, metric, rss_kib, series_count


def _profile(bundle, tmp_path, **extra):
    return {"bundle": str(bundle), "mode": "every_part", "endpoint_dir": str(tmp_path / "ep"),
            "cameras": [{"id": "cam0", "source": "synthetic", "size": [250, 250], "fps": 20}],
            "http": {"host": "127.0.0.1", "port": 0}, "model_name": "m", **extra}


def _sender(tmp_path):
    return Sender(TransportConfig(f"ipc://{tmp_path}/ep/frames", mode="every_part", send_timeout_ms=10000))


def _dropped(body, camera, reason):
    return metric(body, "edge_inspect_frames_dropped_total", camera=camera, reason=reason)


def test_hostile_corpus_does_not_stop_serve_or_move_the_real_cameras_counters(bundles, tmp_path):
    serve = Serve(_profile(bundles["memory"], tmp_path), tmp_path).started().ready()
    tx = _sender(tmp_path)
    try:
        scored = serve.value("edge_inspect_frames_inferred_total", camera="cam0", model="m")
        hostile = list(corpus("cam0").values()) + [spoofed_seq("cam0", 10**15)]
        for _ in range(3):
            for parts in hostile:
                tx.send(parts)
        time.sleep(1.5)
        assert serve.proc.poll() is None, serve.errors()
        body = serve.metrics()
        malformed = _dropped(body, "unknown", "malformed") + _dropped(body, "cam0", "malformed")
        assert malformed == 3 * len(corpus("cam0"))  # every one counted once
        assert _dropped(body, "cam0", "hwm") < 100  # the 10**15 seq is a restart, not 10**15 drops
        later = time.monotonic() + 20
        while serve.value("edge_inspect_frames_inferred_total", camera="cam0", model="m") < scored + 20:
            assert time.monotonic() < later, "the real camera is no longer scored"
            time.sleep(0.2)
    finally:
        tx.close()
        assert serve.stop() == 0


def test_ten_thousand_hostile_messages_grow_neither_memory_nor_series(bundles, tmp_path):
    # micro-batches of one: a larger batch than the warm-up formed would grow ONNX Runtime's
    # arena by its distance matrices (hundreds of MB for the memory bundle's 4x-turned bank)
    # and read as a leak; the messages, not the batch sizes, are what this measures
    serve = Serve(_profile(bundles["memory"], tmp_path, pipeline={"max_batch": 1}),
                  tmp_path).started().ready()
    tx = _sender(tmp_path)
    messages = list(corpus("cam0").values())
    try:
        for i in range(1000):  # warm every code path once before measuring
            tx.send(invented_camera(i) if i % 2 else messages[i % len(messages)])
        time.sleep(1.0)
        rss0, series0 = rss_kib(serve.pid), series_count(serve.metrics())
        for i in range(10_000):
            tx.send(invented_camera(1000 + i) if i % 2 else messages[i % len(messages)])
        deadline = time.monotonic() + 30
        while _dropped(serve.metrics(), "unknown", "unknown_camera") < 5500:
            assert time.monotonic() < deadline, "the hostile messages were not all taken"
            time.sleep(0.2)
        body = serve.metrics()
        rss1, series1 = rss_kib(serve.pid), series_count(body)
        assert 'camera="intruder-' not in body
        # 11,000 invented ids: no new series at all (the counters existing before just count on)
        assert series1 == series0, (series0, series1)
        assert rss1 - rss0 < 20 * 1024, f"RSS grew {rss0} -> {rss1} KiB"  # was +377 MB for 1,500 ids
    finally:
        tx.close()
        assert serve.stop() == 0


def test_a_message_larger_than_the_bundles_largest_plane_is_never_read(bundles, tmp_path):
    """MAXMSGSIZE from the bundle: a 1 GiB part would be read into memory; now the receiver
    disconnects its sender (here a 64 MiB part against a 16 MiB limit)."""
    profile = _profile(bundles["memory"], tmp_path, pipeline={"max_frame_pixels": 2048 * 2048})
    serve = Serve(profile, tmp_path).started().ready()
    tx = _sender(tmp_path)
    try:
        rss0 = rss_kib(serve.pid)
        big = np.zeros((4096, 4096, 4), np.uint8)  # 64 MiB
        tx.send(encode("frame", "cam0", 10, time.monotonic_ns(), [big]))
        time.sleep(2.0)
        assert serve.proc.poll() is None
        assert rss_kib(serve.pid) - rss0 < 32 * 1024
        assert serve.value("edge_inspect_frames_dropped_total", camera="cam0", reason="malformed") == 0
    finally:
        tx.close()
        assert serve.stop() == 0


# -- the pipeline's intake, directly -------------------------------------------------------------

class _NoFrames:
    def drain(self, timeout_ms=None, limit=1000):
        return []

    def close(self):
        pass


@pytest.fixture()
def intake(bundles):
    bundle = load_bundle(bundles["memory"])
    metrics = RuntimeMetrics()
    pipe = Pipeline(ModelSlot(bundle, open_engine(bundle), "m"), _NoFrames(), [],
                    PipelineConfig(("cam0",), mode="every_part"), metrics)
    return pipe, lambda name, **labels: metrics.registry.get_sample_value(name, labels) or 0.0


def _frame(seq, camera="cam0"):
    return encode("frame", camera, seq, time.monotonic_ns(), [np.zeros((250, 250, 3), np.uint8)])


def test_seq_gaps_count_as_drops_only_up_to_what_a_camera_could_send(intake):
    pipe, value = intake
    assert pipe._decode(_frame(0)) is not None
    assert pipe._decode(_frame(6)) is not None
    assert value("edge_inspect_frames_dropped_total", camera="cam0", reason="hwm") == 5  # real losses
    assert pipe._decode(spoofed_seq("cam0", 10**15)) is not None
    assert value("edge_inspect_frames_dropped_total", camera="cam0", reason="hwm") == 5  # a restart
    assert pipe._decode(_frame(7)) is not None  # the real camera goes on: seq went back, a restart
    assert value("edge_inspect_frames_dropped_total", camera="cam0", reason="hwm") == 5
    assert value("edge_inspect_frames_received_total", camera="cam0") == 4


def test_unknown_cameras_are_one_label_and_no_state(intake):
    pipe, value = intake
    for i in range(300):
        assert pipe._decode(_frame(0, f"intruder-{i}")) is None
    assert value("edge_inspect_frames_dropped_total", camera="unknown", reason="unknown_camera") == 300
    assert set(pipe.last_seq) <= {"cam0"} and set(pipe.last_seen) <= {"cam0"}
    assert value("edge_inspect_frames_received_total", camera="intruder-1") == 0


def test_whatever_the_decoder_raises_costs_one_message(intake, monkeypatch):
    pipe, value = intake

    def broken(parts):
        raise OverflowError("a decoder bug")

    monkeypatch.setattr("edge_inspect.runtime.pipeline.decode", broken)
    assert pipe._decode(_frame(0)) is None
    assert value("edge_inspect_frames_dropped_total", camera="unknown", reason="malformed") == 1
    monkeypatch.setattr("edge_inspect.runtime.pipeline.decode", decode)
    assert pipe._decode(_frame(1)) is not None


@pytest.mark.parametrize("name", ["zero-size frame", "one-dimensional frame", "float32 frame",
                                  "result on the frame link"])
def test_well_formed_but_unusable_frames_are_malformed_drops(intake, name):
    pipe, value = intake
    assert pipe._decode(corpus("cam0")[name]) is None
    assert value("edge_inspect_frames_dropped_total", camera="cam0", reason="malformed") == 1


def test_future_timestamps_evict_no_real_capture(tmp_path):
    """Captures are named by the runtime's clock and kept per camera: 250 frames claiming the
    far future (which used to sort last and evict every real capture) keep neither another
    camera's captures nor a later real capture of the same camera from being retained."""
    from edge_inspect.runtime.capture import CaptureStore

    store = CaptureStore(tmp_path, retain=3)
    frame, heat = np.zeros((8, 8, 3), np.uint8), np.zeros((4, 4), np.float16)
    for seq in range(3):
        store.submit("line1", seq, frame, heat, {"t_capture_ns": time.monotonic_ns()})
    for seq in range(250):
        store.submit("line2", seq, frame, heat, {"t_capture_ns": 2**62 + seq})
        if seq % 20 == 0:
            store.flush()
    store.flush()
    store.submit("line2", 999, frame, heat, {"t_capture_ns": 1})  # real, after the flood
    store.flush()
    assert len(list((tmp_path / "line1").iterdir())) == 3  # untouched by line2's flood
    kept = sorted(p.name for p in (tmp_path / "line2").iterdir())
    assert len(kept) == 3 and kept[-1].endswith("-00000999")  # the newest by the runtime's clock
