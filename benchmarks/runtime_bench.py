"""Runtime throughput and transport, each measured as a ratio within one run.

1. End-to-end pipeline vs bare engine, batch 1, same bundle: frames/s of
   ``engine.infer`` on one frame at a time, against frames/s of the whole path (a synthetic
   camera process -> ZeroMQ every_part -> preprocess -> engine -> publish -> a results
   subscriber), ``max_batch`` 1. Rounds alternate engine and pipeline; each round's ratio
   is its pipeline rate over the mean of the engine rates timed just before and after it,
   so drift hits both sides, and the median over rounds is the result (one noisy round on
   a shared VM does not decide it). Target ratio >= 0.95.
2. ZeroMQ transport of a 1920x1080x3 uint8 frame over ipc and tcp (PUSH/PULL, a sender
   process, zero-copy send): p50 one-way latency with one frame in flight (monotonic clock,
   same host) and GB/s with a burst, against a plain numpy copy of the same frame.

    .venv/bin/python benchmarks/runtime_bench.py [--bundle B] [--frames 300] [--rounds 9]

Without ``--bundle`` it uses (building if needed) the demo's bundle, bundles/textile-demo.
Writes benchmarks/results/runtime_bench.{json,md} (``-threadsN`` in the name for N != 1).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

from runtime.bundle import load_bundle
from runtime.engines import open_engine
from runtime.preprocess import fit_image
from runtime.serve import Runtime, RuntimeConfig
from runtime.transport.sockets import Receiver, Sender, TransportConfig
from runtime.transport.wire import decode, encode

RESULTS = Path(__file__).resolve().parent / "results"
HD = (1080, 1920, 3)


def engine_fps(bundle, frames: int, threads: int) -> float:
    engine = open_engine(bundle, threads=threads)
    engine.warmup()
    rng = np.random.default_rng(0)
    frame = fit_image(rng.integers(0, 256, (250, 250, 3), dtype=np.uint8),
                      (bundle.image.height, bundle.image.width), bundle.image.fit)[None]
    t0 = time.perf_counter()
    for _ in range(frames):
        engine.infer(frame)
    return frames / (time.perf_counter() - t0)


def pipeline_fps(bundle_dir: Path, frames: int, threads: int) -> float:
    with tempfile.TemporaryDirectory() as ep:
        cfg = RuntimeConfig(bundle=str(bundle_dir), mode="every_part", endpoint_dir=ep,
                            cameras=[{"id": "bench", "source": "synthetic", "size": [250, 250],
                                      "fps": None, "count": frames}],
                            pipeline={"max_batch": 1, "heatmap_size": [64, 64]},
                            backend_options={"threads": threads},
                            http={"port": None}, model_name="bench")
        rt = Runtime(cfg)
        rx = Receiver(TransportConfig(cfg.results_endpoint, mode="live", hwm=100000))
        rt.start()
        got, t_first = 0, None
        try:
            while got < frames:
                parts = rx.recv(10000)
                if parts is None:
                    raise RuntimeError(f"pipeline stalled after {got} results")
                got += 1
                if got == 11:  # skip start-up: time results 11..N
                    t_first = time.perf_counter()
            return (frames - 11) / (time.perf_counter() - t_first)
        finally:
            rt.shutdown()
            rx.close()


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
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=9, help="engine/pipeline rounds (median ratio)")
    parser.add_argument("--hd-frames", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1,
                        help="ONNX Runtime threads, the same for both sides (1 leaves a core of "
                             "2 for the camera process and ZeroMQ)")
    args = parser.parse_args()
    bundle_dir = args.bundle or Path("bundles/textile-demo")
    if not (bundle_dir / "manifest.json").exists():
        from trainer.demo import build_bundle

        build_bundle(bundle_dir, 4, 0)
    bundle = load_bundle(bundle_dir)
    engines, pipelines = [engine_fps(bundle, args.frames, args.threads)], []
    for _ in range(args.rounds):
        pipelines.append(pipeline_fps(bundle_dir, args.frames, args.threads))
        engines.append(engine_fps(bundle, args.frames, args.threads))
    ratios = [p / ((e1 + e2) / 2) for p, e1, e2 in zip(pipelines, engines[:-1], engines[1:], strict=True)]
    ratio = float(np.median(ratios))
    p, engine = float(np.median(pipelines)), float(np.median(engines))
    with tempfile.TemporaryDirectory() as tmp:
        ipc = transport("ipc", tmp, args.hd_frames)
        tcp = transport("tcp", tmp, args.hd_frames)
    copy = numpy_copy(args.hd_frames)
    result = {"bundle": str(bundle_dir), "frames": args.frames, "threads": args.threads,
              "rounds": args.rounds, "pipeline_over_engine": ratio, "round_ratios": ratios,
              "engine_runs_fps": engines, "pipeline_runs_fps": pipelines,
              "transport_1080p": {"ipc": ipc, "tcp": tcp, "numpy_copy": copy},
              "machine": platform.platform(),
              "command": f"python benchmarks/runtime_bench.py --frames {args.frames} "
                         f"--hd-frames {args.hd_frames} --threads {args.threads} --rounds {args.rounds}"}
    RESULTS.mkdir(exist_ok=True)
    stem = "runtime_bench" if args.threads == 1 else f"runtime_bench-threads{args.threads}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
    lines = [f"Command: `{result['command']}` (bundle {bundle_dir}); {result['machine']}.", "",
             f"End-to-end pipeline / bare engine throughput, batch 1, {args.threads} ONNX Runtime "
             f"thread(s) on both sides, median of {args.rounds} rounds: **{ratio:.3f}** "
             f"(target >= 0.95; rounds {', '.join(f'{r:.3f}' for r in ratios)}).", "",
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
