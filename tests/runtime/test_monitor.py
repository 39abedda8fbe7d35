"""`edge-inspect monitor` in a real headless Chromium (Debian's ``chromium``, driven over its
DevTools protocol): the page against a running `serve` with two cameras shows both tiles
updating, the verdict of an anomalous frame, and is saved as a screenshot. Also: previews
only while a monitor holds a lease, and a token when bound beyond loopback."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_inspect.runtime.monitor import Monitor, read_runtime_metrics
from tests.runtime.serve_proc import RUNNING, Serve
from tests.runtime.test_no_torch import BLOCK_TORCH, LAYERS, REPO

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Chromium:
    """Headless Chromium with its DevTools protocol on a websocket (one page)."""

    def __init__(self, url: str, profile_dir: Path) -> None:
        import websocket

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--remote-debugging-port=0", f"--user-data-dir={profile_dir}", "--window-size=1200,1000",
             url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile_dir / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            assert time.monotonic() < deadline and self.proc.poll() is None, "chromium did not start"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = []
        while not pages:
            assert time.monotonic() < deadline, "no page target"
            pages = [t for t in json.loads(_get(f"http://127.0.0.1:{port}/json/list")[1])
                     if t["type"] == "page"]
            time.sleep(0.1)
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=30,
                                              suppress_origin=True)
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self.next_id:
                assert "error" not in reply, reply
                return reply["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"]
        return result.get("value")

    def close(self) -> None:
        self.ws.close()
        self.proc.kill()
        self.proc.wait(10)


def _start_monitor(endpoint: str, control: str, tmp_path: Path) -> tuple[subprocess.Popen, str]:
    code = BLOCK_TORCH + "from edge_inspect.runtime.cli import main\nraise SystemExit(main(sys.argv[3:]))\n"
    proc = subprocess.Popen([sys.executable, "-c", code, *LAYERS, "monitor", "--endpoint", endpoint,
                             "--control", control, "--port", "0"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=open(tmp_path / "monitor.stderr", "w"), text=True)
    line = proc.stdout.readline()
    m = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
    assert m, (line, (tmp_path / "monitor.stderr").read_text())
    return proc, m.group(1)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (bash .ci/setup installs it)")
def test_the_page_in_a_real_browser_shows_two_cameras_live(bundles, tmp_path):
    pytest.importorskip("websocket", reason="websocket-client not installed (the test extra has it)")
    from edge_inspect.trainer.data import TextileImages

    folder = tmp_path / "replay"
    folder.mkdir()
    ds = TextileImages(["nominal"])
    for i in range(8):
        cv2.imwrite(str(folder / f"nominal-{i}.png"), ds[i].image[..., ::-1])
    profile = {"bundle": str(bundles["memory"]), "mode": "live", "endpoint_dir": str(tmp_path / "ep"),
               "model_name": "textile", "http": {"host": "127.0.0.1", "port": 0},
               "captures": {"folder": str(tmp_path / "captures"), "retain": 20},
               "cameras": [{"id": "line1", "source": "folder", "path": str(folder), "fps": 4, "loop": True},
                           # random frames are not textile: every one is flagged
                           {"id": "noise", "source": "synthetic", "size": [250, 250], "fps": 4}]}
    serve = Serve(profile, tmp_path).started().ready()
    monitor, url = _start_monitor(f"ipc://{tmp_path / 'ep'}/results", serve.base, tmp_path)
    browser = None
    try:
        browser = Chromium(url + "/", tmp_path / "chromium-profile")
        seen: dict[str, list[int]] = {"line1": [], "noise": []}
        deadline = time.monotonic() + 60
        while not all(len(set(v)) >= 3 for v in seen.values()):  # each tile updated 3 times
            assert time.monotonic() < deadline, seen
            for cam in seen:
                seq = browser.evaluate(f"document.getElementById('tile-{cam}')?.dataset.seq")
                if seq is not None:
                    seen[cam].append(int(seq))
            time.sleep(0.3)
        assert browser.evaluate("document.querySelector('#tile-noise .verdict').textContent") == "ANOMALOUS"
        assert browser.evaluate("document.querySelector('#tile-noise').className") == "tile anomalous"
        facts = browser.evaluate("document.querySelector('#tile-line1 .facts').textContent")
        assert re.search(r"score [\d.]+ / threshold [\d.]+ \| [\d.]+ fps \| latency \d+ ms", facts), facts
        # hwm/stale drops are legitimate when chromium and serve share two busy cores; nothing is malformed
        assert re.search(r"drops: hwm \d+, stale \d+, malformed 0, overwritten 0 \|", facts), facts
        deadline = time.monotonic() + 20  # the frames themselves reached the page (a preview lease)
        while browser.evaluate("document.querySelector('#tile-line1 img').naturalWidth") in (None, 0):
            assert time.monotonic() < deadline, "no frame image loaded"
            time.sleep(0.3)
        assert browser.evaluate("document.querySelectorAll('#anomalies figure').length") > 0
        capture = browser.evaluate("document.querySelector('#anomalies .capture').textContent")
        assert re.fullmatch(r"captures/noise/\d{8}T\d{6}\.\d{6}Z-noise-\d{8}", capture), capture
        shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
        (tmp_path / "monitor.png").write_bytes(shot)
        if os.environ.get("EDGE_INSPECT_SCREENSHOT"):  # README's picture (docs/monitor.jpg is it,
            Path(os.environ["EDGE_INSPECT_SCREENSHOT"]).write_bytes(shot)  # shrunk to a JPEG)
        picture = cv2.imdecode(np.frombuffer(shot, np.uint8), cv2.IMREAD_COLOR)
        assert picture is not None and picture.shape[1] >= 1000
        print(f"screenshot: {tmp_path / 'monitor.png'}; tiles updated {seen}")
    finally:
        if browser is not None:
            browser.close()
        monitor.terminate()
        monitor.wait(10)
        serve.stop()
        RUNNING.clear()


def test_results_carry_a_preview_only_while_a_monitor_holds_a_lease(bundles, tmp_path):
    from edge_inspect.runtime.orchestrator import Runtime
    from edge_inspect.runtime.profile import Profile
    from edge_inspect.runtime.transport.sockets import Receiver, TransportConfig
    from edge_inspect.runtime.transport.wire import decode

    rt = Runtime(Profile.from_dict(dict(
        bundle=str(bundles["memory"]), mode="live", endpoint_dir=str(tmp_path / "ep"), http={"port": None},
        cameras=[{"id": "cam0", "source": "synthetic", "size": [250, 250], "fps": 20}]))).start()
    rx = Receiver(TransportConfig(rt.cfg.results_endpoint, mode="live"))

    def planes(n: int) -> list[list[str]]:
        got = []
        while len(got) < n:
            parts = rx.recv(5000)
            assert parts is not None
            got.append(decode(parts).plane_names)
        return got

    try:
        assert all(p == ["heatmap"] for p in planes(5))
        assert rt._preview_command({"seconds": "30"})[0] == 200
        later = planes(10)[5:]  # past the frames already in flight
        assert all(p == ["heatmap", "preview"] for p in later)
        assert rt._preview_command({"seconds": "0"})[0] == 200  # never shortens a lease held
        assert all(p == ["heatmap", "preview"] for p in planes(5))
        rt.pipeline.preview_until = time.monotonic() + 0.2  # a lease that runs out
        time.sleep(0.3)
        assert planes(10)[5:] == [["heatmap"]] * 5
        assert rt._preview_command({"seconds": "9999"})[0] == 400
    finally:
        rx.close()
        rt.shutdown()


def test_a_monitor_beyond_loopback_needs_a_token(tmp_path):
    with pytest.raises(ValueError, match="give --token"):
        Monitor(f"ipc://{tmp_path}/r", None, host="0.0.0.0", port=0)
    monitor = Monitor(f"ipc://{tmp_path}/r", None, host="127.0.0.1", port=0, token="s3cret").start()
    try:
        base = f"http://127.0.0.1:{monitor.port}"
        assert _get(base + "/")[0] == 401 and _get(base + "/state?token=wrong")[0] == 401
        code, body = _get(base + "/?token=s3cret")
        assert code == 200 and b"EventSource" in body
        assert json.loads(_get(base + "/state?token=s3cret")[1])["cameras"] == []
    finally:
        monitor.close()


def test_drops_and_camera_state_are_read_from_the_runtime_metrics():
    text = ('edge_inspect_frames_dropped_total{camera="a",reason="stale"} 3.0\n'
            'edge_inspect_frames_dropped_total{camera="a",reason="hwm"} 0.0\n'
            'edge_inspect_camera_up{camera="a"} 0.0\nedge_inspect_camera_up{camera="b"} 1.0\n')
    drops, up = read_runtime_metrics(text)
    assert drops == {"a": {"stale": 3.0, "hwm": 0.0}} and up == {"a": 0.0, "b": 1.0}


def test_a_silent_or_reported_down_camera_shows_as_down(monkeypatch):
    from edge_inspect.runtime import monitor as mon
    from edge_inspect.runtime.transport.wire import decode, encode

    state = mon.MonitorState()
    heat = np.zeros((4, 4), np.float16)
    for cam in ("a", "b"):
        state.add(decode(encode("result", cam, 1, time.monotonic_ns(), [heat], score=0.2, label=0,
                                threshold=1.0, model="m", bundle="x@1")))
    state.up = {"a": 1.0, "b": 0.0}  # the runtime's camera_up
    cams = {c["camera"]: c for c in state.snapshot()["cameras"]}
    assert not cams["a"]["down"] and cams["b"]["down"]
    later = time.monotonic() + mon.DOWN_AFTER_S + 1
    monkeypatch.setattr(mon.time, "monotonic", lambda: later)
    assert all(c["down"] for c in state.snapshot()["cameras"])  # no result for too long
    state.up["c"] = 0.0  # configured, down from the start: a tile without any result
    cams = {c["camera"]: c for c in state.snapshot()["cameras"]}
    assert cams["c"]["down"] and cams["c"]["seq"] == -1
