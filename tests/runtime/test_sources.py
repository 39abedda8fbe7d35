"""Sources: folder replay pacing and loop, synthetic frames, video files, reconnect backoff."""

import threading
import time

import cv2
import numpy as np
import pytest

from runtime.sources import CaptureSource, FolderSource, SyntheticSource


def _images(folder, n=5):
    folder.mkdir()
    for i in range(n):
        cv2.imwrite(str(folder / f"{i}.png"), np.full((16, 24, 3), 40 * i, np.uint8))
    return folder


def test_folder_replay_paces_loops_and_stops(tmp_path):
    folder = _images(tmp_path / "imgs")
    t0 = time.monotonic()
    frames = list(FolderSource(folder, fps=50))
    assert len(frames) == 5 and frames[0][0].shape == (16, 24, 3)
    assert time.monotonic() - t0 >= 4 / 50 * 0.9  # paced, not a burst
    stamps = [t for _, t in frames]
    assert stamps == sorted(stamps)
    stop = threading.Event()
    looped = []
    for frame, _ in FolderSource(folder, fps=None, loop=True, stop=stop):
        looped.append(int(frame[0, 0, 0]))
        if len(looped) == 12:
            stop.set()
    assert looped[:6] == [0, 40, 80, 120, 160, 0]
    with pytest.raises(FileNotFoundError):
        FolderSource(tmp_path / "missing")


def test_synthetic_frames():
    frames = list(SyntheticSource((20, 30), fps=None, count=3))
    assert len(frames) == 3 and frames[0][0].shape == (20, 30, 3) and frames[0][0].dtype == np.uint8
    assert not np.array_equal(frames[0][0], frames[1][0])


def test_video_file_and_loop(tmp_path):
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 24))
    for i in range(6):
        writer.write(np.full((24, 32, 3), 30 * i, np.uint8))
    writer.release()
    frames = list(CaptureSource(str(path)))
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
