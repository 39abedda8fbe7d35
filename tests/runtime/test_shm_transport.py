"""The shared-memory frame transport end to end: references on the wire, the pipeline reading
frames in place (fitting them is the one copy), forged or stale references counted, slots
rewritten while in use dropped as ``overwritten``, every_part writers waiting for a free
slot, batches assembled in a preallocated buffer; then `serve` with ``transport: shm``:
nothing lost in every_part, camera processes killed mid-write (no torn frame scored), and
no ring left in /dev/shm after SIGTERM or after a runtime killed outright."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import numpy as np
import pytest
import zmq

from edge_inspect.runtime.bundle import load_bundle
from edge_inspect.runtime.engines import open_engine
from edge_inspect.runtime.metrics import RuntimeMetrics
from edge_inspect.runtime.model_slot import ModelSlot
from edge_inspect.runtime.pipeline import Pipeline, PipelineConfig
from edge_inspect.runtime.preprocess import fit_image
from edge_inspect.runtime.profile import Profile, ProfileError
from edge_inspect.runtime.sinks import ResultSocketSink
from edge_inspect.runtime.transport.shm_frames import RingFrames, RingSet
from edge_inspect.runtime.transport.shm_ring import SHM_DIR, FrameRing, aligned, attach_untracked, ring_name
from edge_inspect.runtime.transport.sockets import Receiver, Sender, TransportConfig
from edge_inspect.runtime.transport.wire import MalformedMessage, decode, encode, encode_frame_ref
from tests.runtime.serve_proc import Serve, descendants, metric
from tests.runtime.test_reload import Results, post

FRAME = (250, 250, 3)  # the memory bundle crops 248 x 248
SLOT = aligned(int(np.prod(FRAME)))


def _value(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, labels) or 0.0


def _frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, FRAME, dtype=np.uint8) for _ in range(n)]


def _rings_in_shm(pid: int) -> list[str]:
    return sorted(p.name for p in SHM_DIR.glob(f"edge-inspect-{pid}-*"))


# -- the wire --------------------------------------------------------------------------------------

def test_a_reference_crosses_the_wire_without_pixels_and_odd_ones_are_malformed():
    ring = FrameRing(ring_name("wire"), slots=2, slot_bytes=SLOT, create=True)
    try:
        ref = ring.write({"rgb": np.zeros(FRAME, np.uint8)})
        parts = encode_frame_ref("cam0", 5, 123, ref, source="a.png")
        assert len(parts) == 2 and len(parts[1]) < 400  # topic + header: no payload
        msg = decode(parts)
        assert msg.ref == ref and msg.arrays == [] and msg.header["source"] == "a.png"
        assert msg.plane_specs == {"rgb": (FRAME, np.dtype(np.uint8))}
        header = json.loads(parts[1])
        odd = {
            "ring not a ring name": {**header, "shm": {**header["shm"], "ring": "/etc/passwd"}},
            "slot a boolean": {**header, "shm": {**header["shm"], "slot": True}},
            "generation negative": {**header, "shm": {**header["shm"], "generation": -2}},
            "an extra key": {**header, "shm": {**header["shm"], "offset": 0}},
            "not an object": {**header, "shm": [1, 2]},
            "no planes": {**header, "parts": []},
        }
        for case, h in odd.items():
            with pytest.raises(MalformedMessage):
                decode([parts[0], json.dumps(h).encode()])
                pytest.fail(case)
        with pytest.raises(MalformedMessage):  # a reference and pixels at once
            decode([parts[0], parts[1], np.zeros(FRAME, np.uint8)])
        result = encode("result", "cam0", 1, 1)
        with pytest.raises(MalformedMessage):  # results never point into a ring
            decode([result[0], json.dumps({**json.loads(result[1]), "shm": header["shm"],
                                           "parts": header["parts"]}).encode()])
    finally:
        ring.close()


# -- the pipeline, in process ---------------------------------------------------------------------

@pytest.fixture()
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def _pipeline(bundle_dir, tmp_path, ctx, mode: str, slots: int = 4, cameras=("cam0", "tiny")):
    bundle = load_bundle(bundle_dir)
    rings = RingSet.create(["cam0"], slots, SLOT)
    metrics = RuntimeMetrics()
    results = TransportConfig(f"ipc://{tmp_path}/results", mode="every_part", binder="sender",
                              send_timeout_ms=500)
    pipe = Pipeline(ModelSlot(bundle, open_engine(bundle), "textile"),
                    Receiver(TransportConfig(f"ipc://{tmp_path}/frames", mode=mode), ctx),
                    [ResultSocketSink(Sender(results, ctx))],
                    PipelineConfig(cameras, mode=mode, max_batch=4, heatmap_size=(16, 16)), metrics, rings)
    return bundle, pipe, metrics, rings


def _forged(parts: list) -> list[list]:
    """References made from a real one: four malformed, one overwritten, one for a camera
    without a ring."""
    topic, header = parts[0], json.loads(parts[1])
    shm = header["shm"]

    def changed(**change):
        return [topic, json.dumps({**header, "shm": {**shm, **change}}).encode()]

    overrun = [{**header["parts"][0], "shape": [2000, 2000, 3]}]
    return [changed(ring="edge-inspect-1-0badc0de-cam0"),  # another runtime's ring: malformed
            changed(slot=99),  # out of range: malformed
            changed(generation=shm["generation"] + 1),  # odd, never a frame: malformed
            changed(generation=max(2, shm["generation"] - 2)),  # the slot's last frame: overwritten
            [topic, json.dumps({**header, "parts": overrun}).encode()],  # overruns the slot: malformed
            [b"frame.tiny", json.dumps(header | {"camera": "tiny", "seq": 0}).encode()]]  # no ring


def test_every_part_scores_every_frame_in_place_and_counts_forged_references(bundles, tmp_path, ctx):
    """Six frames through a 4-slot ring (the writer waits for the pipeline to hand slots
    back), forged references between them: each counted under its reason, none fatal, and
    the scores equal the engine's on the same frames."""
    bundle, pipe, metrics, rings = _pipeline(bundles["memory"], tmp_path, ctx, "every_part")
    stop = threading.Event()
    thread = threading.Thread(target=pipe.run, args=(stop,), daemon=True)
    thread.start()
    writer = RingFrames(rings.name("cam0"), "every_part", ("rgb",), wait_s=10)
    tx = Sender(TransportConfig(f"ipc://{tmp_path}/frames", mode="every_part"), ctx)
    results = Receiver(TransportConfig(f"ipc://{tmp_path}/results", mode="every_part",
                                       binder="sender"), ctx)
    frames = _frames(6)
    try:
        for seq, frame in enumerate(frames):
            parts = writer.parts("cam0", seq, time.monotonic_ns(), {"rgb": frame}, None)
            tx.send(parts)
            if seq == 4:  # forged after a real reference, copying its header
                for message in _forged(parts):
                    tx.send(message)
        got = {}
        while len(got) < 6:
            received = results.recv(10000)
            assert received is not None, f"only {sorted(got)} scored"
            msg = decode(received)
            got[msg.seq] = msg.header["score"]
    finally:
        stop.set()
        thread.join(5)
        writer.close()
    size = (bundle.image.height, bundle.image.width)
    fitted = np.stack([fit_image(f, size, bundle.image.fit, bundle.image.interpolation) for f in frames])
    direct = open_engine(bundle).infer({"image": fitted})["image_score"]
    assert sorted(got) == list(range(6))
    assert max(abs(got[i] - float(direct[i])) for i in range(6)) < 1e-4
    drops = {r: _value(metrics, "edge_inspect_frames_dropped_total", camera="cam0", reason=r)
             for r in ("hwm", "stale", "malformed", "overwritten")}
    assert drops == {"hwm": 0, "stale": 0, "malformed": 4, "overwritten": 1}, drops
    assert _value(metrics, "edge_inspect_frames_dropped_total", camera="tiny", reason="malformed") == 1
    pipe.close(), tx.close(), results.close()
    rings.close()


