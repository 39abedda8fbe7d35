"""``edge-inspect enroll``: rebuild a bundle's few-shot memory and threshold, without torch.

K normal images go through the bundle's own engine; the memory is rebuilt from its feature
outputs (:mod:`runtime.enrollment`), with the reference the recipe asks for (the memory
head's shift detector and border scales: ``reference_images`` further normals), and the threshold
recalibrated for the target false-alarm rate on held-out normal images scored with the new
memory (per detector when the recipe names detectors: their thresholds go into the memory,
the decision threshold is 1). The result is a new
bundle folder (model and parity report hard-linked or copied, new ``memory.npz`` and
manifest), written under a temporary name and renamed: the old bundle stays as it was.
``--append`` keeps the bundle's memory entries and adds the shots after them (recipes that
can grow: a memory spanning categories, where a new part is a new category's shots).
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
from edge_inspect.runtime.calibration import calibrate_detectors, calibrate_false_alarm_rate, normals_needed
from edge_inspect.runtime.enrollment import APPENDABLE, build_memory, quarter_turns, reference_images
from edge_inspect.runtime.preprocess import IMAGE_SUFFIXES, fit_files


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, required=True, help="bundle exported with a memory")
    parser.add_argument("--normal-dir", type=Path, required=True, help="folder of normal images")
    parser.add_argument("--shots", type=int, required=True, help="K normal images for the memory")
    parser.add_argument("--false-alarm-rate", type=float, default=None,
                        help="target for the threshold (default: the bundle's, else 0.01)")
    parser.add_argument("--calibration-images", type=int, default=400,
                        help="most held-out normal images used to calibrate (the rest unused)")
    parser.add_argument("--reference-images", type=int, default=None,
                        help="held-out normal images for the memory's reference (default: the "
                             "bundle's recipe, e.g. 100 for the memory head's shift detector and "
                             "border scales)")
    parser.add_argument("--seed", type=int, default=0, help="which images become shots")
    parser.add_argument("--out", type=Path, default=None,
                        help="new bundle folder (default: <bundle>.enrolled-<UTC time>)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--append", action="store_true",
                        help="add the shots to the bundle's memory instead of replacing it (a "
                             "memory spanning categories, IIPAD: a new part on a running line)")


def _infer(engine, paths: list[Path], outputs: list[str], batch: int,
           turns: int = 1) -> dict[str, np.ndarray]:
    """Outputs for the frames of ``paths`` (and their :func:`quarter_turns`, all turn-0 frames
    first, as the trainer orders them)."""
    # images are read a batch at a time; turned shots (a few images) are read at once
    if turns > 1:
        turned = quarter_turns(fit_files(paths, engine.bundle.image), turns)
        batches = (turned[s:s + batch] for s in range(0, len(turned), batch))
    else:
        batches = (fit_files(paths[s:s + batch], engine.bundle.image) for s in range(0, len(paths), batch))
    parts: dict[str, list[np.ndarray]] = {k: [] for k in outputs}
    for frames in batches:
        out = engine.infer({engine.bundle.image.name: frames}, outputs)
        for k in outputs:
            parts[k].append(out[k])
    return parts


def _features(engine, paths: list[Path], batch: int, turns: int = 1) -> dict[str, np.ndarray]:
    """The bundle's ``feature.*`` outputs for ``paths``, keyed without the prefix."""
    outputs = engine.bundle.feature_outputs
    parts = _infer(engine, paths, [o.name for o in outputs], batch, turns)
    return {o.name.removeprefix("feature."): np.concatenate(parts[o.name],
                                                            axis=list(o.shape).index("batch"))
            for o in outputs}


