"""How long a result takes to reach the monitor page in a real browser.

A runtime (two synthetic cameras, live, on the demo's bundle), ``edge-inspect monitor`` and
headless Chromium (driven as in ``tests/runtime/test_monitor.py``) run together; the page's
``render`` is wrapped to log when each snapshot was drawn, and a subscriber here logs when
each result left the pipeline. Latency of a result = the first render that shows its seq (or
a later one) minus its arrival here; both clocks are this machine's wall clock. The page
refreshes twice a second (``/events``), so about 250 ms is the expected median.

    edge-inspect demo                       # makes bundles/textile-demo
    .venv/bin/python benchmarks/monitor_latency.py [--bundle bundles/textile-demo] [--seconds 20]

Writes benchmarks/results/monitor_latency.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results"

WRAP = """(() => { window.renderLog = []; const draw = render;
  render = (s) => { window.renderLog.push([Date.now(), s.cameras.map(c => [c.camera, c.seq])]); draw(s); };
  return true; })()"""


def main() -> int:
    from edge_inspect.runtime.monitor import Monitor
    from edge_inspect.runtime.orchestrator import Runtime
    from edge_inspect.runtime.profile import Profile
    from edge_inspect.runtime.transport.sockets import Receiver, TransportConfig
    from edge_inspect.runtime.transport.wire import decode
    from tests.runtime.test_monitor import CHROMIUM, Chromium

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=ROOT / "bundles" / "textile-demo")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--fps", type=float, default=10.0)
    args = ap.parse_args()
    if CHROMIUM is None:
        raise SystemExit("chromium is not installed (apt-get install chromium; bash .ci/setup does it)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rt = Runtime(Profile.from_dict(dict(
            bundle=str(args.bundle), mode="live", endpoint_dir=str(tmp / "ep"), http={"port": 0},
            cameras=[{"id": f"cam{i}", "source": "synthetic", "size": [250, 250], "fps": args.fps}
                     for i in range(2)]))).start()
        monitor = Monitor(rt.cfg.results_endpoint, f"http://127.0.0.1:{rt.health.port}", port=0).start()
        rx = Receiver(TransportConfig(rt.cfg.results_endpoint, mode="live", hwm=100000))
        arrivals: dict[tuple[str, int], float] = {}
        stop = threading.Event()

        def listen() -> None:
            while not stop.is_set():
                parts = rx.recv(100)
                if parts is not None:
                    msg = decode(parts)
                    arrivals[(msg.camera, msg.seq)] = time.time() * 1000

        threading.Thread(target=listen, daemon=True).start()
        browser = Chromium(f"http://127.0.0.1:{monitor.port}/", tmp / "chromium")
        try:
            deadline = time.monotonic() + 30
            while not browser.evaluate("typeof render === 'function' && window.monitorState !== null"):
                assert time.monotonic() < deadline, "the page never rendered"
                time.sleep(0.2)
            browser.evaluate(WRAP)
            t_start = time.time() * 1000
            time.sleep(args.seconds)
            log = browser.evaluate("window.renderLog")
        finally:
            stop.set()
            browser.close()
            monitor.close()
            rt.shutdown()
            rx.close()
    latencies = []
    for (camera, seq), t_pub in arrivals.items():
        if t_pub < t_start + 1000:
            continue  # the wrapper was not yet in place
        shown = [t for t, cams in log if dict(cams).get(camera, -1) >= seq]
        if shown and min(shown) >= t_pub - 5:
            latencies.append(min(shown) - t_pub)
    lat = np.array(latencies)
    report = {"machine": platform.platform(), "cameras": 2, "fps_per_camera": args.fps,
              "results_measured": int(lat.size), "renders": len(log),
              "latency_ms_p50": float(np.percentile(lat, 50)),
              "latency_ms_p95": float(np.percentile(lat, 95)), "latency_ms_max": float(lat.max())}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "monitor_latency.json").write_text(json.dumps(report, indent=2))
    md = (f"# Monitor page update latency (`benchmarks/monitor_latency.py`)\n\n"
          f"Machine: {report['machine']}; headless Chromium, 2 live synthetic cameras at {args.fps:g} fps, "
          f"{args.seconds:g} s, the page refreshing twice a second.\n\n"
          f"| results measured | renders | p50 | p95 | max |\n|---|---|---|---|---|\n"
          f"| {report['results_measured']} | {report['renders']} | {report['latency_ms_p50']:.0f} ms | "
          f"{report['latency_ms_p95']:.0f} ms | {report['latency_ms_max']:.0f} ms |\n")
    (OUT / "monitor_latency.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
