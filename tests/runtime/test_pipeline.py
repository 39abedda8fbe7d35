"""The pipeline over real ZeroMQ sockets with a real bundle (in-process threads here; the
multi-process integration tests come with `edge-inspect serve`)."""

import json
import re
import threading
import time

import cv2
import numpy as np
import pytest
import zmq

from edge_inspect.runtime.bundle import load_bundle
from edge_inspect.runtime.capture import CaptureStore
from edge_inspect.runtime.engines import open_engine
from edge_inspect.runtime.metrics import RuntimeMetrics
from edge_inspect.runtime.model_slot import ModelSlot
from edge_inspect.runtime.overlay import BAR_PX, HEADER_PX
from edge_inspect.runtime.pipeline import Pipeline, PipelineConfig
from edge_inspect.runtime.preprocess import fit_image
from edge_inspect.runtime.sinks import CaptureSink, ResultSocketSink
from edge_inspect.runtime.transport.sockets import Receiver, Sender, TransportConfig
from edge_inspect.runtime.transport.wire import decode, encode


def make_pipeline(bundle, engine, frames: TransportConfig, results: TransportConfig, ctx, metrics=None,
                  captures=None, name="textile", cameras=("cam0", "tiny"), **options) -> Pipeline:
    """A pipeline wired as the orchestrator wires it: ZeroMQ receiver, results + capture sinks."""
    sinks = [ResultSocketSink(Sender(results, ctx))] + ([CaptureSink(captures)] if captures else [])
    return Pipeline(ModelSlot(bundle, engine, name), Receiver(frames, ctx), sinks,
                    PipelineConfig(cameras, mode=frames.mode, **options), metrics or RuntimeMetrics())


@pytest.fixture()
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def _start(bundle_dir, tmp_path, ctx, mode):
    bundle = load_bundle(bundle_dir)
    metrics = RuntimeMetrics()
    results = (TransportConfig(f"ipc://{tmp_path}/results", mode="every_part", binder="sender",
                               send_timeout_ms=500)
               if mode == "every_part" else TransportConfig(f"ipc://{tmp_path}/results", mode="live"))
    pipe = make_pipeline(bundle, open_engine(bundle), TransportConfig(f"ipc://{tmp_path}/frames", mode=mode),
                         results, ctx, metrics, CaptureStore(tmp_path / "captures", retain=3),
                         max_batch=4, heatmap_size=(16, 16))
    stop = threading.Event()
    thread = threading.Thread(target=pipe.run, args=(stop,), daemon=True)
    thread.start()
    return bundle, pipe, metrics, stop, thread