def test_a_slot_rewritten_while_its_frame_is_fitted_is_dropped(bundles, tmp_path, ctx, monkeypatch):
    """The camera laps the pipeline while a frame is being fitted: the fitted copy may hold
    parts of two frames, so it is dropped as ``overwritten``; the next frame is scored."""
    import edge_inspect.runtime.pipeline as pipeline_module

    _, pipe, metrics, rings = _pipeline(bundles["memory"], tmp_path, ctx, "live")
    lapping = FrameRing(rings.name("cam0"))  # the camera's side, writing whatever the reader does
    real_fit = pipeline_module.fit_planes
    frames = _frames(2)

    def fit_while_the_camera_writes(planes, bundle):
        half = real_fit(planes, bundle)  # the reader has fitted part of it ...
        lapping.write({"rgb": frames[1]}, slot=ref.slot)  # ... and the writer comes round
        return half

    try:
        ref = lapping.write({"rgb": frames[0]})
        msg = pipe._decode(encode_frame_ref("cam0", 0, time.monotonic_ns(), ref))
        monkeypatch.setattr(pipeline_module, "fit_planes", fit_while_the_camera_writes)
        assert pipe.prepare(msg, time.monotonic_ns()) is None
        monkeypatch.setattr(pipeline_module, "fit_planes", real_fit)
        assert _value(metrics, "edge_inspect_frames_dropped_total", camera="cam0", reason="overwritten") == 1
        ref = lapping.write({"rgb": frames[1]})
        item = pipe.prepare(pipe._decode(encode_frame_ref("cam0", 1, time.monotonic_ns(), ref)), 0)
        assert item is not None and not np.shares_memory(item.planes["image"], item.msg.arrays[0])
        assert np.array_equal(item.planes["image"], frames[1][1:249, 1:249])  # the one copy: the crop
    finally:
        lapping.close()
        pipe.close()
        rings.close()


