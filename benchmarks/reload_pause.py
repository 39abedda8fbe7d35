"""How long a hot reload pauses the stream: 10 reloads (alternating two bundles) while a
live camera streams, in one process.

Per reload: the time the swap holds the model slot, the load + check + warm time on the side
thread, and the longest gap between two consecutive results from the reload's start to one
second after it, next to the median gap between results away from reloads (the frame
interval). Frames lost over the reloads (hwm drops, which a reload must not cause) and
stale ones are counted.

    edge-inspect demo                                   # makes bundles/textile-demo
    .venv/bin/python benchmarks/reload_pause.py [--bundle bundles/textile-demo] [--fps 25]

Writes benchmarks/results/reload_pause.{json,md}. The result gaps are wall-clock times on
this machine; the ratio to the frame interval is what carries over.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from edge_inspect.runtime.orchestrator import Runtime
from edge_inspect.runtime.profile import Profile
from edge_inspect.runtime.transport.sockets import Receiver, TransportConfig
from edge_inspect.runtime.transport.wire import decode

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=ROOT / "bundles" / "textile-demo")
    ap.add_argument("--fps", type=float, default=25.0)
    ap.add_argument("--reloads", type=int, default=10)
    args = ap.parse_args()
    if not (args.bundle / "manifest.json").exists():
        raise SystemExit(f"{args.bundle} is not a bundle; run `edge-inspect demo` first or pass --bundle")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        a, b = tmp / "line-a", tmp / "line-b"
        shutil.copytree(args.bundle, a)
        shutil.copytree(args.bundle, b)
        manifest = json.loads((b / "manifest.json").read_text())
        manifest["name"] = "line-b"  # another bundle id, same model
        (b / "manifest.json").write_text(json.dumps(manifest))
        rt = Runtime(Profile.from_dict(dict(
            bundle=str(a), mode="live", endpoint_dir=str(tmp / "ep"), model_name="line", http={"port": None},
            cameras=[{"id": "cam0", "source": "synthetic", "size": [250, 250], "fps": args.fps}]))).start()
        rx = Receiver(TransportConfig(rt.cfg.results_endpoint, mode="live", hwm=100000))
        arrivals: list[tuple[float, int]] = []
        stop = threading.Event()

        def listen() -> None:
            while not stop.is_set():
                parts = rx.recv(100)
                if parts is not None:
                    arrivals.append((time.perf_counter(), decode(parts).seq))

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        try:
            time.sleep(3.0)  # steady state
            windows = []
            for i in range(args.reloads):
                t0 = time.perf_counter()
                rt.reload(str(b if i % 2 == 0 else a), "benchmark")
                windows.append((t0, time.perf_counter()))
                time.sleep(2.0)
            value = rt.metrics.registry.get_sample_value
            drops = {r: value("edge_inspect_frames_dropped_total", {"camera": "cam0", "reason": r}) or 0
                     for r in ("hwm", "stale")}
        finally:
            stop.set()
            listener.join(2)
            rt.shutdown()
            rx.close()
    times = np.array([t for t, _ in arrivals])
    gaps = np.diff(times)
    near = np.zeros(len(gaps), bool)
    pauses = []
    for t0, t1 in windows:
        inside = (times[1:] >= t0) & (times[:-1] <= t1 + 1.0)
        near |= inside
        pauses.append(float(gaps[inside].max()) if inside.any() else float("nan"))
    frame_gap = float(np.median(gaps[~near]))
    warm = [t1 - t0 for t0, t1 in windows]
    swap = rt.reloader.swap_seconds
    report = {"machine": platform.platform(), "fps": args.fps, "reloads": args.reloads,
              "results": len(arrivals), "frame_gap_median_s": frame_gap,
              "pause_p50_s": float(np.median(pauses)), "pause_max_s": float(np.max(pauses)),
              "pause_p50_over_frame_gap": float(np.median(pauses)) / frame_gap,
              "pause_max_over_frame_gap": float(np.max(pauses)) / frame_gap,
              "swap_hold_p50_s": float(np.median(swap)), "swap_hold_max_s": float(np.max(swap)),
              "load_and_warm_p50_s": float(np.median(warm)), "frames_lost_hwm": drops["hwm"],
              "frames_stale": drops["stale"]}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "reload_pause.json").write_text(json.dumps(report, indent=2))
    md = (f"# Hot reload pause (`benchmarks/reload_pause.py`)\n\n"
          f"Machine: {report['machine']}; the demo's texture + memory bundle on ONNX Runtime CPU, a live "
          f"{args.fps:g} fps camera, {args.reloads} reloads alternating two bundles.\n\n"
          f"| | value |\n|---|---|\n"
          f"| median gap between results (frame interval) | {1000 * frame_gap:.1f} ms |\n"
          f"| longest result gap around a reload, p50 / max | {1000 * report['pause_p50_s']:.1f} / "
          f"{1000 * report['pause_max_s']:.1f} ms ({report['pause_p50_over_frame_gap']:.2f}x / "
          f"{report['pause_max_over_frame_gap']:.2f}x the frame interval) |\n"
          f"| swap (slot held), p50 / max | {1e6 * report['swap_hold_p50_s']:.0f} / "
          f"{1e6 * report['swap_hold_max_s']:.0f} us |\n"
          f"| load + check + warm on the side thread, p50 | {1000 * report['load_and_warm_p50_s']:.0f} ms |\n"
          f"| frames lost (hwm) / stale over the run | {drops['hwm']:.0f} / {drops['stale']:.0f} |\n")
    (OUT / "reload_pause.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
