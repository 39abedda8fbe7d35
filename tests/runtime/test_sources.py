"""Sources: folder replay pacing and loop, synthetic frames, video files, reconnect backoff,
the stall watchdog on a real HTTP MJPEG stream."""

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np
import pytest

from edge_inspect.runtime.sources import CaptureSource, FolderSource, SyntheticSource


def _images(folder, n=5):
    folder.mkdir()
    for i in range(n):
        cv2.imwrite(str(folder / f"{i}.png"), np.full((16, 24, 3), 40 * i, np.uint8))
    return folder


def test_folder_replay_paces_loops_and_stops(tmp_path):
    folder = _images(tmp_path / "imgs")
    t0 = time.monotonic()
    frames = [(planes["rgb"], t) for planes, t in FolderSource(folder, fps=50)]
    assert len(frames) == 5 and frames[0][0].shape == (16, 24, 3)
    assert time.monotonic() - t0 >= 4 / 50 * 0.9  # paced, not a burst
    stamps = [t for _, t in frames]
    assert stamps == sorted(stamps)
    stop = threading.Event()
    looped = []
    for planes, _ in FolderSource(folder, fps=None, loop=True, stop=stop):
        looped.append(int(planes["rgb"][0, 0, 0]))
        if len(looped) == 12:
            stop.set()
    assert looped[:6] == [0, 40, 80, 120, 160, 0]
    with pytest.raises(FileNotFoundError):
        FolderSource(tmp_path / "missing")


def test_synthetic_frames():
    frames = [(planes["rgb"], t) for planes, t in SyntheticSource((20, 30), fps=None, count=3)]
    assert len(frames) == 3 and frames[0][0].shape == (20, 30, 3) and frames[0][0].dtype == np.uint8
    assert not np.array_equal(frames[0][0], frames[1][0])


def test_video_file_and_loop(tmp_path):
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 24))
    for i in range(6):
        writer.write(np.full((24, 32, 3), 30 * i, np.uint8))
    writer.release()
    frames = [(planes["rgb"], t) for planes, t in CaptureSource(str(path))]
    assert len(frames) == 6 and frames[0][0].shape == (24, 32, 3)
    stop = threading.Event()
    n = 0
    for _ in CaptureSource(str(path), loop=True, stop=stop):
        n += 1
        if n == 15:
            stop.set()
    assert n == 15


def test_unreachable_stream_backs_off_and_gives_up():
    src = CaptureSource("rtsp://127.0.0.1:1/none", stall_s=0.5, backoff_s=0.05, backoff_max_s=0.2,
                        max_reconnects=3)
    t0 = time.monotonic()
    assert list(src) == []
    assert src.reconnects == 3 and not src.up
    assert time.monotonic() - t0 >= 0.05 + 0.1 + 0.2 - 0.05  # waits grew: 0.05, 0.1, 0.2


def test_missing_camera_index_backs_off_and_gives_up():
    src = CaptureSource("63", backoff_s=0.02, backoff_max_s=0.05, max_reconnects=2)  # no /dev/video63
    assert src.uri == 63 and not src.is_file  # an index, not a path
    assert list(src) == [] and src.reconnects == 2


class _StallingMJPEG(BaseHTTPRequestHandler):
    """An HTTP MJPEG camera that sends 10 frames, then keeps the connection open silently."""

    connections = 0

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).connections += 1
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.end_headers()
        jpg = cv2.imencode(".jpg", np.full((48, 64, 3), 120, np.uint8))[1].tobytes()
        try:
            for _ in range(10):
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                                 % len(jpg) + jpg + b"\r\n")
                self.wfile.flush()
                time.sleep(0.01)
            time.sleep(20)  # the stall
        except OSError:
            pass

    def log_message(self, *args):
        pass


def test_stall_watchdog_reconnects_a_stream_that_goes_silent():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StallingMJPEG)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    src = CaptureSource(f"http://127.0.0.1:{server.server_address[1]}/stream.mjpg", stall_s=0.5,
                        backoff_s=0.05)
    t0, times = time.monotonic(), []
    try:
        for planes, _ in src:
            assert planes["rgb"].shape == (48, 64, 3)
            times.append(time.monotonic() - t0)
            if len(times) == 12:
                break
    finally:
        server.shutdown()
    assert src.reconnects == 1 and _StallingMJPEG.connections == 2
    gap = times[10] - times[9]  # frame 11 came over the second connection
    assert 0.4 < gap < 3.0, f"stall detected after {gap:.2f} s, expected about 0.5 s"