def test_an_every_part_writer_waits_for_a_free_slot_and_a_live_one_never_does(tmp_path):
    rings = RingSet.create(["cam0"], 2, SLOT)
    frame = {"rgb": np.zeros(FRAME, np.uint8)}
    waiting = RingFrames(rings.name("cam0"), "every_part", wait_s=0.05)
    live = RingFrames(rings.name("cam0"), "live")
    try:
        first = decode(waiting.parts("cam0", 0, 1, frame, None))
        waiting.parts("cam0", 1, 1, frame, None)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):  # both slots unread: publish counts send_blocked, retries
            waiting.parts("cam0", 2, 1, frame, None)
        assert time.monotonic() - t0 >= 0.05
        rings.read(first)
        assert rings.finish(first)  # the pipeline has fitted frame 0: its slot is free again
        third = decode(waiting.parts("cam0", 2, 1, frame, None))
        assert third.ref.slot == first.ref.slot
        for seq in range(5):  # live: laps unread slots without waiting
            live.parts("cam0", seq, 1, frame, None)
        assert waiting.too_large({"rgb": np.zeros((251, 250, 3), np.uint8)}) is not None
        assert "transport.frame_pixels" in waiting.too_large({"rgb": np.zeros((251, 250, 3), np.uint8)})
    finally:
        waiting.close(), live.close()
        rings.close()
    assert not (SHM_DIR / first.ref.ring).exists()


