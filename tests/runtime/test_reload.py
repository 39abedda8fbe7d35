"""Hot model reload in a real `serve` process (torch blocked): 10 reloads during a stream at
full rate, alternating two bundles, every third one broken; no frame lost to a swap, every
result labelled with the bundle that scored it, failures counted while the old one serves.
Also SIGHUP and a changed profile ``bundle`` reload."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest
import yaml

from edge_inspect.runtime.bundle import load_bundle
from edge_inspect.runtime.model_slot import bundle_id
from edge_inspect.runtime.transport.sockets import Receiver, TransportConfig
from edge_inspect.runtime.transport.wire import decode
from tests.runtime.serve_proc import Serve, metric


def post(url: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def three_bundles(bundles, tmp_path_factory):
    """A (the memory bundle), B (a copy under another folder and name: another bundle id),
    and a broken copy (its model.onnx truncated: the checksum check refuses it)."""
    base = tmp_path_factory.mktemp("reload-bundles")
    a, b, broken = base / "line-a", base / "line-b", base / "line-broken"
    for target in (a, b, broken):
        shutil.copytree(bundles["memory"], target)
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["name"] = "line-b"
    (b / "manifest.json").write_text(json.dumps(manifest, indent=2))
    model = broken / "model.onnx"
    model.write_bytes(model.read_bytes()[:1000])
    return a, b, broken


class Results:
    """Every result header the runtime publishes, in arrival order (a background reader)."""

    def __init__(self, endpoint: str) -> None:
        self.rx = Receiver(TransportConfig(endpoint, mode="live", hwm=100000))
        self.headers: list[dict] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            parts = self.rx.recv(100)
            if parts is not None:
                msg = decode(parts)
                self.headers.append({"seq": msg.seq, **msg.header})

    def wait_more(self, n: int, timeout: float = 30) -> None:
        start, deadline = len(self.headers), time.monotonic() + timeout
        while len(self.headers) < start + n:
            assert time.monotonic() < deadline, f"no results: {len(self.headers)}"
            time.sleep(0.02)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.rx.close()


def _profile(bundle, tmp_path, mode: str) -> dict:
    """every_part: the camera as fast as the pipeline takes frames (it waits on a full queue);
    live: a 25 fps camera, which this CPU keeps up with, so a swap's losses would show."""
    fps = 1000 if mode == "every_part" else 25
    return {"bundle": str(bundle), "mode": mode, "endpoint_dir": str(tmp_path / "ep"),
            "model_name": "line", "http": {"host": "127.0.0.1", "port": 0},
            "cameras": [{"id": "cam0", "source": "synthetic", "size": [250, 250], "fps": fps}],
            "pipeline": {"max_batch": 4}}


@pytest.mark.parametrize("mode", ["every_part", "live"])
def test_ten_reloads_during_a_full_rate_stream(three_bundles, tmp_path, mode):
    a, b, broken = three_bundles
    ids = {a: bundle_id(load_bundle(a)), b: bundle_id(load_bundle(b))}
    serve = Serve(_profile(a, tmp_path, mode), tmp_path).started().ready()
    results = Results(f"ipc://{tmp_path / 'ep'}/results")
    try:
        results.wait_more(10)
        targets = [b, a, broken, b, a, broken, b, a, broken, b]
        expected = [ids[a]]
        for target in targets:
            code, answer = post(f"{serve.base}/model/reload?bundle={target}")
            if target is broken:
                assert code == 409 and "failed" in answer["error"] and answer["serving"] == expected[-1]
            else:
                assert code == 200 and answer["serving"] == ids[target], answer
                expected.append(ids[target])
            results.wait_more(8)  # frames flow between reloads
        body = serve.metrics()
    finally:
        serve.stop()
        results.close()
    assert metric(body, "edge_inspect_model_reloads_total", outcome="ok") == 7
    assert metric(body, "edge_inspect_model_reloads_total", outcome="failed") == 3
    info = [line for line in body.splitlines() if line.startswith("edge_inspect_model_info{")]
    assert len(info) == 1 and f'bundle="{ids[b]}"' in info[0]  # the bundle actually serving
    headers = sorted(results.headers, key=lambda h: h["seq"])
    runs = [h["bundle"] for i, h in enumerate(headers) if i == 0 or h["bundle"] != headers[i - 1]["bundle"]]
    assert runs == expected, runs  # every result labelled with the bundle that scored it
    seqs = [h["seq"] for h in headers]
    hwm = metric(body, "edge_inspect_frames_dropped_total", camera="cam0", reason="hwm")
    stale = metric(body, "edge_inspect_frames_dropped_total", camera="cam0", reason="stale")
    if mode == "every_part":  # nothing lost: consecutive seqs from the first to the last
        assert seqs == list(range(seqs[0], seqs[-1] + 1)) and hwm == 0 and stale == 0
    else:  # live: frames may go stale, as always, but none vanish unseen (no seq gaps)
        assert hwm == 0 and len(headers) + stale >= seqs[-1] - seqs[0] + 1 - 4
    print(f"{mode}: {len(headers)} results over 10 reloads (7 swaps, 3 refused), {stale:.0f} stale")


def test_sighup_and_a_changed_profile_reload(three_bundles, tmp_path):
    a, b, _ = three_bundles
    ids = {a: bundle_id(load_bundle(a)), b: bundle_id(load_bundle(b))}
    profile = _profile(a, tmp_path, "live")
    serve = Serve(profile, tmp_path).started().ready()
    try:
        def serving() -> str:
            lines = [ln for ln in serve.metrics().splitlines() if ln.startswith("edge_inspect_model_info{")]
            return lines[0] if len(lines) == 1 else ""

        def wait_for(text: str, ok: float) -> None:
            deadline = time.monotonic() + 30
            while not (text in serving() and metric(serve.metrics(), "edge_inspect_model_reloads_total",
                                                    outcome="ok") == ok):
                assert time.monotonic() < deadline, serving()
                time.sleep(0.1)

        serve.proc.send_signal(signal.SIGHUP)  # the same bundle again
        wait_for(ids[a], 1)
        time.sleep(0.05)  # a new modification time
        serve.path.write_text(yaml.safe_dump({**profile, "bundle": str(b)}))
        wait_for(ids[b], 2)
        serve.path.write_text("bundle: [unclosed")  # a broken profile: logged, B keeps serving
        time.sleep(1.5)
        assert ids[b] in serving() and serve.proc.poll() is None
    finally:
        serve.stop()
    assert "does not load" in serve.errors()
