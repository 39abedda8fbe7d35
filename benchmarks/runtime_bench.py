"""Runtime throughput and transport, each measured as a ratio within one run.

1. End-to-end pipeline vs bare engine, batch 1, same bundle: frames/s of
   ``engine.infer`` on one frame at a time, against frames/s of the whole path (a camera
   process -> ZeroMQ every_part -> intake/preprocess -> engine -> publish -> a results
   subscriber), ``max_batch`` 1. One pipeline stays up; the camera process sends bursts on
   command, and short blocks alternate: a burst through the pipeline, then as many frames
   through the bare engine (the pipeline's own engine object, called directly while the
   pipeline idles: same session, same input frames). A block's ratio is its pipeline rate
   over the mean of the engine blocks just before and after it, and the median over blocks
   is the result: on a shared VM whose speed wanders by +-10 % within seconds, fine
   interleaving gives both sides the same noise. Target ratio >= 0.95.
2. ZeroMQ transport of a 1920x1080x3 uint8 frame over ipc and tcp (PUSH/PULL, a sender
   process, zero-copy send): p50 one-way latency with one frame in flight (monotonic clock,
   same host) and GB/s with a burst, against a plain numpy copy of the same frame.

    .venv/bin/python benchmarks/runtime_bench.py [--bundle B] [--blocks 40] [--block-frames 60]

Without ``--bundle`` it uses (building if needed) the demo's bundle, bundles/textile-demo.
Writes benchmarks/results/runtime_bench.{json,md} (``-threadsN`` in the name for N != 1).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from edge_inspect.runtime.bundle import load_bundle
from edge_inspect.runtime.engines import open_engine
from edge_inspect.runtime.metrics import RuntimeMetrics
from edge_inspect.runtime.model_slot import ModelSlot
from edge_inspect.runtime.pipeline import Pipeline, PipelineConfig
from edge_inspect.runtime.preprocess import fit_image
from edge_inspect.runtime.sinks import ResultSocketSink
from edge_inspect.runtime.transport.sockets import Receiver, Sender, TransportConfig
from edge_inspect.runtime.transport.wire import decode, encode

RESULTS = Path(__file__).resolve().parent / "results"
HD = (1080, 1920, 3)


def _burst_camera(frames_endpoint: str, control_endpoint: str) -> None:
    """A camera process that sends a burst of ``N`` frames each time it is told ``N``
    (``0`` ends it), with one continuous ``seq``, so the pipeline stays up between bursts."""
    tx = Sender(TransportConfig(frames_endpoint, mode="every_part", send_timeout_ms=20000))
    control = Receiver(TransportConfig(control_endpoint, mode="every_part", recv_timeout_ms=60000))
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (250, 250, 3), dtype=np.uint8) for _ in range(16)]
    seq = 0
    while (parts := control.recv()) is not None and (n := int(bytes(parts[0]))) > 0:
        for _ in range(n):
            tx.send(encode("frame", "bench", seq, time.monotonic_ns(), [frames[seq % 16]]))
            seq += 1
    tx.close()
    control.close()


class PipelineVsEngine:
    """One pipeline (every_part, ``max_batch`` 1) fed by a burst camera process, and its
    engine called directly, measured in alternating short blocks: the pipeline is idle
    while the bare engine runs, and both see the same machine noise. Sharing one engine
    (one ONNX Runtime session) keeps differences between sessions out of the ratio."""

    def __init__(self, bundle_dir: Path, threads: int, tmp: str) -> None:
        self.bundle = load_bundle(bundle_dir)
        rng = np.random.default_rng(0)  # the burst camera's frames (same seed), fitted
        size = (self.bundle.image.height, self.bundle.image.width)
        name = self.bundle.image.name
        frames = [rng.integers(0, 256, (250, 250, 3), dtype=np.uint8) for _ in range(16)]
        plane = self.bundle.image
        self.inputs = [{name: np.ascontiguousarray(fit_image(f, size, plane.fit, plane.interpolation)[None])}
                       for f in frames]
        self.bare = open_engine(self.bundle, threads=threads)
        results = Sender(TransportConfig(f"ipc://{tmp}/results", mode="live", hwm=10000))
        self.pipeline = Pipeline(ModelSlot(self.bundle, self.bare, "bench"),
                                 Receiver(TransportConfig(f"ipc://{tmp}/frames", mode="every_part")),
                                 [ResultSocketSink(results)],
                                 PipelineConfig(("bench",), mode="every_part", max_batch=1,
                                                heatmap_size=(64, 64)),
                                 RuntimeMetrics())
        self.results = Receiver(TransportConfig(f"ipc://{tmp}/results", mode="live", hwm=100000))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.pipeline.run, args=(self.stop,), daemon=True)
        self.thread.start()
        self.camera = mp.get_context("spawn").Process(
            target=_burst_camera, args=(f"ipc://{tmp}/frames", f"ipc://{tmp}/control"))
        self.camera.start()
        self.control = Sender(TransportConfig(f"ipc://{tmp}/control", mode="every_part"))
        deadline = time.monotonic() + 60
        while self._burst(20, allow_loss=True) is None:  # until results flow (subscriber joined)
            if time.monotonic() > deadline:
                raise RuntimeError("the pipeline produced no results within 60 s")

    def _burst(self, n: int, allow_loss: bool = False) -> float | None:
        """Frames/s of the pipeline over one burst: results 2..n over the time from result 1
        (the first result only marks the start, so filling the pipeline is not counted)."""
        self.control.send([str(n).encode()])
        t_first = None
        for got in range(n):
            parts = self.results.recv(5000)
            if parts is None:
                if allow_loss:
                    return None
                raise RuntimeError(f"pipeline stalled after {got} of {n} results")
            if got == 0:
                t_first = time.perf_counter()
        return (n - 1) / (time.perf_counter() - t_first)

    def pipeline_fps(self, n: int) -> float:
        return self._burst(n)

    def engine_call_in_pipeline(self) -> tuple[float, int]:
        """Seconds spent in the pipeline's engine calls so far, and frames (from its metrics)."""
        registry, labels = self.pipeline.metrics.registry, {"stage": "infer", "camera": "bench"}
        return (registry.get_sample_value("edge_inspect_stage_seconds_sum", labels) or 0.0,
                int(registry.get_sample_value("edge_inspect_stage_seconds_count", labels) or 0))

    def engine_fps(self, n: int) -> float:
        t0 = time.perf_counter()
        for i in range(n):
            self.bare.infer(self.inputs[i % 16])
        return n / (time.perf_counter() - t0)

    def close(self) -> None:
        self.control.send([b"0"])
        self.camera.join(10)
        self.stop.set()
        self.thread.join(10)
        self.pipeline.close()
        self.results.close()
        self.control.close()