def test_every_part_slots_come_back_on_every_drop_path(bundles, tmp_path, ctx):
    """A frame the pipeline drops (too small for the crop, a plane that does not match) hands
    its slot back: an every_part camera with 2 slots would otherwise wait forever."""
    _, pipe, metrics, rings = _pipeline(bundles["memory"], tmp_path, ctx, "every_part", slots=2)
    writer = RingFrames(rings.name("cam0"), "every_part", wait_s=0.2)
    try:
        for seq in range(3):  # smaller than the 248 crop: dropped when fitted
            small = {"rgb": np.zeros((100, 100, 3), np.uint8)}
            assert pipe.prepare(pipe._decode(writer.parts("cam0", seq, 1, small, None)), 0) is None
        for seq in range(3, 6):  # one channel where the bundle takes three: dropped when decoded
            grey = {"rgb": np.zeros((250, 250, 1), np.uint8)}
            assert pipe._decode(writer.parts("cam0", seq, 1, grey, None)) is None
        assert _value(metrics, "edge_inspect_frames_dropped_total", camera="cam0", reason="malformed") == 6
        item = pipe.prepare(pipe._decode(writer.parts("cam0", 6, 1, {"rgb": _frames(1)[0]}, None)), 0)
        assert item is not None  # the camera never waited: every slot came back
        assert not writer.ring.slot_free(item.msg.ref.slot)  # held until the frame is in the engine
        pipe.infer([item])
        assert writer.ring.slot_free(item.msg.ref.slot)
    finally:
        writer.close()
        pipe.close()
        rings.close()


def test_a_frame_already_at_the_input_size_is_copied_out_of_shared_memory(bundles, tmp_path, ctx):
    """Fitting a 248 x 248 frame for a 248 x 248 crop needs no resampling; the fitted plane
    must still be a copy, or the camera's next write into the slot would change the frame
    being scored."""
    _, pipe, _, rings = _pipeline(bundles["memory"], tmp_path, ctx, "live", slots=2)
    writer = FrameRing(rings.name("cam0"))
    frame = _frames(1)[0][:248, :248]
    try:
        item = pipe.prepare(pipe._decode(encode_frame_ref("cam0", 0, 1, writer.write({"rgb": frame}))), 0)
        assert not np.shares_memory(item.planes["image"], item.msg.arrays[0])
        writer.write({"rgb": np.zeros_like(frame)}, slot=item.msg.ref.slot)  # the camera comes round
        assert np.array_equal(item.planes["image"], frame)
    finally:
        writer.close()
        pipe.close()
        rings.close()


def test_a_reload_to_other_inputs_fits_every_part_frames_again_without_loss(bundles, tmp_path, ctx):
    """every_part keeps a frame's slot until the frame is in the engine, so frames prepared
    for the old bundle are fitted again from their slot for a bundle with other inputs."""
    _, pipe, metrics, rings = _pipeline(bundles["memory"], tmp_path, ctx, "every_part", slots=2)
    writer = RingFrames(rings.name("cam0"), "every_part", wait_s=0.05)
    other = load_bundle(bundles["afclip"])  # 112 x 112 resize instead of a 248 crop
    try:
        items = [pipe.prepare(pipe._decode(writer.parts("cam0", i, 1, {"rgb": f}, None)), 0)
                 for i, f in enumerate(_frames(2, seed=5))]
        with pytest.raises(TimeoutError):  # both slots still held
            writer.parts("cam0", 2, 1, {"rgb": _frames(1)[0]}, None)
        pipe.slot.swap(other, open_engine(other), "textile")
        model, out, _ = pipe.infer(items)
        assert len(out[other.score_output]) == 2 and items[0].planes["image"].shape == (112, 112, 3)
        assert _value(metrics, "edge_inspect_frames_dropped_total", camera="cam0", reason="overwritten") == 0
        writer.parts("cam0", 2, 1, {"rgb": _frames(1)[0]}, None)  # the slots came back after
    finally:
        writer.close()
        pipe.close()
        rings.close()