def enroll(bundle_dir: Path, normal_dir: Path, shots: int, out: Path | None = None,
           false_alarm_rate: float | None = None, calibration_images: int = 400, seed: int = 0,
           batch: int = 8, reference: int | None = None, append: bool = False) -> Path:
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
    recipe = bundle.memory_recipe or {}
    n_ref = reference_images(recipe) if reference is None else reference
    if reference_images(recipe) and n_ref < 1:
        raise ValueError(f"{bundle_dir}'s memory fits a reference on held-out normal images: "
                         "--reference-images must be at least 1")
    if not reference_images(recipe) and n_ref:
        raise ValueError(f"{bundle_dir}'s memory fits no reference: drop --reference-images")
    detectors, shares = recipe.get("detectors") or [], recipe.get("detector_shares") or [1.0]
    tails = recipe.get("detector_tails")
    order = np.random.default_rng(seed).permutation(len(files))
    shot_files = [files[i] for i in order[:shots]]
    ref_files = [files[i] for i in order[shots:shots + n_ref]]
    calib_files = [files[i] for i in order[shots + n_ref:shots + n_ref + calibration_images]]
    old = m.get("threshold") or {}
    target = false_alarm_rate or old.get("target_false_alarm_rate") or 0.01
    need = normals_needed(target, shares, tails)
    if len(calib_files) < need:
        split = f" split {'/'.join(f'{s:g}' for s in shares)} over {detectors}" if detectors else ""
        ref = f" + {n_ref} reference" if n_ref else ""
        raise ValueError(f"{len(calib_files)} held-out normal images cannot calibrate a false-alarm "
                         f"rate of {target}{split}: put at least {shots + n_ref + need} images "
                         f"({shots} shots{ref} + {need}) in {normal_dir}, pass --false-alarm-rate "
                         "or --calibration-images")

    if append:  # refused before any image is scored
        if recipe.get("kind") not in APPENDABLE:
            raise ValueError(f"--append: {bundle_dir}'s {recipe.get('kind')} memory holds one part's "
                             "shots and cannot grow; enroll without --append to replace it")
        k, cap = int(recipe["retrieve"]), int(recipe["capacity"])
        n_old = int((bundle.memory["valid"] > 0.5).sum())
        if shots < k:
            raise ValueError(f"--append: a new category needs at least {k} shots (the bundle "
                             f"retrieves {k} memory entries per frame), got --shots {shots}")
        if n_old + shots > cap:
            raise ValueError(f"--append: {n_old} entries + {shots} shots exceed the memory's {cap} "
                             "rows: evaluate the run with --set head.capacity=<more> and export "
                             "that enrolled checkpoint")

    engine = open_engine(bundle)
    turns = int(recipe.get("shot_turns", 1))
    memory = build_memory(recipe, _features(engine, shot_files, batch, turns),
                          _features(engine, ref_files, batch) if ref_files else None,
                          dict(bundle.memory) if append else None)
    if set(memory) != set(bundle.memory):
        raise BundleError(f"enrollment built {sorted(memory)} but the bundle's memory has "
                          f"{sorted(bundle.memory)}; re-export the bundle")
    if recipe.get("kind") in APPENDABLE:  # fixed-size graph inputs: the shapes must stay
        wrong = {k: (v.shape, bundle.memory[k].shape) for k, v in memory.items()
                 if v.shape != bundle.memory[k].shape}
        if wrong:
            raise BundleError(f"enrollment built memory shapes that differ from the graph's: {wrong}; "
                              "re-export the bundle")
    bundle.memory = memory
    if detectors:
        name = "feature.detectors"
        scores = np.concatenate(_infer(engine, calib_files, [name], batch)[name])
        cal = calibrate_detectors(scores, detectors, shares, target, tails)
        memory["detector_threshold"] = np.array([cal.detectors[d]["threshold"] for d in detectors],
                                                np.float32)
    else:
        score = bundle.score_output
        scores = np.concatenate(_infer(engine, calib_files, [score], batch)[score])
        cal = calibrate_false_alarm_rate(scores, target)
    calibration = cal.as_dict()
    if append and old.get("threshold") is not None and old["threshold"] > calibration["threshold"]:
        # calibrated on the new category alone: keep the earlier categories' (higher) threshold
        calibration["new_category_threshold"] = calibration["threshold"]
        calibration["threshold"] = float(old["threshold"])
        calibration["kept"] = "the bundle's threshold (higher), so earlier categories keep their rate"

    out = Path(out or f"{bundle_dir}.enrolled-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    with staged_bundle(out) as tmp:
        for name in m["files"]:
            if name != m["memory"]["file"]:
                _link_or_copy(bundle.root / name, tmp / name)
        np.savez(tmp / m["memory"]["file"], **memory)
        new = dict(m)
        new["memory"] = dict(m["memory"], arrays={k: list(v.shape) for k, v in memory.items()})
        # K shots, or every image in a memory spanning categories (as the exporter counts)
        new["shots"] = int((memory["valid"] > 0.5).sum()) if "valid" in memory else shots
        new["threshold"] = calibration
        new["enrollment"] = {"tool": "edge-inspect enroll (no torch)", "from_bundle": str(bundle_dir),
                             "normal_dir": str(normal_dir), "shots": [p.name for p in shot_files],
                             "reference_images": [p.name for p in ref_files],
                             "calibration_images": len(calib_files), "seed": seed, "append": append,
                             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if append:  # the earlier categories' enrollment stays on record
            new["enrollment"]["earlier"] = m.get("enrollment")
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
                 args.calibration_images, args.seed, args.batch, args.reference_images, args.append)
    m = json.loads((out / MANIFEST).read_text())
    t = m["threshold"]
    n_ref = len(m["enrollment"]["reference_images"])
    ref = f", {n_ref} reference normal images" if n_ref else ""
    added = " added to the memory" if args.append else ""
    print(f"new bundle: {out} ({args.shots} shots{added}{ref}; old bundle kept at {args.bundle})")
    if (m["memory"].get("recipe") or {}).get("kind") in APPENDABLE and not args.append:
        print("note: the memory now holds only these shots (earlier categories were replaced); "
              "--append adds a category instead")
    if t.get("kept"):
        print(f"threshold kept at the bundle's {t['threshold']:.6g} (the new category alone gave "
              f"{t['new_category_threshold']:.6g})")
    print(f"threshold {t['threshold']:.6g} for a {t['target_false_alarm_rate']:.2%} false-alarm rate "
          f"({t['n_normal']} held-out normal images)")
    for name, d in (t.get("detectors") or {}).items():
        print(f"  detector {name}: threshold {d['threshold']:.6g} for "
              f"{d['target_false_alarm_rate']:.2%} of the false alarms")
    return 0
