"""``edge-inspect demo``: the offline demo, a camera stream scored live, no downloaded weights.

1. Builds the demo bundle when none exists (``bundles/textile-demo``): the weight-free
   ``texture`` backbone + few-shot memory fit on K = 4 nominal textile images of
   ``conformal-clip-data`` (no defective image seen), threshold calibrated for a 1 %
   false-alarm rate on 100 other nominal images, exported with the parity gate.
2. Replays a shuffled mix of held-out nominal, local-defect and global-defect images as a
   camera (its own process) over ZeroMQ at ``--fps``, through the runtime pipeline (ONNX
   Runtime), with ``/metrics`` served and anomalous frames captured.
3. Shows live scores and ends with a summary: frames, drops, AUROC of the streamed scores
   per defect kind, decisions at the threshold, p50/p99 end-to-end latency, p50 per stage,
   achieved frame rate. Writes ``summary.json``, ``stream_scores.png`` and ``captures/``.

``--rgbd`` runs the same product on the generated RGB-D task instead: PIRN on a tiny
random DINOv2 (``configs/pirn/tiny-rgbd.yaml``), trained on 16 normal scenes (about a minute
on 2 cores), exported as a two-plane bundle (``bundles/rgbd-demo``), and a synthetic RGB-D
camera streaming normal scenes, geometry-only dents and colour-only stains (``rgb`` + ``xyz``
planes in each message); the summary reports each defect kind.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEMO_CONFIG = CONFIGS / "memory" / "textile-texture.yaml"
RGBD_CONFIG = CONFIGS / "pirn" / "tiny-rgbd.yaml"
NORMAL = "nominal"  # the summary's name for normal frames in either demo
TEXTILE_DEFECTS = ("local", "global")
log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rgbd", action="store_true",
                        help="the generated RGB-D task with PIRN (two planes) instead of the textiles")
    parser.add_argument("--bundle", type=Path, default=None,
                        help="bundle to stream with (built here when missing; default "
                             "bundles/textile-demo, with --rgbd bundles/rgbd-demo)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the bundle even if present")
    parser.add_argument("--shots", type=int, default=4,
                        help="nominal images in the memory (textile demo)")
    parser.add_argument("--per-kind", type=int, default=150,
                        help="streamed images per kind (nominal, local, global)")
    parser.add_argument("--fps", type=float, default=25.0, help="camera frame rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=9108, help="/metrics port (0: any free port)")
    parser.add_argument("--out", type=Path, default=Path("demo-output"),
                        help="folder for summary.json, stream_scores.png and captures/")


def build_bundle(bundle: Path, shots: int, seed: int) -> tuple[Path, set[str]]:
    """Enroll, calibrate and export the demo model; returns it and the files it has seen."""
    from edge_inspect.export.bundle_writer import export_bundle
    from edge_inspect.trainer.config import RunConfig
    from edge_inspect.trainer.evaluate import evaluate_run

    cfg = RunConfig.from_yaml(DEMO_CONFIG, [
        f"shots={shots}", f"seed={seed}", "eval.limit=60", "eval.overlays=0",
        "data.target=[{name: textile, kind: textile, kinds: [nominal, local]}]"])
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        (run / "config.yaml").write_text(cfg.to_yaml())
        evaluate_run(cfg, None, run / "eval-demo")
        export_bundle(run, bundle, run / "eval-demo" / "enrolled" / "textile-textile.safetensors")
    return bundle, seen_images(cfg)


def seen_images(cfg) -> set[str]:
    from edge_inspect.trainer.evaluate import split_normals

    spec = cfg.target_data[0]
    test = spec.open()
    shots, calib, _ = split_normals(cfg, spec, test, None, "textile")
    return {str(ds.records[i].image) for ds, i in shots + calib}


def build_rgbd_bundle(bundle: Path, seed: int) -> Path:
    """Train PIRN on the generated task's normal shots, calibrate, export (two planes)."""
    import torch

    from edge_inspect.export.bundle_writer import export_bundle
    from edge_inspect.trainer.config import RunConfig
    from edge_inspect.trainer.evaluate import evaluate_run
    from edge_inspect.trainer.fit import train

    cfg = RunConfig.from_yaml(RGBD_CONFIG, [f"seed={seed}", "eval.overlays=0"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny decoder's many small ops run fastest on one thread
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp)
            ckpt = train(cfg, run)
            evaluate_run(cfg, ckpt, run / "eval-demo")
            (enrolled,) = (run / "eval-demo" / "enrolled").glob("*.safetensors")
            export_bundle(run, bundle, enrolled)
    finally:
        torch.set_num_threads(threads)
    return bundle


def stream_set(seen: set[str], per_kind: int, seed: int) -> list[tuple[Path, str]]:
    from edge_inspect.trainer.data import TextileImages

    rng = np.random.default_rng(seed + 1000)
    items = []
    for kind in TextileImages.KINDS:
        paths = [r.image for r in TextileImages([kind]).records if str(r.image) not in seen]
        pick = rng.choice(len(paths), size=min(per_kind, len(paths)), replace=False)
        items += [(paths[i], kind) for i in pick]
    order = rng.permutation(len(items))
    return [items[i] for i in order]


def run(args: argparse.Namespace) -> int:
    from edge_inspect.runtime.health import port_free
    from edge_inspect.runtime.orchestrator import Runtime
    from edge_inspect.runtime.profile import Profile
    from edge_inspect.runtime.transport.sockets import Receiver, TransportConfig
    from edge_inspect.runtime.transport.wire import decode
    from edge_inspect.trainer.config import RunConfig

    args.bundle = args.bundle or Path("bundles/rgbd-demo" if args.rgbd else "bundles/textile-demo")
    if args.rebuild or not (args.bundle / "manifest.json").exists():
        if args.bundle.exists():
            import shutil

            shutil.rmtree(args.bundle)
        if args.rgbd:
            print(f"building the RGB-D demo bundle {args.bundle} (PIRN trained on 16 normal scenes) ...")
            build_rgbd_bundle(args.bundle, args.seed)
        else:
            print(f"building the demo bundle {args.bundle} (K = {args.shots} nominal shots) ...")
            _, seen = build_bundle(args.bundle, args.shots, args.seed)
    elif not args.rgbd:
        cfg = RunConfig.from_dict(json.loads((args.bundle / "manifest.json").read_text())["config"])
        seen = seen_images(cfg)
    if args.rgbd:
        from edge_inspect.runtime.sources import rgbd_frame_kind

        camera, defects, model = "rgbd", ("dent", "stain"), "rgbd-demo"
        count = 3 * args.per_kind
        items = [(None, NORMAL if rgbd_frame_kind(i) == "good" else rgbd_frame_kind(i))
                 for i in range(count)]
        size = json.loads((args.bundle / "manifest.json").read_text())["inputs"][0]["size"][0]
        source = {"id": camera, "source": "rgbd_synthetic", "size": size, "count": count,
                  "fps": args.fps, "seed": args.seed + 1000}
    else:
        camera, defects, model = "textile", TEXTILE_DEFECTS, "textile-demo"
        items = stream_set(seen, args.per_kind, args.seed)
        source = {"id": camera, "source": "folder", "images": [str(p) for p, _ in items],
                  "fps": args.fps}
    port = args.port if port_free("127.0.0.1", args.port) else 0
    if port != args.port:
        print(f"port {args.port} is busy; serving /metrics on a free port instead")
    args.out.mkdir(parents=True, exist_ok=True)
    endpoints = Path(tempfile.mkdtemp(prefix="edge-inspect-demo-"))
    cfg = Profile.from_dict(dict(
        bundle=str(args.bundle), mode="live", endpoint_dir=str(endpoints), model_name=model,
        cameras=[source],
        pipeline={"max_batch": 4, "max_wait_ms": 5, "heatmap_size": [62, 62]},
        captures={"folder": str(args.out / "captures"), "retain": 50},
        http={"host": "127.0.0.1", "port": port}), "demo")
    runtime = Runtime(cfg).start(sources=False)
    # subscribed before the first frame: a subscriber that dials before the results are bound
    # retries with a growing back-off and missed every result of a slow start (CI saw it)
    try:
        results = Receiver(TransportConfig(cfg.results_endpoint, mode="live", hwm=10000),
                           await_connection=True)
    except BaseException:
        runtime.shutdown()
        raise
    if not results.wait_connected(10_000):
        results.close()
        runtime.shutdown()
        raise SystemExit(f"the demo could not subscribe to the results at {cfg.results_endpoint} within "
                         "10 s; is the endpoint folder writable?")
    runtime.start_sources()
    what = "RGB-D frames (rgb + xyz)" if args.rgbd else "images"
    print(f"streaming {len(items)} {what} at {args.fps:g} fps over ZeroMQ; metrics on "
          f"http://127.0.0.1:{runtime.health.port}/metrics")
    got: dict[int, dict] = {}
    latency: dict[int, float] = {}
    t_first = t_last = None
    idle_since = time.monotonic()
    threshold = runtime.bundle.threshold
    try:
        while len(got) < len(items):
            parts = results.recv(200)
            now = time.monotonic()
            if parts is None:
                runtime.check()
                # the camera has sent everything: wait for the pipeline's last results (a cold
                # start on a slow box can hold them for seconds), then stop
                if runtime.sources_done() and now - idle_since > RESULT_WAIT_S:
                    break
                continue
            idle_since = now
            msg = decode(parts)
            got[msg.seq] = msg.header
            latency[msg.seq] = (time.monotonic_ns() - msg.t_capture_ns) / 1e9
            t_first = t_first or now
            t_last = now
            if len(got) % 10 == 0 or len(got) == len(items):
                kind = items[msg.seq][1]
                flag = "ANOMALY" if msg.header["label"] else "ok"
                sys.stdout.write(f"\rframe {len(got):4d}/{len(items)}  {kind:8s} score "
                                 f"{msg.header['score']:7.3f}  {flag:7s}  "
                                 f"e2e {1000 * latency[msg.seq]:6.1f} ms")
                sys.stdout.flush()
    finally:
        runtime.shutdown()
        results.close()
    print()
    if not got:
        raise SystemExit(f"edge-inspect demo: no result arrived from {len(items)} frames sent; rerun with "
                         "--verbose to see the runtime's log")
    summary = summarize(items, got, latency, runtime, threshold, t_first, t_last, camera, defects)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_stream(args.out / "stream_scores.png", items, got, threshold, defects)
    print_summary(summary)
    print(f"\nsummary.json, stream_scores.png and captures/ in {args.out}/")
    return 0


RESULT_WAIT_S = 10.0  # quiet seconds after the camera finished before the demo stops listening


def summarize(items, got, latency, runtime, threshold, t_first, t_last, camera: str = "textile",
              defects: tuple[str, ...] = TEXTILE_DEFECTS) -> dict:
    from edge_inspect.runtime.metrics import CAMERA_DROP_REASONS
    from edge_inspect.trainer.metrics import auroc

    scores = {k: np.array([got[i]["score"] for i in got if items[i][1] == k])
              for k in (NORMAL, *defects)}
    m = runtime.metrics.registry
    drops = {r: m.get_sample_value("edge_inspect_frames_dropped_total",
                                   {"camera": camera, "reason": r}) or 0.0
             for r in CAMERA_DROP_REASONS}
    stages = {s: float(np.median([h["stages"][s] for h in got.values()]))
              for s in ("transport", "preprocess", "infer", "postprocess")}
    lat = np.array(list(latency.values()))
    # frames neither scored nor counted as a drop: results lost between the runtime and the demo
    missing = max(0, len(items) - len(got) - int(sum(drops.values())))
    out = {"frames_sent": len(items), "frames_scored": len(got), "drops": drops,
           "results_missing": missing,
           "fps": (len(got) - 1) / (t_last - t_first) if len(got) > 1 else 0.0,
           "threshold": threshold,
           "e2e_latency_ms": {"p50": 1000 * float(np.percentile(lat, 50)),
                              "p99": 1000 * float(np.percentile(lat, 99))},
           "stage_p50_ms": {k: 1000 * v for k, v in stages.items()}, "defect_kinds": list(defects)}
    for kind in defects:
        y = np.r_[np.zeros(len(scores["nominal"])), np.ones(len(scores[kind]))]
        s = np.r_[scores["nominal"], scores[kind]]
        out[f"auroc_nominal_vs_{kind}"] = auroc(y, s) if 0 < y.sum() < len(y) else None
        out[f"missed_{kind}"] = float((scores[kind] <= threshold).mean()) if len(scores[kind]) else None
    out["false_alarms_nominal"] = float((scores["nominal"] > threshold).mean())
    return out


def print_summary(s: dict) -> None:
    d = s["drops"]
    print(f"frames: {s['frames_sent']} sent, {s['frames_scored']} scored, dropped stale "
          f"{d['stale']:.0f} / hwm {d['hwm']:.0f} / malformed {d['malformed']:.0f}; "
          f"{s['fps']:.1f} frames/s")
    if s.get("results_missing"):
        print(f"{s['results_missing']} frames neither scored nor dropped: their results never reached "
              "the demo")
    kinds = s.get("defect_kinds", TEXTILE_DEFECTS)

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    print("AUROC of the streamed scores: "
          + ", ".join(f"nominal vs {k} {num(s[f'auroc_nominal_vs_{k}'], '.4f')}" for k in kinds))
    print(f"at the threshold {s['threshold']:.4g}: false alarms {s['false_alarms_nominal']:.1%} of "
          "nominal, missed " + " / ".join(f"{num(s[f'missed_{k}'], '.1%')} {k}" for k in kinds))
    st = s["stage_p50_ms"]
    print(f"latency capture -> result: p50 {s['e2e_latency_ms']['p50']:.1f} ms, p99 "
          f"{s['e2e_latency_ms']['p99']:.1f} ms; p50 per stage: transport {st['transport']:.2f}, "
          f"preprocess {st['preprocess']:.2f}, infer {st['infer']:.2f}, postprocess "
          f"{st['postprocess']:.2f} ms")


def plot_stream(path: Path, items, got, threshold, defects: tuple[str, ...] = TEXTILE_DEFECTS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.4))
    colours = dict(zip((NORMAL, *defects), ("tab:blue", "tab:red", "tab:orange", "tab:green"),
                       strict=False))
    for kind, colour in colours.items():
        seqs = [i for i in sorted(got) if items[i][1] == kind]
        ax.scatter(seqs, [got[i]["score"] for i in seqs], s=8, c=colour, label=kind)
    ax.axhline(threshold, color="k", ls="--", lw=1, label="threshold")
    ax.set(xlabel="frame (stream order)", ylabel="image score", title="streamed scores")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