def test_batches_are_assembled_in_a_preallocated_buffer(bundles, tmp_path, ctx, monkeypatch):
    """No np.stack per batch: frames are copied into one buffer per input, made once."""
    import edge_inspect.runtime.pipeline as pipeline_module

    bundle, pipe, _, rings = _pipeline(bundles["memory"], tmp_path, ctx, "every_part")
    frames = _frames(7, seed=3)
    try:
        items = [pipe.prepare(pipe._decode(encode("frame", "cam0", i, time.monotonic_ns(), [f])), 0)
                 for i, f in enumerate(frames)]
        seen = []
        real_infer = pipe.engine.infer

        def recording_infer(feeds, names):
            seen.append(feeds["image"])
            return real_infer(feeds, names)

        monkeypatch.setattr(pipe.engine, "infer", recording_infer)
        monkeypatch.setattr(pipeline_module.np, "stack", None)  # any np.stack call fails
        _, out4, _ = pipe.infer(items[:4])
        _, out3, _ = pipe.infer(items[4:])
        monkeypatch.undo()
        assert seen[0].shape[0] == 4 and seen[1].shape[0] == 3
        assert np.shares_memory(seen[0], seen[1])  # the same buffer both times
        direct = open_engine(bundle).infer({"image": np.stack([i.planes["image"] for i in items])})
        both = np.concatenate([out4[bundle.score_output], out3[bundle.score_output]])
        assert np.allclose(both, direct["image_score"], atol=1e-5)
    finally:
        pipe.close()
        rings.close()


def test_transport_section_is_checked():
    base = {"bundle": "b", "cameras": [{"id": "cam0", "source": "synthetic"}]}
    assert Profile.from_dict(base).transport.kind == "zmq"
    shm = Profile.from_dict({**base, "transport": {"kind": "shm", "slots": 4}}).transport
    assert (shm.kind, shm.slots, shm.frame_pixels) == ("shm", 4, 1920 * 1080)
    for bad, words in [({"kind": "iceoryx"}, "kind 'iceoryx' unknown"), ({"slots": 1}, "slots must be >= 2"),
                       ({"slots": 65}, "slots must be <= 64"), ({"ring": 3}, "unknown keys ['ring']"),
                       ({"kind": "shm", "frame_pixels": 10**9}, "exceeds pipeline.max_frame_pixels")]:
        with pytest.raises(ProfileError, match=words.replace("[", r"\[").replace("]", r"\]")):
            Profile.from_dict({**base, "transport": bad})
    small = {**base, "pipeline": {"max_frame_pixels": 10**6}}  # zmq: frame_pixels plays no part
    assert Profile.from_dict(small).transport.kind == "zmq"


# -- serve ------------------------------------------------------------------------------------------

def _profile(bundle, tmp_path, mode: str, cameras: list[dict], **extra) -> dict:
    return {"bundle": str(bundle), "mode": mode, "endpoint_dir": str(tmp_path / "ep"),
            "http": {"host": "127.0.0.1", "port": 0}, "cameras": cameras,
            "transport": {"kind": "shm", "slots": 4, "frame_pixels": 1920 * 1080},
            "pipeline": {"max_batch": 4}, **extra}


def test_serve_every_part_over_shared_memory_loses_nothing_and_leaves_no_ring(bundles, tmp_path):
    cams = [{"id": "cam0", "source": "synthetic", "size": [1080, 1920], "fps": 0, "count": 60},
            {"id": "cam1", "source": "synthetic", "size": [720, 1280], "fps": 0, "count": 60}]
    serve = Serve(_profile(bundles["memory"], tmp_path, "every_part", cams), tmp_path).started()
    rings = _rings_in_shm(serve.pid)
    assert sorted(re.fullmatch(rf"edge-inspect-{serve.pid}-[0-9a-f]{{8}}-(cam\d)", r).group(1)
                  for r in rings) == ["cam0", "cam1"], rings
    body = ""
    deadline = time.monotonic() + 120
    while serve.proc.poll() is None and time.monotonic() < deadline:
        try:
            body = serve.metrics()  # the last /metrics before the replays end serve
        except OSError:  # serve is closing its HTTP server
            break
        time.sleep(0.2)
    assert serve.proc.wait(30) == 0, serve.errors()
    for cam in ("cam0", "cam1"):
        assert metric(body, "edge_inspect_frames_received_total", camera=cam) >= 56  # before the end
        for reason in ("hwm", "stale", "malformed", "overwritten"):
            assert metric(body, "edge_inspect_frames_dropped_total", camera=cam, reason=reason) == 0
    out = serve.proc.stdout.read()
    assert "stopped after 120 frames" in out and "every camera finished its replay" in out, out
    assert _rings_in_shm(serve.pid) == []