def _value(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_every_part_scores_every_frame_and_counts_malformed(bundles, tmp_path, ctx):
    bundle, pipe, metrics, stop, thread = _start(bundles["memory"], tmp_path, ctx, "every_part")
    results = Receiver(TransportConfig(f"ipc://{tmp_path}/results", mode="every_part",
                                       binder="sender"), ctx)
    tx = Sender(TransportConfig(f"ipc://{tmp_path}/frames", mode="every_part"), ctx)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (250, 250, 3), dtype=np.uint8) for _ in range(6)]
    frames[3][100:110, 100:110] = 255  # a bright blob
    for seq, frame in enumerate(frames):
        name = f"part-{seq}.png" if seq != 4 else "../../etc/passwd"  # an odd name is ignored
        tx.send(encode("frame", "cam0", seq, time.monotonic_ns(), [frame], source=name))
        if seq == 2:  # garbage in the middle of the stream
            tx.send([b"frame.cam0", b"{not json"])
            tx.send([b"\x00\x01"])
            tx.send(encode("frame", "tiny", 0, time.monotonic_ns(), [frame[:100, :100]]))  # < crop
    got = {}
    while len(got) < 6:
        parts = results.recv(5000)
        assert parts is not None, f"only {sorted(got)} arrived"
        msg = decode(parts)
        got[msg.seq] = msg
    stop.set()
    thread.join(5)
    size = (bundle.image.height, bundle.image.width)
    fitted = np.stack([fit_image(f, size, bundle.image.fit, bundle.image.interpolation) for f in frames])
    direct = open_engine(bundle).infer({"image": fitted})
    for seq, msg in got.items():
        assert abs(msg.header["score"] - float(direct["image_score"][seq])) < 1e-4
        assert msg.arrays[0].shape == (16, 16) and msg.arrays[0].dtype == np.float16
        assert msg.header["label"] == int(msg.header["score"] > bundle.threshold)
    assert _value(metrics, "edge_inspect_frames_inferred_total", camera="cam0", model="textile") == 6
    assert _value(metrics, "edge_inspect_frames_dropped_total", camera="unknown", reason="malformed") == 2
    assert _value(metrics, "edge_inspect_frames_dropped_total", camera="tiny", reason="malformed") == 1
    assert _value(metrics, "edge_inspect_camera_up", camera="cam0") == 1
    # the serving threshold and the last raw score are on /metrics beside the 0..1 histogram
    assert _value(metrics, "edge_inspect_threshold", model="textile") == pytest.approx(bundle.threshold)
    last = _value(metrics, "edge_inspect_last_score", camera="cam0")
    assert any(last == pytest.approx(m.header["score"]) for m in got.values())
    assert pipe.ready()["engine_warm"] and pipe.ready()["camera_cam0_fresh"]
    n_anomalous = sum(m.header["label"] for m in got.values())
    captures = [p for p in (tmp_path / "captures" / "cam0").glob("*") if not p.name.startswith(".")]
    assert len(captures) == min(n_anomalous, 3)
    for c in captures:
        assert {p.name for p in c.iterdir()} == {"frame.png", "overlay.png", "header.json"}
        assert cv2.imread(str(c / "frame.png")).shape == (248, 248, 3)
        header = json.loads((c / "header.json").read_text())
        assert re.fullmatch(r"\d{8}T\d{6}\.\d{6}Z-cam0-\d{8}", c.name)  # UTC time, camera, seq
        assert c.name.endswith(f"{header['seq']:08d}")
        assert header.get("source") == (f"part-{header['seq']}.png" if header["seq"] != 4 else None)
        # the overlay: a verdict header, the part and the part under its heatmap, a colour bar
        assert cv2.imread(str(c / "overlay.png")).shape == (HEADER_PX + 248 + 2 * BAR_PX, 2 * 248 + 4, 3)
    assert got[0].header["source"] == "part-0.png" and "source" not in got[4].header
    pipe.close(), tx.close(), results.close()


def test_live_mode_drops_old_frames_and_counts_them(bundles, tmp_path, ctx):
    tx = Sender(TransportConfig(f"ipc://{tmp_path}/frames", mode="live", hwm=1000), ctx,
                await_subscribers=True)
    bundle, pipe, metrics, stop, thread = _start(bundles["memory"], tmp_path, ctx, "live")
    assert tx.wait_for_subscriber(5000)
    frame = np.zeros((250, 250, 3), np.uint8)
    for seq in range(200):  # far faster than the CPU model can score
        tx.send(encode("frame", "cam0", seq, time.monotonic_ns(), [frame]))
    time.sleep(1.5)
    stop.set()
    thread.join(5)
    received = _value(metrics, "edge_inspect_frames_received_total", camera="cam0")
    inferred = _value(metrics, "edge_inspect_frames_inferred_total", camera="cam0", model="textile")
    dropped = sum(_value(metrics, "edge_inspect_frames_dropped_total", camera="cam0", reason=r)
                  for r in ("stale", "hwm"))
    assert 0 < inferred < 200
    assert inferred + dropped == pytest.approx(200, abs=2)  # every frame is scored or counted
    assert received + _value(metrics, "edge_inspect_frames_dropped_total", camera="cam0",
                             reason="hwm") >= inferred
    # frames lost after the last one received show no seq gap: a finished source's count
    # of sent frames closes the account (the orchestrator calls this at shutdown)
    tail = pipe.count_unreceived_tail("cam0", 200)
    dropped = sum(_value(metrics, "edge_inspect_frames_dropped_total", camera="cam0", reason=r)
                  for r in ("stale", "hwm"))
    assert inferred + dropped == 200 and pipe.count_unreceived_tail("cam0", 200) == 0
    assert pipe.count_unreceived_tail("tiny", 3) == 3  # nothing received at all
    print(f"tail frames counted at the end: {tail}")
    pipe.close(), tx.close()


