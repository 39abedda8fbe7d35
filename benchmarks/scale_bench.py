"""Many cameras into one pipeline: 1, 2, 4, 8, 12 and 16 synthetic 1080p cameras at 30 fps, for each
frame transport (ZeroMQ with the pixels in the message; the shared-memory ring).

Each configuration is one runtime, started here as ``serve`` starts it (this process is the
pipeline; every camera is its own process), in ``live`` mode (a line watch: what the
pipeline cannot keep up with is dropped and counted), ``max_batch`` 8, the demo's bundle on
ONNX Runtime CPU. Every camera sends ``--seconds`` x 30 frames and ends, so every frame sent
is accounted for: scored, or dropped with a reason. The default bundle is cheap on purpose
(the demo's texture + memory model on a 64 x 64 centre crop, ~0.3 ms a frame in batches, built
on the first run into bundles/scale-cheap; needs the trainer extra), so that what limits the
camera count is moving and fitting frames, not the model. Reported per configuration:

* scored / sent, and the drops by reason (``hwm``, ``stale``, ``malformed``, ``overwritten``);
* end-to-end latency p50 / p99: capture (the camera's stamp) to the result handed to the
  sinks, every scored frame (a sink here records it);
* CPU seconds per frame sent of the camera processes (their user + system time from
  ``/proc``, from each camera's first scored frame to its last sample before it exits,
  sampled every 0.1 s) and of the pipeline process per frame scored (this process over the
  same window: intake, fitting, engine, publishing).

A configuration keeps up when >= 99 % of the frames sent are scored.

    .venv/bin/python benchmarks/scale_bench.py [--cameras 1 2 4 8 12 16] [--seconds 10] [--bundle B]

Writes benchmarks/results/scale_bench.{json,md} (``--name`` for another name).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from edge_inspect.runtime.orchestrator import Runtime
from edge_inspect.runtime.profile import Profile

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
REASONS = ("hwm", "stale", "malformed", "overwritten")
TICK = os.sysconf("SC_CLK_TCK")
FPS = 30.0
SIZE = [1080, 1920]


class LatencySink:
    """Capture-to-result latency of every scored frame, and when each camera's first arrived."""

    def __init__(self) -> None:
        self.e2e_ns: list[int] = []
        self.first: dict[str, float] = {}

    def publish(self, result) -> None:
        self.e2e_ns.append(time.monotonic_ns() - result.t_capture_ns)
        self.first.setdefault(result.camera, time.monotonic())

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK


class CpuSampler:
    """Camera processes' CPU from their first scored frame to their last sample, and this
    process's over the same window."""

    def __init__(self, runtime: Runtime, sink: LatencySink) -> None:
        self.runtime, self.sink = runtime, sink
        self.start: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.self_start: float | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            for cam, proc in list(self.runtime.processes.items()):
                used = cpu_s(proc.pid) if proc.pid else None
                if used is None:
                    continue
                if cam in self.sink.first and cam not in self.start:
                    self.start[cam] = used
                    if self.self_start is None:
                        self.self_start = time.process_time()
                if cam in self.start:
                    self.last[cam] = used

    def finish(self) -> tuple[float, float]:
        """(camera processes' CPU seconds, this process's CPU seconds) over the window."""
        self.stop.set()
        self.thread.join(2)
        cameras = sum(self.last[c] - self.start[c] for c in self.start)
        return cameras, time.process_time() - (self.self_start or time.process_time())


def run_one(bundle: Path, transport: str, cameras: int, seconds: float, tmp: Path,
            spin: bool = False) -> dict:
    frames = int(seconds * FPS)
    cfg = Profile.from_dict({
        "bundle": str(bundle), "mode": "live", "endpoint_dir": str(tmp / f"{transport}-{cameras}"),
        "backend_options": {"spin": spin}, "http": {"port": None}, "pipeline": {"max_batch": 8},
        "transport": {"kind": transport, "slots": 8, "frame_pixels": SIZE[0] * SIZE[1]},
        "cameras": [{"id": f"cam{i}", "source": "synthetic", "size": SIZE, "fps": FPS, "count": frames}
                    for i in range(cameras)]}, "scale_bench")
    runtime = Runtime(cfg)
    sink = LatencySink()
    runtime.start()
    runtime.pipeline.sinks.append(sink)
    sampler = CpuSampler(runtime, sink)
    deadline = time.monotonic() + seconds + 60
    try:
        while not runtime.sources_done() and time.monotonic() < deadline:
            time.sleep(0.1)
        done, quiet = runtime.pipeline.frames_done, time.monotonic()
        while time.monotonic() - quiet < 1.0:  # score what is still queued (as serve does)
            time.sleep(0.1)
            if runtime.pipeline.frames_done != done:
                done, quiet = runtime.pipeline.frames_done, time.monotonic()
        camera_cpu, pipeline_cpu = sampler.finish()
    finally:
        sampler.stop.set()
        runtime.shutdown()
    value = runtime.metrics.registry.get_sample_value
    sent = sum(e.finished_frames.value for e in runtime.events.values())
    scored = runtime.pipeline.frames_done
    drops = {r: int(sum(value("edge_inspect_frames_dropped_total", {"camera": f"cam{i}", "reason": r}) or 0
                        for i in range(cameras))) for r in REASONS}
    e2e = np.array(sink.e2e_ns) / 1e6
    return {"transport": transport, "cameras": cameras, "sent": int(sent), "scored": scored,
            "scored_over_sent": scored / sent if sent else 0.0, "drops": drops,
            "accounted": scored + sum(drops.values()) == sent,
            "e2e_ms_p50": float(np.percentile(e2e, 50)) if len(e2e) else None,
            "e2e_ms_p99": float(np.percentile(e2e, 99)) if len(e2e) else None,
            "camera_cpu_ms_per_frame": 1000 * camera_cpu / sent if sent else None,
            "pipeline_cpu_ms_per_frame": 1000 * pipeline_cpu / scored if scored else None}