def _generations(name: str) -> list[int]:
    shm = attach_untracked(name)
    try:
        meta = np.ndarray((2,), np.int64, shm.buf)
        table = np.ndarray((int(meta[0]), 8), np.int64, shm.buf, offset=64)
        return [int(g) for g in table[:, 0]]
    finally:
        shm.close()


class PreviewCheck(Results):
    """Results, and whether each one's preview (the fitted frame, shrunk) is whole: its third
    channel one grey level."""

    def __init__(self, endpoint: str) -> None:
        self.whole, self.torn = 0, []
        super().__init__(endpoint)

    def _run(self) -> None:
        while not self.stop.is_set():
            parts = self.rx.recv(100)
            if parts is None:
                continue
            msg = decode(parts)
            self.headers.append({"seq": msg.seq, **msg.header})
            preview = msg.planes.get("preview")
            if preview is not None:
                grey = np.unique(preview[..., 2])
                if len(grey) == 1:
                    self.whole += 1
                else:
                    self.torn.append((msg.seq, grey.tolist()[:4]))


def _camera_pid(serve_pid: int) -> int | None:
    """The camera process: serve's spawned child that is not the resource tracker."""
    for pid in descendants(serve_pid):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if b"spawn_main" in cmd:
            return pid
    return None


def test_cameras_killed_mid_write_leave_no_torn_frame_and_no_ring(bundles, tmp_path):
    """SIGKILL the camera process while it writes 1080p frames flat out (the supervisor
    restarts it) until three kills have left a slot half-written; every frame scored
    meanwhile is whole: the third channel of its preview is one grey level (the synthetic
    camera's frames differ there; a frame made of two would show two). SIGTERM then
    removes the ring. (A kill mid-write leaves no reference to the half-written slot; what
    keeps a slot rewritten under the reader from being scored is proven deterministically
    above and in test_shm_ring.py: with the generation checks removed, those tests fail and
    this one, whose frames are rarely caught mid-fit, may still pass.)"""
    cams = [{"id": "cam0", "source": "synthetic", "size": [1080, 1920], "fps": 0}]
    serve = Serve(_profile(bundles["memory"], tmp_path, "live", cams), tmp_path).started().ready()
    (ring,) = _rings_in_shm(serve.pid)
    results = PreviewCheck(f"ipc://{tmp_path / 'ep'}/results")
    kills, half_written = 0, set()  # (slot, odd generation) a kill left behind
    try:
        assert post(f"{serve.base}/preview?seconds=300")[0] == 200
        results.wait_more(5)
        while len(half_written) < 3:
            assert kills < 30, f"{kills} kills, {len(half_written)} of them mid-write"
            camera = _camera_pid(serve.pid)
            if camera is None:  # being restarted
                time.sleep(0.1)
                continue
            os.kill(camera, signal.SIGKILL)
            kills += 1
            time.sleep(0.05)
            # killed between odd and even: a slot left odd that no earlier kill left
            half_written |= {(i, g) for i, g in enumerate(_generations(ring)) if g % 2}
            results.wait_more(3, timeout=60)  # the restarted camera streams again
        body = serve.metrics()
    finally:
        code = serve.stop()
        results.close()
    assert code == 0, serve.errors()
    assert metric(body, "edge_inspect_source_restarts_total", camera="cam0") >= 3, body
    assert not results.torn, f"{len(results.torn)} torn frames scored: {results.torn[:3]}"
    assert results.whole > 10
    overwritten = metric(body, "edge_inspect_frames_dropped_total", camera="cam0", reason="overwritten")
    print(f"{kills} kills, {len(half_written)} mid-write; {results.whole} scored frames whole, 0 torn; "
          f"{overwritten:.0f} dropped as overwritten")
    assert _rings_in_shm(serve.pid) == []


