"""``edge-inspect enroll``: rebuild a bundle's few-shot memory and threshold, without torch.

K normal images go through the bundle's own engine; the memory is rebuilt from its feature
outputs (:mod:`runtime.enrollment`), the threshold recalibrated for the target
false-alarm rate on held-out normal images scored with the new memory. The result is a new
bundle folder (model and parity report hard-linked or copied, new ``memory.npz`` and
manifest), written under a temporary name and renamed: the old bundle stays as it was.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from edge_inspect.runtime.bundle import MANIFEST, BundleError, load_bundle, sha256_file, staged_bundle
from edge_inspect.runtime.calibration import calibrate_false_alarm_rate
from edge_inspect.runtime.enrollment import build_memory
from edge_inspect.runtime.preprocess import IMAGE_SUFFIXES, fit_image, read_rgb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, required=True, help="bundle exported with a memory")
    parser.add_argument("--normal-dir", type=Path, required=True, help="folder of normal images")
    parser.add_argument("--shots", type=int, required=True, help="K normal images for the memory")
    parser.add_argument("--false-alarm-rate", type=float, default=None,
                        help="target for the threshold (default: the bundle's, else 0.01)")
    parser.add_argument("--calibration-images", type=int, default=200,
                        help="most held-out normal images used to calibrate (the rest unused)")
    parser.add_argument("--seed", type=int, default=0, help="which images become shots")
    parser.add_argument("--out", type=Path, default=None,
                        help="new bundle folder (default: <bundle>.enrolled-<UTC time>)")
    parser.add_argument("--batch", type=int, default=8)


def _frames(paths: list[Path], bundle) -> dict[str, np.ndarray]:
    plane = bundle.image
    return {plane.name: np.stack([fit_image(read_rgb(p), (plane.height, plane.width), plane.fit,
                                            plane.interpolation) for p in paths])}


def _infer(engine, paths: list[Path], outputs: list[str], batch: int) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {k: [] for k in outputs}
    for s in range(0, len(paths), batch):
        out = engine.infer(_frames(paths[s:s + batch], engine.bundle), outputs)
        for k in outputs:
            parts[k].append(out[k])
    return parts


def enroll(bundle_dir: Path, normal_dir: Path, shots: int, out: Path | None = None,
           false_alarm_rate: float | None = None, calibration_images: int = 200, seed: int = 0,
           batch: int = 8) -> Path:
    from edge_inspect.runtime.engines import open_engine

    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    if not bundle.memory:
        raise BundleError(f"{bundle_dir} was exported without a few-shot memory (method {m['method']}, "
                          "zero-shot); export an enrolled checkpoint to get a bundle that can enroll")
    if len(bundle.inputs) != 1 or bundle.image.modality != "rgb":
        raise BundleError(f"{bundle_dir} takes planes {[p.name for p in bundle.inputs]}; enrolling from "
                          "an image folder needs a bundle with one RGB plane")
    if not Path(normal_dir).is_dir():
        raise FileNotFoundError(f"normal image folder {normal_dir} not found")
    files = sorted(p for p in Path(normal_dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if shots < 1 or len(files) < shots:
        raise ValueError(f"{normal_dir} holds {len(files)} images; {shots} shots asked (need >= 1)")
    order = np.random.default_rng(seed).permutation(len(files))
    shot_files = [files[i] for i in order[:shots]]
    calib_files = [files[i] for i in order[shots:shots + calibration_images]]
    old = m.get("threshold") or {}
    target = false_alarm_rate or old.get("target_false_alarm_rate") or 0.01
    if len(calib_files) * target < 1:
        raise ValueError(f"{len(calib_files)} held-out normal images cannot calibrate a false-alarm "
                         f"rate of {target}: put at least {int(np.ceil(1 / target)) + shots} images in "
                         f"{normal_dir}, or pass --false-alarm-rate")

    engine = open_engine(bundle)
    feature_outputs = bundle.feature_outputs
    parts = _infer(engine, shot_files, [o.name for o in feature_outputs], batch)
    features = {}
    for o in feature_outputs:
        axis = list(o.shape).index("batch")
        features[o.name.removeprefix("feature.")] = np.concatenate(parts[o.name], axis=axis)
    memory = build_memory(bundle.memory_recipe, features)
    if set(memory) != set(bundle.memory):
        raise BundleError(f"enrollment built {sorted(memory)} but the bundle's memory has "
                          f"{sorted(bundle.memory)}; re-export the bundle")
    bundle.memory = memory
    score = bundle.score_output
    scores = np.concatenate(_infer(engine, calib_files, [score], batch)[score])
    calibration = calibrate_false_alarm_rate(scores, target).as_dict()

    out = Path(out or f"{bundle_dir}.enrolled-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    with staged_bundle(out) as tmp:
        for name in m["files"]:
            if name != m["memory"]["file"]:
                _link_or_copy(bundle.root / name, tmp / name)
        np.savez(tmp / m["memory"]["file"], **memory)
        new = dict(m)
        new["memory"] = dict(m["memory"], arrays={k: list(v.shape) for k, v in memory.items()})
        new["shots"] = shots
        new["threshold"] = calibration
        new["enrollment"] = {"tool": "edge-inspect enroll (no torch)", "from_bundle": str(bundle_dir),
                             "normal_dir": str(normal_dir), "shots": [p.name for p in shot_files],
                             "calibration_images": len(calib_files), "seed": seed,
                             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        new["files"] = {name: sha256_file(tmp / name) for name in m["files"]}
        (tmp / MANIFEST).write_text(json.dumps(new, indent=2))
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def run(args: argparse.Namespace) -> int:
    out = enroll(args.bundle, args.normal_dir, args.shots, args.out, args.false_alarm_rate,
                 args.calibration_images, args.seed, args.batch)
    m = json.loads((out / MANIFEST).read_text())
    t = m["threshold"]
    print(f"new bundle: {out} ({args.shots} shots; old bundle kept at {args.bundle})")
    print(f"threshold {t['threshold']:.6g} for a {t['target_false_alarm_rate']:.2%} false-alarm rate "
          f"({t['n_normal']} held-out normal images)")
    return 0