def _sender(endpoint: str, n: int, ack: str | None) -> None:
    """Burst ``n`` frames (throughput), or with ``ack`` send each only after the previous one
    was acknowledged (one frame in flight: latency without queueing)."""
    tx = Sender(TransportConfig(endpoint, mode="every_part", hwm=4, send_timeout_ms=20000))
    acks = Receiver(TransportConfig(ack, mode="every_part", recv_timeout_ms=20000)) if ack else None
    frame = np.random.default_rng(0).integers(0, 256, HD, dtype=np.uint8)
    time.sleep(0.3)
    for seq in range(n):
        tx.send(encode("frame", "hd", seq, time.monotonic_ns(), [frame]))
        if acks is not None and acks.recv(20000) is None:
            break
    time.sleep(0.5)
    tx.close()
    if acks is not None:
        acks.close()


def _receive(endpoint: str, n: int, ack: str | None) -> tuple[list[float], float]:
    rx = Receiver(TransportConfig(endpoint, mode="every_part", hwm=4))
    if endpoint.endswith(":*"):
        endpoint = rx.socket.getsockopt(zmq.LAST_ENDPOINT).decode()
    acks = Sender(TransportConfig(ack, mode="every_part")) if ack else None
    proc = mp.get_context("spawn").Process(target=_sender, args=(endpoint, n, ack))
    proc.start()
    lat, t0 = [], time.perf_counter()
    for i in range(n):
        msg = decode(rx.recv(20000))
        lat.append((time.monotonic_ns() - msg.t_capture_ns) / 1e9)
        if i == 0:
            t0 = time.perf_counter()
        if acks is not None:
            acks.send([b"ack"])
    dt = time.perf_counter() - t0
    proc.join(10)
    rx.close()
    if acks is not None:
        acks.close()
    return lat, dt