def build_cheap_bundle(out: Path) -> Path:
    """The demo's model (texture backbone + few-shot memory, one shot) on a 64 x 64 crop."""
    from edge_inspect.export.bundle_writer import export_bundle
    from edge_inspect.trainer.config import RunConfig
    from edge_inspect.trainer.evaluate import evaluate_run

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        (run / "texture-64.yaml").write_text("backbone: {kind: texture, input_size: 64}\n")
        cfg = RunConfig.from_yaml(ROOT / "configs" / "memory" / "textile-texture.yaml", [
            f"backbone={run / 'texture-64.yaml'}", "shots=1", "eval.limit=40", "eval.overlays=0",
            "calibration.normals=80", "head.shift_reference=40",
            "data.target=[{name: textile, kind: textile, kinds: [nominal, local]}]"])
        (run / "config.yaml").write_text(cfg.to_yaml())
        evaluate_run(cfg, None, run / "eval")
        (enrolled,) = (run / "eval" / "enrolled").glob("*.safetensors")
        return export_bundle(run, out, enrolled)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=ROOT / "bundles" / "scale-cheap")
    ap.add_argument("--cameras", type=int, nargs="+", default=[1, 2, 4, 8, 12, 16])
    ap.add_argument("--transports", nargs="+", default=["zmq", "shm"], choices=["zmq", "shm"])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--name", default="scale_bench", help="results file name (without suffix)")
    ap.add_argument("--spin", action="store_true",
                    help="ONNX Runtime's threads spin between calls (its own default; the runtime's is off)")
    args = ap.parse_args()
    if not (args.bundle / "manifest.json").exists():
        if args.bundle != ROOT / "bundles" / "scale-cheap":
            raise SystemExit(f"{args.bundle} is not a bundle (no manifest.json); pass a bundle folder")
        print(f"building the cheap bundle {args.bundle} (once)", flush=True)
        build_cheap_bundle(args.bundle)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.cameras:
            for transport in args.transports:  # the two transports side by side, per camera count
                row = run_one(args.bundle, transport, n, args.seconds, Path(tmp), args.spin)
                rows.append(row)
                print(json.dumps(row), flush=True)
    report = {"machine": platform.platform(), "cpus": os.cpu_count(), "fps": FPS, "size": SIZE,
              "spin": args.spin, "seconds": args.seconds, "bundle": str(args.bundle), "rows": rows}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    lines = ["# Many cameras into one pipeline (`benchmarks/scale_bench.py`)\n",
             f"Machine: {report['machine']}, {report['cpus']} CPUs; synthetic {SIZE[1]}x{SIZE[0]} cameras at "
             f"{FPS:g} fps for {args.seconds:g} s each, live mode, max_batch 8, {args.bundle.name} on ONNX "
             f"Runtime CPU (threads spinning between calls: {'on' if args.spin else 'off'}). CPU ms per "
             "frame: camera processes per frame sent, pipeline process per frame scored. Keeps up: >= 99 % "
             "of frames scored.\n",
             "| cameras | transport | scored / sent | hwm | stale | malformed | overwritten | e2e p50 ms | "
             "e2e p99 ms | camera CPU ms/frame | pipeline CPU ms/frame | keeps up |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["drops"]
        lines.append(f"| {r['cameras']} | {r['transport']} | {r['scored']} / {r['sent']} "
                     f"({100 * r['scored_over_sent']:.1f} %) | {d['hwm']} | {d['stale']} | "
                     f"{d['malformed']} | {d['overwritten']} | {_ms(r['e2e_ms_p50'])} | "
                     f"{_ms(r['e2e_ms_p99'])} | {_ms(r['camera_cpu_ms_per_frame'])} | "
                     f"{_ms(r['pipeline_cpu_ms_per_frame'])} | "
                     f"{'yes' if r['scored_over_sent'] >= 0.99 else 'no'} |")
    md = "\n".join(lines) + "\n"
    (OUT / f"{args.name}.md").write_text(md)
    print(md)
    return 0


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    raise SystemExit(main())