def test_sigterm_and_a_runtime_killed_outright_leave_no_ring(bundles, tmp_path):
    cams = [{"id": "cam0", "source": "synthetic", "size": [480, 640], "fps": 30},
            {"id": "cam1", "source": "synthetic", "size": [480, 640], "fps": 30}]
    for folder in "abc":
        (tmp_path / folder).mkdir()
    first = Serve(_profile(bundles["memory"], tmp_path / "a", "live", cams), tmp_path, "a").started().ready()
    assert len(_rings_in_shm(first.pid)) == 2
    assert first.stop(signal.SIGTERM) == 0, first.errors()
    assert _rings_in_shm(first.pid) == []
    killed = Serve(_profile(bundles["memory"], tmp_path / "b", "live", cams), tmp_path, "b").started().ready()
    assert len(_rings_in_shm(killed.pid)) == 2
    killed.kill()  # SIGKILL: nothing of serve runs its cleanup
    leftover = SHM_DIR / "edge-inspect-4194311-0badc0de-cam0"  # a dead runtime's, nobody's lock on it
    leftover.write_bytes(b"\0" * 4096)
    second = Serve(_profile(bundles["memory"], tmp_path / "c", "live", cams), tmp_path, "c").started().ready()
    try:
        assert not leftover.exists() and _rings_in_shm(killed.pid) == []
        assert leftover.name in second.errors()  # said what it removed
    finally:
        assert second.stop() == 0
    assert _rings_in_shm(second.pid) == []


def test_onnx_runtime_threads_do_not_spin_between_frames_unless_asked(bundles):
    """Spinning threads would burn the CPU camera processes need between frames (scale_bench)."""
    bundle = load_bundle(bundles["memory"])
    entry = "session.intra_op.allow_spinning"
    assert open_engine(bundle).session.get_session_options().get_session_config_entry(entry) == "0"
    spinning = open_engine(bundle, spin=True).session.get_session_options()
    assert spinning.get_session_config_entry(entry) == "1"


def test_serve_check_says_what_the_rings_take_and_refuses_a_small_dev_shm(bundles, tmp_path, capsys,
                                                                          monkeypatch):
    import yaml

    from edge_inspect.runtime import serve as serve_module
    from edge_inspect.runtime.cli import main

    path = tmp_path / "p.yaml"
    cams = [{"id": f"cam{i}", "source": "synthetic", "size": [1080, 1920], "fps": 30} for i in range(2)]
    path.write_text(yaml.safe_dump(_profile(bundles["memory"], tmp_path, "live", cams)))
    assert main(["serve", "--config", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "transport shm: 2 ring(s) of 4 slots x 5.9 MiB = 47 MiB of shared memory" in out, out
    monkeypatch.setattr(serve_module, "shm_free_bytes", lambda: 40 * 2**20)  # Docker's 64 MiB, part used
    assert main(["serve", "--config", str(path), "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "need 47 MiB" in err and "--shm-size" in err, err


def test_a_ring_that_does_not_fit_in_shared_memory_is_one_clear_error(monkeypatch):
    """Reserved in full at start: a full /dev/shm is refused then, never a SIGBUS mid-frame."""
    import errno

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(ValueError, match=r"cannot reserve 1 MiB in /dev/shm .*No space left.*--shm-size"):
        RingSet.create(["cam0"], 2, 2**19)
    assert not (SHM_DIR / f"edge-inspect-{os.getpid()}-cam0").exists()  # nothing left behind
