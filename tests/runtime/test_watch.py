"""`edge-inspect watch` renders per-camera rows from real result messages."""

import threading
import time

import numpy as np

from edge_inspect.runtime.cli import main
from edge_inspect.runtime.transport.sockets import Sender, TransportConfig
from edge_inspect.runtime.transport.wire import encode


def test_watch_shows_cameras(tmp_path, capsys):
    endpoint = f"ipc://{tmp_path}/results"
    tx = Sender(TransportConfig(endpoint, mode="live", hwm=1000))
    stop = threading.Event()

    def publish():
        seq = 0
        while not stop.is_set():
            for cam, score in (("line1", 0.2), ("line2", 3.0)):
                tx.send(encode("result", cam, seq, time.monotonic_ns(), [np.zeros((4, 4), np.float16)],
                               score=score, label=int(score > 1), threshold=1.0))
            tx.send([b"result.line1", b"garbage"])
            seq += 1
            time.sleep(0.02)

    t = threading.Thread(target=publish)
    t.start()
    try:
        assert main(["watch", "--endpoint", endpoint, "--duration", "1.5", "--plain",
                     "--interval", "0.5"]) == 0
    finally:
        stop.set()
        t.join()
        tx.close()
    final = capsys.readouterr().out.strip().split("\n\n")[-1]
    rows = {line.split()[0]: line.split() for line in final.splitlines()[1:] if line.startswith("line")}
    assert set(rows) == {"line1", "line2"}
    assert rows["line1"][4] == "ok" and rows["line2"][4] == "ANOMALY"
    assert int(rows["line2"][5]) == int(rows["line2"][1]) > 10  # every line2 result anomalous
    assert "malformed result messages ignored" in final