def transport(kind: str, tmp: str, n: int) -> dict:
    """p50 one-way latency with one frame in flight; GB/s with a burst."""
    endpoint = f"ipc://{tmp}/hd" if kind == "ipc" else "tcp://127.0.0.1:*"
    lat, _ = _receive(endpoint, n // 2, f"ipc://{tmp}/ack-{kind}")
    _, dt = _receive(endpoint, n, None)
    return {"p50_latency_ms": 1000 * float(np.median(lat[3:])),
            "GB_per_s": (n - 1) * int(np.prod(HD)) / dt / 1e9}


def numpy_copy(n: int) -> dict:
    src = np.random.default_rng(0).integers(0, 256, HD, dtype=np.uint8)
    dst = np.empty_like(src)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return {"p50_latency_ms": 1000 * float(np.median(times)),
            "GB_per_s": src.nbytes / float(np.median(times)) / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--blocks", type=int, default=40, help="alternating pipeline/engine blocks")
    parser.add_argument("--block-frames", type=int, default=60, help="frames per block")
    parser.add_argument("--hd-frames", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1,
                        help="ONNX Runtime threads, the same for both sides (1 leaves a core of "
                             "2 for the camera process and ZeroMQ)")
    args = parser.parse_args()
    bundle_dir = args.bundle or Path("bundles/textile-demo")
    if not (bundle_dir / "manifest.json").exists():
        from edge_inspect.export.demo import build_bundle

        build_bundle(bundle_dir, 4, 0)
    with tempfile.TemporaryDirectory() as tmp:
        bench = PipelineVsEngine(bundle_dir, args.threads, tmp)
        try:
            engines, pipelines = [bench.engine_fps(args.block_frames)], []
            infer0, n0 = bench.engine_call_in_pipeline()
            for _ in range(args.blocks):
                pipelines.append(bench.pipeline_fps(args.block_frames))
                engines.append(bench.engine_fps(args.block_frames))
            infer1, n1 = bench.engine_call_in_pipeline()
        finally:
            bench.close()
    # where a pipeline frame's time goes: the engine call inside the pipeline vs a bare one
    per_frame_ms = {"bare_engine": 1000 * float(np.mean([1 / e for e in engines])),
                    "pipeline_engine_call": 1000 * (infer1 - infer0) / (n1 - n0),
                    "pipeline_frame": 1000 * float(np.mean([1 / x for x in pipelines]))}
    ratios = [p / ((e1 + e2) / 2) for p, e1, e2 in zip(pipelines, engines[:-1], engines[1:], strict=True)]
    ratio = float(np.median(ratios))
    p, engine = float(np.median(pipelines)), float(np.median(engines))
    with tempfile.TemporaryDirectory() as tmp:
        ipc = transport("ipc", tmp, args.hd_frames)
        tcp = transport("tcp", tmp, args.hd_frames)
    copy = numpy_copy(args.hd_frames)
    result = {"bundle": str(bundle_dir), "threads": args.threads, "blocks": args.blocks,
              "block_frames": args.block_frames, "pipeline_over_engine": ratio, "block_ratios": ratios,
              "engine_runs_fps": engines, "pipeline_runs_fps": pipelines, "per_frame_ms": per_frame_ms,
              "transport_1080p": {"ipc": ipc, "tcp": tcp, "numpy_copy": copy},
              "machine": platform.platform(),
              "command": f"python benchmarks/runtime_bench.py --blocks {args.blocks} --block-frames "
                         f"{args.block_frames} --hd-frames {args.hd_frames} --threads {args.threads}"}
    RESULTS.mkdir(exist_ok=True)
    stem = "runtime_bench" if args.threads == 1 else f"runtime_bench-threads{args.threads}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
    lines = [f"Command: `{result['command']}` (bundle {bundle_dir}); {result['machine']}.", "",
             f"End-to-end pipeline / bare engine throughput, batch 1, {args.threads} ONNX Runtime "
             f"thread(s) on both sides, median of {args.blocks} blocks of {args.block_frames} frames: "
             f"**{ratio:.3f}** (target >= 0.95; blocks from {min(ratios):.3f} to {max(ratios):.3f}, "
             f"quartiles {np.percentile(ratios, 25):.3f} / {np.percentile(ratios, 75):.3f}).", "",
             f"Per frame (means over the blocks): bare engine call {per_frame_ms['bare_engine']:.2f} ms; "
             f"in the pipeline, the engine call {per_frame_ms['pipeline_engine_call']:.2f} ms, "
             f"the whole frame {per_frame_ms['pipeline_frame']:.2f} ms.", "",
             "| 1920x1080x3 uint8 frame | p50 one-way latency / numpy copy | throughput / numpy copy |",
             "|---|---|---|"]
    for name in ("ipc", "tcp"):
        t = result["transport_1080p"][name]
        lines.append(f"| ZeroMQ {name} | {t['p50_latency_ms'] / copy['p50_latency_ms']:.1f}x | "
                     f"{t['GB_per_s'] / copy['GB_per_s']:.2f}x |")
    lines += ["", "Absolute numbers (this shared 2-core VM; for the record, not a claim): "
              + ", ".join(f"{k} {v['p50_latency_ms']:.2f} ms / {v['GB_per_s']:.2f} GB/s"
                          for k, v in result["transport_1080p"].items())
              + f"; engine {engine:.0f} frames/s, pipeline {p:.0f} frames/s (medians)."]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
