"""Integration with real processes on ipc: sources are spawned processes, the pipeline and
the checks run here; every loop is bounded in time."""

import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest

from edge_inspect.runtime.orchestrator import Runtime
from edge_inspect.runtime.profile import Profile
from edge_inspect.runtime.transport.sockets import Receiver, Sender, TransportConfig
from edge_inspect.runtime.transport.wire import decode, encode


def _value(rt, name, **labels):
    return rt.metrics.registry.get_sample_value(name, labels) or 0.0


def _wait(cond, timeout=20.0, step=0.05):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(step)


def _runtime(bundle, tmp_path, mode, cameras, **pipeline):
    cfg = Profile.from_dict(dict(bundle=str(bundle), mode=mode, endpoint_dir=str(tmp_path / "ep"),
                                 cameras=cameras, http={"port": None}, model_name="m",
                                 pipeline={"max_batch": 4, "camera_timeout_s": 1.0, **pipeline}))
    return Runtime(cfg).start()


def _push_frames(endpoint, n, mode):
    sender = Sender(TransportConfig(endpoint, mode=mode, send_timeout_ms=10000))
    frame = np.zeros((32, 32, 3), np.uint8)
    for seq in range(n):
        sender.send(encode("frame", "cam0", seq, time.monotonic_ns(), [frame]))
    if mode == "every_part":
        time.sleep(0.5)
    sender.close()


def _garbage(endpoint):
    sender = Sender(TransportConfig(endpoint, mode="every_part"))
    rng = np.random.default_rng(1)
    good = encode("frame", "cam9", 0, time.monotonic_ns(), [np.zeros((250, 250, 3), np.uint8)])
    for parts in ([rng.bytes(50)],                                   # random bytes
                  [good[0], good[1].replace(b'"v":1', b'"v":7'), good[2]],  # wrong schema version
                  [good[0], good[1], bytes(memoryview(good[2]))[:100]],    # truncated payload
                  [good[0], good[1].replace(b"250,250", b"250,251"), good[2]],  # wrong shape
                  [good[0], good[1].replace(b"uint8", b"bool8"), good[2]]):  # unknown dtype
        sender.send(parts)
    sender.send(good)  # and then a valid frame, from a camera the profile does not list
    time.sleep(0.5)
    sender.close()


def test_every_part_slow_consumer_loses_nothing(tmp_path):
    endpoint = f"ipc://{tmp_path}/ep"
    rx = Receiver(TransportConfig(endpoint, mode="every_part", hwm=2))
    proc = mp.get_context("spawn").Process(target=_push_frames, args=(endpoint, 80, "every_part"))
    proc.start()
    seqs = []
    while len(seqs) < 80:
        parts = rx.recv(5000)
        assert parts is not None, f"stalled after {len(seqs)}"
        seqs.append(decode(parts).seq)
        time.sleep(0.003)  # slow consumer
    proc.join(10)
    rx.close()
    assert seqs == list(range(80))  # no seq gaps


def test_live_mode_drops_oldest_and_counts(bundles, tmp_path):
    rt = _runtime(bundles["memory"], tmp_path, "live",
                  [{"id": "cam0", "source": "synthetic", "size": [250, 250], "fps": 400, "count": 400}])
    try:
        _wait(rt.sources_done)
        time.sleep(0.5)
        seen_last = rt.pipeline.last_seq["cam0"]
        inferred = _value(rt, "edge_inspect_frames_inferred_total", camera="cam0", model="m")
        dropped = sum(_value(rt, "edge_inspect_frames_dropped_total", camera="cam0", reason=r)
                      for r in ("stale", "hwm"))
        assert dropped > 0 and inferred < 400
        assert inferred + dropped == seen_last + 1  # every frame up to the last seen: scored or counted
    finally:
        rt.shutdown()


def test_malformed_messages_are_counted_and_serving_goes_on(bundles, tmp_path):
    rt = _runtime(bundles["memory"], tmp_path, "every_part",
                  [{"id": "cam0", "source": "synthetic", "size": [250, 250], "fps": 20}])
    try:
        proc = mp.get_context("spawn").Process(target=_garbage, args=(rt.cfg.frames_endpoint("cam0"),))
        proc.start()
        proc.join(10)
        _wait(lambda: _value(rt, "edge_inspect_frames_dropped_total", camera="unknown",
                             reason="unknown_camera") == 1)
        assert _value(rt, "edge_inspect_frames_dropped_total", camera="unknown", reason="malformed") == 5
        assert _value(rt, "edge_inspect_frames_received_total", camera="cam9") == 0  # no series for it
        before = _value(rt, "edge_inspect_frames_inferred_total", camera="cam0", model="m")
        _wait(lambda: _value(rt, "edge_inspect_frames_inferred_total", camera="cam0", model="m") > before + 5)
    finally:
        rt.shutdown()


@pytest.mark.parametrize("mode", ["live", "every_part"])
def test_killed_source_goes_down_and_is_restarted(bundles, tmp_path, mode):
    cam = {"id": "cam0", "source": "synthetic", "size": [250, 250], "fps": 20}
    rt = _runtime(bundles["memory"], tmp_path, mode, [cam])
    up = lambda: _value(rt, "edge_inspect_camera_up", camera="cam0")  # noqa: E731
    inferred = lambda: _value(rt, "edge_inspect_frames_inferred_total", camera="cam0", model="m")  # noqa: E731
    rt.supervisor.backoff_s = 2.0  # the restart comes well after camera_timeout_s (1 s)
    try:
        _wait(lambda: up() == 1 and inferred() > 3)
        killed = rt.processes["cam0"]
        os.kill(killed.pid, signal.SIGKILL)
        killed.join(5)
        assert rt.sources_ended() == (False, None)  # a crash is a restart to come, not the end of serve
        _wait(lambda: up() == 0, timeout=5)
        assert not rt.pipeline.ready()["camera_cam0_fresh"] and not rt.sources_done()
        before = inferred()
        # the supervisor restarts the crashed camera process by itself
        _wait(lambda: up() == 1 and inferred() > before + 3)
        assert rt.processes["cam0"] is not killed and rt.pipeline.ready()["camera_cam0_fresh"]
        assert _value(rt, "edge_inspect_source_restarts_total", camera="cam0") == 1
    finally:
        rt.shutdown()


def test_several_cameras_at_once(bundles, tmp_path):
    # more cameras than max_batch: every camera's newest frame is still scored
    rt = _runtime(bundles["memory"], tmp_path, "live",
                  [{"id": f"cam{i}", "source": "synthetic", "size": [250, 250], "fps": 15} for i in range(3)],
                  max_batch=2)
    try:
        _wait(lambda: all(_value(rt, "edge_inspect_frames_inferred_total", camera=f"cam{i}", model="m") > 3
                          for i in range(3)))
    finally:
        rt.shutdown()