class _LostDevice:
    """A real engine whose device goes away after warm-up (as a GPU reset would)."""

    def __init__(self, engine):
        self.engine = engine

    def warmup(self):
        self.engine.warmup()

    def infer(self, *args):
        raise RuntimeError("device lost")


def test_an_engine_failure_ends_run_with_the_error_and_stops_every_stage(bundles, tmp_path, ctx):
    bundle = load_bundle(bundles["memory"])
    pipe = make_pipeline(bundle, _LostDevice(open_engine(bundle)),
                         TransportConfig(f"ipc://{tmp_path}/frames", mode="every_part"),
                         TransportConfig(f"ipc://{tmp_path}/results", mode="live"), ctx, max_batch=1)
    errors = []

    def serve():
        try:
            pipe.run(threading.Event())  # never set: only the failure can end it
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    tx = Sender(TransportConfig(f"ipc://{tmp_path}/frames", mode="every_part"), ctx)
    tx.send(encode("frame", "cam0", 0, time.monotonic_ns(), [np.zeros((250, 250, 3), np.uint8)]))
    thread.join(5)
    assert not thread.is_alive() and "device lost" in str(errors[0])
    assert not [t for t in threading.enumerate() if t.name.startswith("pipeline-")]
    pipe.close(), tx.close()


def test_runtime_reports_a_failed_pipeline(bundles, tmp_path):
    from edge_inspect.runtime.orchestrator import Runtime
    from edge_inspect.runtime.profile import Profile

    cfg = Profile.from_dict(dict(bundle=str(bundles["memory"]), mode="every_part", endpoint_dir=str(tmp_path),
                                 cameras=[{"id": "cam0", "source": "synthetic", "size": [250, 250],
                                           "fps": 20, "count": 20}], http={"port": None}))
    runtime = Runtime(cfg).start()
    try:
        runtime.pipeline.slot.swap(runtime.bundle, _LostDevice(runtime.pipeline.engine))  # before frame 0
        runtime.check()  # healthy so far
        deadline = time.monotonic() + 15
        while runtime.error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(RuntimeError, match="pipeline stopped: RuntimeError: device lost"):
            runtime.check()
    finally:
        runtime.shutdown()


class _Recording:
    """A real engine that keeps the arrays it was given."""

    def __init__(self, engine):
        self.engine, self.inputs = engine, []

    def infer(self, feeds, outputs=None):
        self.inputs.append(feeds["image"])
        return self.engine.infer(feeds, outputs)


