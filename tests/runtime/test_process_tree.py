"""`serve` as a process tree (issue 12): nothing outlives it, SIGTERM ends it all within 2 s,
one runtime per endpoint folder, a stalled pipeline makes cameras wait rather than exit, and
the end of every camera is explained."""

import os
import signal
import time

from tests.runtime.serve_proc import Serve, alive, descendants, metric


def _profile(bundle, tmp_path, mode="live", cameras=None, **extra):
    cameras = cameras or [{"id": "cam0", "source": "synthetic", "size": [250, 250], "fps": 20},
                          {"id": "cam1", "source": "synthetic", "size": [250, 250], "fps": 20}]
    return {"bundle": str(bundle), "mode": mode, "endpoint_dir": str(tmp_path / "ep"),
            "cameras": cameras, "http": {"host": "127.0.0.1", "port": 0}, "model_name": "m", **extra}


def _gone_within(pids, seconds):
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            return [p for p in pids if alive(p)]
        time.sleep(0.05)
    return []


def test_kill_9_of_serve_leaves_no_process_behind(bundles, tmp_path):
    serve = Serve(_profile(bundles["memory"], tmp_path), tmp_path).started().ready()
    tree = descendants(serve.pid)
    assert len(tree) >= 3, tree  # two cameras and multiprocessing's resource tracker
    os.kill(serve.pid, signal.SIGKILL)
    serve.proc.wait(5)
    orphans = _gone_within(tree, 3.0)
    assert not orphans, f"outlived serve: {orphans}"  # they used to live on with parent PID 1


def test_sigterm_ends_the_whole_tree_within_two_seconds(bundles, tmp_path):
    serve = Serve(_profile(bundles["memory"], tmp_path), tmp_path).started().ready()
    tree = descendants(serve.pid)
    t0 = time.monotonic()
    serve.proc.send_signal(signal.SIGTERM)
    rc = serve.proc.wait(5)
    left = _gone_within(tree, max(0.0, 2.0 - (time.monotonic() - t0)))
    elapsed = time.monotonic() - t0
    assert rc == 0 and not left and elapsed < 2.0, (rc, left, elapsed)


def test_double_ctrl_c_exits_cleanly(bundles, tmp_path):
    serve = Serve(_profile(bundles["memory"], tmp_path), tmp_path).started().ready()
    serve.proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    serve.proc.send_signal(signal.SIGINT)
    assert serve.proc.wait(5) == 0
    assert "Traceback" not in serve.errors()


def test_a_second_serve_on_the_same_endpoint_dir_is_refused(bundles, tmp_path):
    profile = _profile(bundles["memory"], tmp_path, captures={"folder": str(tmp_path / "captures")})
    first = Serve(profile, tmp_path).started().ready()
    try:
        second = Serve(profile, tmp_path, name="second")
        assert second.proc.wait(60) == 2
        err = second.errors()
        assert f"in use by another edge-inspect serve (pid {first.pid})" in err and "Traceback" not in err
        assert first.proc.poll() is None and first.value("edge_inspect_camera_up", camera="cam0") == 1
    finally:
        assert first.stop() == 0
    assert not list((tmp_path / "captures").glob("**/.tmp-*"))  # nobody fought over captures
    again = Serve(profile, tmp_path, name="again").started().ready()
    assert again.stop() == 0  # the lock went with the first process


def test_a_stalled_every_part_pipeline_makes_cameras_wait_not_exit(bundles, tmp_path):
    cam = [{"id": "cam0", "source": "synthetic", "size": [250, 250], "fps": 50}]
    serve = Serve(_profile(bundles["memory"], tmp_path, mode="every_part", cameras=cam), tmp_path)
    serve.started().ready()
    try:
        camera_pid = descendants(serve.pid)
        os.kill(serve.pid, signal.SIGSTOP)  # the pipeline stalls for 3 s (the camera sends time out)
        time.sleep(3.0)
        os.kill(serve.pid, signal.SIGCONT)
        time.sleep(2.0)
        assert serve.proc.poll() is None  # it used to exit 0 here, silently
        assert set(camera_pid) <= set(descendants(serve.pid))  # the same camera process, not restarted
        body = serve.metrics()
        assert metric(body, "edge_inspect_source_events_total", camera="cam0", event="send_blocked") >= 1
        assert metric(body, "edge_inspect_source_restarts_total", camera="cam0") == 0
        for reason in ("hwm", "stale", "malformed"):  # every_part: nothing lost over the stall
            assert metric(body, "edge_inspect_frames_dropped_total", camera="cam0", reason=reason) == 0
    finally:
        assert serve.stop() == 0


def test_finite_replays_end_serve_with_0_and_a_camera_that_gives_up_with_1(bundles, tmp_path):
    finite = [{"id": "cam0", "source": "synthetic", "size": [250, 250], "fps": 50, "count": 20}]
    serve = Serve(_profile(bundles["memory"], tmp_path, cameras=finite), tmp_path).started()
    assert serve.proc.wait(60) == 0
    assert "every camera finished its replay" in serve.proc.stdout.read()

    gives_up = [{"id": "cam0", "source": "capture", "uri": "rtsp://127.0.0.1:9/none",
                 "max_reconnects": 0, "stall_s": 1}]
    serve = Serve(_profile(bundles["memory"], tmp_path, cameras=gives_up), tmp_path, "gives-up").started()
    assert serve.proc.wait(60) == 1
    err = serve.errors()
    assert "every camera has ended: camera cam0 gave up" in err, err


def test_every_part_replays_are_scored_to_the_last_frame_before_serve_ends(bundles, tmp_path):
    """The cameras ending is not the frames ending: what is queued is scored first."""
    burst = [{"id": "cam0", "source": "synthetic", "size": [250, 250], "fps": None, "count": 120}]
    serve = Serve(_profile(bundles["memory"], tmp_path, mode="every_part", cameras=burst), tmp_path)
    serve.started()
    assert serve.proc.wait(60) == 0
    out = serve.proc.stdout.read()
    assert "stopped after 120 frames" in out and "every camera finished its replay" in out, out
