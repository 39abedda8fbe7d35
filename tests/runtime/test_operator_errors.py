"""What an operator sees when something is wrong (issue 12): one line naming the problem and
the fix, never a traceback; things skipped are logged once and counted."""

import logging
import os
import socket
import threading

import cv2
import numpy as np
import pytest
import yaml

from edge_inspect.runtime.capture import CaptureStore
from edge_inspect.runtime.cli import main
from edge_inspect.runtime.sources import FolderSource


def _serve(tmp_path, bundles, capsys, **profile):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"bundle": str(bundles["memory"]), "endpoint_dir": str(tmp_path / "ep"),
                                    "cameras": [{"id": "a", "source": "synthetic", "size": [250, 250],
                                                 "fps": 5, "count": 3}],
                                    "http": {"port": 0}, **profile}))
    rc = main(["serve", "--config", str(path)])
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.mark.parametrize("profile, message", [
    ({"backend": "tvm"}, "backend 'tvm' unknown; choose one of ['ort', 'tensorrt']"),
    ({"backend_options": {"providers": ["cuda"]}}, "ONNX Runtime here lacks ['cuda']"),
    ({"backend_options": {"provider": "cpu"}}, "backend 'ort' has no options ['provider']; its options"),
    ({"backend_options": {"threads": "x"}}, "threads must be a whole number >= 0"),
    ({"backend_options": {"spin": "yes"}}, "spin must be true or false, got 'yes'"),
    ({"transport": {"kind": "iceoryx"}}, "transport.kind 'iceoryx' unknown; choose one of ['zmq', 'shm']"),
])
def test_backend_mistakes_are_one_line(tmp_path, bundles, capsys, profile, message):
    rc, err = _serve(tmp_path, bundles, capsys, **profile)
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err


def test_a_port_in_use_is_one_line(tmp_path, bundles, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, err = _serve(tmp_path, bundles, capsys, http={"port": port})
    assert rc == 2 and len(err.splitlines()) == 1
    assert f"cannot serve /metrics on 127.0.0.1:{port}" in err and "choose another http.port" in err
    rc, _ = _serve(tmp_path, bundles, capsys)  # the lock and sockets of the failed start are gone
    assert rc == 0


@pytest.mark.parametrize("endpoint, rc, message", [
    ("foo", 2, "must start with ipc:// or tcp://"),
    ("tcp://nohost", 2, "cannot connect to --endpoint 'tcp://nohost'"),
    ("ipc:///nonexistent/results", 1, "nothing listens on ipc:///nonexistent/results"),
])
def test_a_wrong_watch_endpoint_is_one_line(endpoint, rc, message, capsys):
    assert main(["watch", "--endpoint", endpoint, "--duration", "0.3", "--plain"]) == rc
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_a_corrupt_replay_image_is_logged_once_and_counted_every_time(tmp_path, caplog):
    for i in range(2):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((16, 16, 3), 100 + i, np.uint8))
    (tmp_path / "2.png").write_bytes(b"not a png")
    events = []
    source = FolderSource(tmp_path, fps=None, loop=True)
    source.on_event = events.append
    with caplog.at_level(logging.WARNING):
        frames = [f for f, _ in zip(source, range(20), strict=False)]  # 10 passes over the folder
    assert len(frames) == 20
    assert events == ["unreadable_image"] * 10
    assert sum("2.png" in r.getMessage() for r in caplog.records) == 1


def test_skipped_captures_are_counted(tmp_path, caplog):
    skipped = []
    store = CaptureStore(tmp_path, retain=5, queue_size=1, on_skip=skipped.append)
    gate = threading.Event()
    real_save = store.save
    store.save = lambda *a: (gate.wait(10), real_save(*a))  # a disk that hangs
    frame, heat = np.zeros((8, 8, 3), np.uint8), np.zeros((4, 4), np.float16)
    with caplog.at_level(logging.WARNING):
        taken = [store.submit("cam0", seq, frame, heat, {}) for seq in range(10)]
    gate.set()
    store.flush()
    assert store.skipped == taken.count(None) == len(skipped) >= 8 and set(skipped) == {"cam0"}
    assert sum("skipped" in r.getMessage() for r in caplog.records) == 1  # logged once, counted always


def test_a_frames_port_in_use_is_one_line(tmp_path, bundles, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, err = _serve(tmp_path, bundles, capsys, mode="every_part", frames=f"tcp://127.0.0.1:{port}")
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "cannot open the frames or results endpoint" in err and "Address already in use" in err


@pytest.mark.skipif(os.getuid() != 0, reason="giving a folder to another user needs root")
def test_the_endpoint_dir_must_be_ours(tmp_path, bundles, capsys):
    (tmp_path / "ep").mkdir()
    os.chown(tmp_path / "ep", 65534, 65534)  # another user's folder
    rc, err = _serve(tmp_path, bundles, capsys)
    assert rc == 2 and "belongs to another user (uid 65534)" in err, err


def test_a_planted_lock_symlink_is_not_followed(tmp_path):
    from edge_inspect.runtime.locks import FolderLock

    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (tmp_path / "planted").mkdir()
    (tmp_path / "planted" / ".edge-inspect.lock").symlink_to(target)
    with pytest.raises(ValueError, match="is it a symlink"):
        FolderLock(tmp_path / "planted", "endpoint_dir")
    assert target.read_text() == "keep me"