def test_the_inference_thread_hands_a_single_frame_to_the_engine_without_copying(bundles, tmp_path, ctx):
    """A copy between engine calls releases the GIL and the engine then waits for the other
    stages (0.25-1.9 ms idle between engine calls in a thread trace): intake makes the frame
    contiguous, and a batch of one reaches the engine as a view of it."""
    bundle = load_bundle(bundles["memory"])
    engine = _Recording(open_engine(bundle))
    pipe = make_pipeline(bundle, engine, TransportConfig(f"ipc://{tmp_path}/frames", mode="every_part"),
                         TransportConfig(f"ipc://{tmp_path}/results", mode="live"), ctx, max_batch=2)
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (250, 250, 3), dtype=np.uint8) for _ in range(2)]
    items = [pipe.prepare(decode(encode("frame", "cam0", i, time.monotonic_ns(), [f])), time.monotonic_ns())
             for i, f in enumerate(frames)]
    fitted = [fit_image(f, (bundle.image.height, bundle.image.width), bundle.image.fit,
                         bundle.image.interpolation) for f in frames]
    assert items[0].planes["image"].flags.c_contiguous
    _, single, _ = pipe.infer(items[:1])
    assert np.shares_memory(engine.inputs[0], items[0].planes["image"])
    np.testing.assert_array_equal(engine.inputs[0], fitted[0][None])
    _, pair, _ = pipe.infer(items)  # a real micro-batch is stacked
    np.testing.assert_array_equal(engine.inputs[1], np.stack(fitted))
    np.testing.assert_allclose(pair["image_score"][:1], single["image_score"], rtol=1e-5)
    pipe.close()


def test_every_configured_camera_and_reason_starts_at_zero(bundles, tmp_path, ctx):
    """Before any frame: 0, not "no data", for each camera's counters and drop reasons."""
    bundle = load_bundle(bundles["memory"])
    metrics = RuntimeMetrics()
    pipe = make_pipeline(bundle, open_engine(bundle), TransportConfig(f"ipc://{tmp_path}/f", mode="live"),
                         TransportConfig(f"ipc://{tmp_path}/r", mode="live"), ctx, metrics)
    text = __import__("prometheus_client").generate_latest(metrics.registry).decode()
    for cam in ("cam0", "tiny"):
        for reason in ("hwm", "stale", "malformed"):
            assert f'edge_inspect_frames_dropped_total{{camera="{cam}",reason="{reason}"}} 0.0' in text
        assert f'edge_inspect_frames_received_total{{camera="{cam}"}} 0.0' in text
        assert f'edge_inspect_frames_inferred_total{{camera="{cam}",model="textile"}} 0.0' in text
        assert f'edge_inspect_source_restarts_total{{camera="{cam}"}} 0.0' in text
    assert 'edge_inspect_frames_dropped_total{camera="unknown",reason="unknown_camera"} 0.0' in text
    assert 'camera="cam0",reason="unknown_camera"' not in text
    pipe.close()


def test_frames_fitted_before_a_reload_are_fitted_again_for_the_new_bundle(bundles, tmp_path, ctx):
    """A reload to a bundle with other input sizes: frames already prepared for the old one
    are fitted again (or, when they cannot be, dropped and counted), never fed as they are."""
    memory, afclip = load_bundle(bundles["memory"]), load_bundle(bundles["afclip"])
    metrics = RuntimeMetrics()
    pipe = make_pipeline(memory, open_engine(memory), TransportConfig(f"ipc://{tmp_path}/f", mode="live"),
                         TransportConfig(f"ipc://{tmp_path}/r", mode="live"), ctx, metrics)

    def prepared(size: int, n: int) -> list:
        frame = np.random.default_rng(size).integers(0, 256, (size, size, 3), dtype=np.uint8)
        return [pipe.prepare(decode(encode("frame", "cam0", i, time.monotonic_ns(), [frame])), 0)
                for i in range(n)]

    batch = prepared(250, 2)  # fitted to the memory bundle's 248 x 248 crop
    pipe.slot.swap(afclip, open_engine(afclip), "afclip")
    model, out, _ = pipe.infer(batch)
    assert model.bundle is afclip and out[afclip.score_output].shape == (2,)
    assert batch[0].planes["image"].shape == (afclip.image.height, afclip.image.width, 3)
    small = prepared(120, 2)  # fine for AF-CLIP's resize, too small for the memory's crop
    pipe.slot.swap(memory, open_engine(memory), "memory")
    model, out, _ = pipe.infer(small)
    assert small == [] and out[memory.score_output].shape == (0,)
    assert _value(metrics, "edge_inspect_frames_dropped_total", camera="cam0", reason="malformed") == 2
    pipe.close()
