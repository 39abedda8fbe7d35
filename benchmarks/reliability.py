"""Reliability figures of `edge-inspect serve`, measured on real processes (issue 12).

Each part starts `serve` (torch blocked, as on a Jetson) with the demo's bundle and
synthetic cameras, does something hostile or unlucky to it from outside, and reads the
outcome from /metrics and /proc:

1. **hostile messages** -- ``--hostile`` messages (the corpus of ``tests/hostile.py``:
   Infinity, 5,000-digit and 10**309 numbers, 60,000 nested brackets, bad ids, unusable
   frames, and half of them frames from invented camera ids) pushed into an every_part
   frame endpoint: sent, counted as dropped, exits of serve, and the growth of RSS and of
   /metrics series over them (measured after a warm-up of 1,000).
2. **camera kill -9** -- ``--kills`` times: SIGKILL a camera process, time until that
   camera's frames are received again (the supervisor restarts it); the next kill waits a
   stable period (the backoff resets after 5 s of running).
3. **serve kill -9** -- ``--runs`` times: SIGKILL serve, count its descendants (cameras,
   multiprocessing's resource tracker) still alive 3 s later.
4. **SIGTERM** -- ``--runs`` times: time from SIGTERM until every process of the tree is gone.
5. **every_part at 2x load** -- the pipeline's own rate R is measured with an unpaced
   camera, then a camera sends ``10 R`` frames at ``2 R`` frames/s: seq gaps (``hwm``
   drops), other drops and frames scored. Backpressure must make the camera wait.
6. **soak** -- ``--soak-s`` seconds (600 by default) of two live cameras at 25 frames/s:
   RSS at the start, half-way and at the end (sampled every 10 s), the growth over the
   second half, and the series count.

    .venv/bin/python benchmarks/reliability.py [--soak-s 600] [--kills 20] [--runs 5]

Writes benchmarks/results/reliability.{json,md}; ``--render`` rewrites the table of an
existing JSON without measuring.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge_inspect.runtime.transport.sockets import Sender, TransportConfig  # noqa: E402
from tests.hostile import corpus, invented_camera  # noqa: E402
from tests.runtime.serve_proc import Serve, alive, descendants, metric, rss_kib, series_count  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def _profile(bundle: Path, tmp: Path, mode: str, cameras: list[dict]) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    return {"bundle": str(bundle), "mode": mode, "endpoint_dir": str(tmp / "ep"), "cameras": cameras,
            "http": {"host": "127.0.0.1", "port": 0}, "model_name": "m",
            "pipeline": {"camera_timeout_s": 2.0}}


def _synthetic(cid: str, fps: float | None, count: int | None = None) -> dict:
    cam = {"id": cid, "source": "synthetic", "size": [250, 250], "fps": fps}
    return cam | ({"count": count} if count is not None else {})


def _wait(cond, timeout: float, what: str, step: float = 0.05) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(step)
    return time.monotonic() - t0


def _dropped(serve: Serve) -> float:
    body = serve.metrics()
    total = 0.0
    for line in body.splitlines():
        if line.startswith("edge_inspect_frames_dropped_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def hostile(bundle: Path, tmp: Path, n: int) -> dict:
    serve = Serve(_profile(bundle, tmp, "every_part", [_synthetic("cam0", 20)]), tmp, "hostile")
    serve.started().ready()
    tx = Sender(TransportConfig(f"ipc://{tmp}/ep/frames", mode="every_part", send_timeout_ms=10000))
    messages = list(corpus("cam0").values())
    try:
        for i in range(1000):
            tx.send(invented_camera(i) if i % 2 else messages[i % len(messages)])
        _wait(lambda: _dropped(serve) >= 1000, 30, "the warm-up messages")
        rss0, series0, dropped0 = rss_kib(serve.pid), series_count(serve.metrics()), _dropped(serve)
        scored0 = serve.value("edge_inspect_frames_inferred_total", camera="cam0", model="m")
        for i in range(n):
            tx.send(invented_camera(1000 + i) if i % 2 else messages[i % len(messages)])
        _wait(lambda: _dropped(serve) - dropped0 >= n, 60, "the hostile messages to be counted")
        time.sleep(1.0)
        counted = _dropped(serve) - dropped0
        rss1, series1 = rss_kib(serve.pid), series_count(serve.metrics())
        scored = serve.value("edge_inspect_frames_inferred_total", camera="cam0", model="m") - scored0
        running = serve.proc.poll() is None
    finally:
        tx.close()
        rc = serve.stop()
    return {"sent": n, "counted": int(counted), "serve_exits": int(not running), "serve_exit_code": rc,
            "real_camera_frames_scored_meanwhile": int(scored), "rss_growth_kib": rss1 - rss0,
            "series_before": series0, "series_after": series1}


def camera_kills(bundle: Path, tmp: Path, kills: int, stable_s: float = 5.5) -> dict:
    serve = Serve(_profile(bundle, tmp, "live", [_synthetic("cam0", 25)]), tmp, "kills")
    serve.started().ready()
    received = lambda: serve.value("edge_inspect_frames_received_total", camera="cam0")  # noqa: E731
    times = []
    try:
        for _ in range(kills):
            (camera,) = [p for p in descendants(serve.pid) if "resource_tracker" not in _cmdline(p)]
            before = received()
            t0 = time.monotonic()
            os.kill(camera, signal.SIGKILL)
            _wait(lambda c=camera: not alive(c), 5, "the camera to die")
            mark = received()
            _wait(lambda m=mark: received() > m, 60, "the camera's frames after a restart")
            times.append(time.monotonic() - t0)
            assert received() > before
            time.sleep(stable_s)
        restarts = serve.value("edge_inspect_source_restarts_total", camera="cam0")
    finally:
        rc = serve.stop()
    return {"kills": kills, "recovered": len(times), "restarts_counted": int(restarts),
            "recovery_s_p50": round(statistics.median(times), 2), "recovery_s_max": round(max(times), 2),
            "serve_exit_code": rc}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def serve_kills(bundle: Path, tmp: Path, runs: int) -> dict:
    orphans = []
    for i in range(runs):
        cams = [_synthetic("cam0", 25), _synthetic("cam1", 25)]
        serve = Serve(_profile(bundle, tmp / f"k{i}", "live", cams), tmp, f"kill9-{i}").started().ready()
        tree = descendants(serve.pid)
        os.kill(serve.pid, signal.SIGKILL)
        serve.proc.wait(5)
        time.sleep(3.0)
        orphans.append(sum(alive(p) for p in tree))
        for p in tree:
            if alive(p):
                os.kill(p, signal.SIGKILL)
    return {"runs": runs, "processes_per_tree": len(tree), "orphans_after_3s": orphans}


def sigterm(bundle: Path, tmp: Path, runs: int) -> dict:
    times = []
    for i in range(runs):
        cams = [_synthetic("cam0", 25), _synthetic("cam1", 25)]
        serve = Serve(_profile(bundle, tmp / f"t{i}", "live", cams), tmp, f"term-{i}").started().ready()
        tree = [serve.pid, *descendants(serve.pid)]
        t0 = time.monotonic()
        serve.proc.send_signal(signal.SIGTERM)
        serve.proc.wait(10)
        _wait(lambda: not any(alive(p) for p in tree), 10, "the tree to end", step=0.01)  # noqa: B023
        times.append(time.monotonic() - t0)
    return {"runs": runs, "tree_gone_s_p50": round(statistics.median(times), 2),
            "tree_gone_s_max": round(max(times), 2)}


def every_part_overload(bundle: Path, tmp: Path, seconds: float = 10.0) -> dict:
    serve = Serve(_profile(bundle, tmp / "cap", "every_part", [_synthetic("cam0", None)]), tmp, "capacity")
    serve.started().ready()
    scored = lambda s: s.value("edge_inspect_frames_inferred_total", camera="cam0", model="m")  # noqa: E731
    time.sleep(2.0)
    n0, t0 = scored(serve), time.monotonic()
    time.sleep(5.0)
    rate = (scored(serve) - n0) / (time.monotonic() - t0)
    serve.stop()
    count = int(rate * seconds)
    cams = [_synthetic("cam0", 2 * rate, count), {"id": "idle", "source": "external"}]  # keeps serve up
    serve = Serve(_profile(bundle, tmp / "over", "every_part", cams), tmp, "overload").started()
    try:
        _wait(lambda: serve.base and scored(serve) >= count, 20 * seconds, "every frame to be scored", 0.2)
        body = serve.metrics()
        drops = {r: metric(body, "edge_inspect_frames_dropped_total", camera="cam0", reason=r)
                 for r in ("hwm", "stale", "malformed")}
        blocked = metric(body, "edge_inspect_source_events_total", camera="cam0", event="send_blocked")
        done = scored(serve)
    finally:
        rc = serve.stop() if serve.proc.poll() is None else serve.proc.wait()
    return {"pipeline_fps": round(rate, 1), "camera_fps": round(2 * rate, 1), "frames_sent": count,
            "frames_scored": int(done), "seq_gaps": int(drops["hwm"]), "other_drops": int(drops["stale"]
                                                                                       + drops["malformed"]),
            "send_timeouts_waited": int(blocked), "serve_exit_code": rc}


def soak(bundle: Path, tmp: Path, seconds: float) -> dict:
    cams = [_synthetic("cam0", 25), _synthetic("cam1", 25)]
    serve = Serve(_profile(bundle, tmp / "soak", "live", cams), tmp, "soak").started().ready()
    samples = []
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            samples.append((round(time.monotonic() - t0, 1), rss_kib(serve.pid)))
            time.sleep(min(10.0, max(1.0, seconds / 60)))
        samples.append((round(time.monotonic() - t0, 1), rss_kib(serve.pid)))
        series = series_count(serve.metrics())
        scored = sum(serve.value("edge_inspect_frames_inferred_total", camera=c, model="m")
                     for c in ("cam0", "cam1"))
    finally:
        rc = serve.stop()
    return {"seconds": seconds, "frames_scored": int(scored), "series": series, "serve_exit_code": rc,
            "rss_samples": samples, **soak_summary(samples, seconds)}


def soak_summary(samples: list, seconds: float) -> dict:
    """RSS at the start, half-way and at the end, and the growth over the second half (a
    one-time step while the process warms up -- arenas, the capture writer -- is not a leak;
    growth that goes on is)."""
    half = next(rss for t, rss in samples if t >= seconds / 2)
    return {"rss_kib_start": samples[0][1], "rss_kib_half": half, "rss_kib_end": samples[-1][1],
            "rss_growth_second_half_kib": samples[-1][1] - half}


def render(r: dict) -> str:
    h, k, o, t, e, s = (r[x] for x in ("hostile", "camera_kill9", "serve_kill9", "sigterm",
                                       "every_part_2x", "soak"))
    rows = [
        ("hostile messages: sent / counted / serve exits",
         f"{h['sent']} / {h['counted']} / {h['serve_exits']}"),
        ("... real camera's frames scored meanwhile", f"{h['real_camera_frames_scored_meanwhile']}"),
        ("... RSS growth / /metrics series before -> after",
         f"{h['rss_growth_kib'] / 1024:+.1f} MiB / {h['series_before']} -> {h['series_after']}"),
        (f"camera kill -9 x{k['kills']}: recovered / restarts counted",
         f"{k['recovered']} / {k['restarts_counted']}"),
        ("... recovery time p50 / max (kill -> frames again)",
         f"{k['recovery_s_p50']} s / {k['recovery_s_max']} s"),
        (f"serve kill -9 x{o['runs']}: processes left 3 s later",
         f"{sum(o['orphans_after_3s'])} (of {o['processes_per_tree']} per tree)"),
        (f"SIGTERM x{t['runs']}: whole tree gone p50 / max",
         f"{t['tree_gone_s_p50']} s / {t['tree_gone_s_max']} s"),
        (f"every_part at 2x load ({e['camera_fps']} fps into {e['pipeline_fps']} fps): "
         "seq gaps / other drops",
         f"{e['seq_gaps']} / {e['other_drops']}"),
        ("... frames sent / scored / send timeouts waited out",
         f"{e['frames_sent']} / {e['frames_scored']} / {e['send_timeouts_waited']}"),
        (f"soak {s['seconds'] / 60:.0f} min, 2 cameras x 25 fps: RSS start / half-way / end",
         f"{s['rss_kib_start'] / 1024:.0f} / {s['rss_kib_half'] / 1024:.0f} / "
         f"{s['rss_kib_end'] / 1024:.0f} MiB"),
        ("... RSS growth over the second half; frames scored; series",
         f"{s['rss_growth_second_half_kib'] / 1024:+.1f} MiB; {s['frames_scored']}; {s['series']}"),
    ]
    lines = ["| measure | result |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "bundles" / "textile-demo")
    parser.add_argument("--hostile", type=int, default=10_000)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--soak-s", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "reliability")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite the table of an existing <out>.json (no measuring)")
    args = parser.parse_args()
    if args.render:
        results = json.loads(args.out.with_suffix(".json").read_text())
        soak_part = results["soak"]
        soak_part.update(soak_summary(soak_part["rss_samples"], soak_part["seconds"]))
        for stale in ("rss_kib_after_warmup", "rss_growth_kib"):
            soak_part.pop(stale, None)
        write(args.out, results)
        return
    if not (args.bundle / "manifest.json").exists():
        from edge_inspect.export.demo import build_bundle

        build_bundle(args.bundle, 4, 0)
    results: dict = {"machine": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.platform()})",
                     "command": "python benchmarks/reliability.py " + " ".join(sys.argv[1:])}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, part in (("hostile", lambda: hostile(args.bundle, tmp / "h", args.hostile)),
                           ("camera_kill9", lambda: camera_kills(args.bundle, tmp / "k", args.kills)),
                           ("serve_kill9", lambda: serve_kills(args.bundle, tmp / "o", args.runs)),
                           ("sigterm", lambda: sigterm(args.bundle, tmp / "t", args.runs)),
                           ("every_part_2x", lambda: every_part_overload(args.bundle, tmp / "e")),
                           ("soak", lambda: soak(args.bundle, tmp / "s", args.soak_s))):
            print(f"[reliability] {name} ...", flush=True)
            results[name] = part()
            print(json.dumps({k: v for k, v in results[name].items() if k != "rss_samples"}), flush=True)
    write(args.out, results)


def write(out: Path, results: dict) -> None:
    table = render(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(f"# Reliability of `edge-inspect serve`\n\n{results['machine']}; "
                                      f"`{results['command'].strip()}`\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
