"""``edge-inspect predict``: score images from disk with a bundle, without torch.

The Python API is the same three calls the command makes::

    from edge_inspect.runtime import load_bundle, open_engine, predict

    engine = open_engine(load_bundle("bundles/textile"))
    for p in predict(engine, ["images/"]):
        print(p.path.name, p.score, p.label)

Each image is fitted to the bundle's input plane exactly as ``serve`` fits camera frames
and scored in batches; the verdict is ``score > threshold`` with the bundle's calibrated
threshold (none in a bundle exported without calibration: the label is then empty). An
RGB-D bundle takes each further plane from a folder (``planes={"xyz": folder}``) holding a
file with the image's stem (``.tiff``/``.tif`` as MVTec 3D-AD's point maps, or ``.npy``).
A bundle that carries state between frames scores every image from its initial state
(the images are independent, not a sequence). The command writes ``predictions.csv``
(path, score, label, threshold, calibrated score) and overlays
(:mod:`runtime.overlay`) into a new folder; it never overwrites one.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edge_inspect.runtime.bundle import load_bundle
from edge_inspect.runtime.metrics import calibrated_score
from edge_inspect.runtime.overlay import render_overlay
from edge_inspect.runtime.preprocess import IMAGE_SUFFIXES, fit_files, fit_image

PLANE_SUFFIXES = (".tiff", ".tif", ".npy")
OVERLAYS = ("anomalous", "all", "none")
CSV_NAME = "predictions.csv"


@dataclass
class Prediction:
    """One scored image. ``label`` and ``threshold`` are None when the bundle has no threshold."""

    path: Path
    score: float
    label: bool | None
    threshold: float | None
    calibrated_score: float  # the score mapped to [0, 1] with the threshold at 0.5
    frame: np.ndarray  # the fitted RGB frame the engine saw (H, W, 3) uint8
    anomaly_map: np.ndarray  # (H, W) float32


def image_paths(inputs: Iterable[str | Path]) -> list[Path]:
    """Image files named, and the images directly inside named folders (sorted)."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{p} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            paths += found
        elif p.is_file():
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                raise ValueError(f"{p} is not an image ({', '.join(IMAGE_SUFFIXES)})")
            paths.append(p)
        else:
            raise FileNotFoundError(f"{p} not found: name image files or folders of images")
    if not paths:
        raise ValueError("no images given: name image files or folders of images")
    return paths


def read_plane(path: Path, channels: int) -> np.ndarray:
    """A geometry plane file as float32 ``(H, W, channels)``."""
    if path.suffix == ".npy":
        array = np.load(path, allow_pickle=False)
    else:
        import tifffile

        try:
            array = tifffile.imread(path)
        except Exception as exc:  # tifffile raises many types for a broken file
            raise ValueError(f"cannot read plane {path}: {exc}") from None
        if array.ndim == 3 and array.shape[0] == channels and array.shape[-1] != channels:
            array = array.transpose(1, 2, 0)  # planar TIFF
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] != channels or array.dtype.kind not in "fiu":
        raise ValueError(f"plane {path} is {array.dtype} {array.shape}; the bundle expects "
                         f"numbers shaped (H, W, {channels})")
    return np.ascontiguousarray(array, dtype=np.float32)


def plane_files(bundle, images: list[Path], planes: dict[str, str | Path] | None) -> dict[str, list[Path]]:
    """For each of the bundle's further planes, the file beside each image (same stem)."""
    wanted = [p.name for p in bundle.inputs[1:]]
    given = dict(planes or {})
    if given:
        stems: dict[str, Path] = {}
        for image in images:
            if image.stem in stems:
                raise ValueError(f"{stems[image.stem]} and {image} share the name {image.stem!r}, so "
                                 "their plane files would be the same: with --plane, score one "
                                 "folder of images at a time")
            stems[image.stem] = image
    unknown = sorted(set(given) - set(wanted))
    if unknown:
        raise ValueError(f"the bundle has no input plane {unknown}; its planes after the image: {wanted}")
    missing = [n for n in wanted if n not in given]
    if missing:
        raise ValueError(f"the bundle also takes {missing}: give a folder for each, e.g. "
                         f"--plane {missing[0]}=DIR (a file per image with the image's stem)")
    out = {}
    for name, folder in given.items():
        files = {}
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"plane folder {folder} ({name}) not found")
        for f in folder.iterdir():
            if f.suffix.lower() in PLANE_SUFFIXES:
                files.setdefault(f.stem, f)
        paths = []
        for image in images:
            if image.stem not in files:
                raise FileNotFoundError(f"no {name} plane for {image.name} in {folder} (expected "
                                        f"{image.stem}{PLANE_SUFFIXES[0]} or .npy)")
            paths.append(files[image.stem])
        out[name] = paths
    return out


def predict(engine, inputs: Iterable[str | Path], planes: dict[str, str | Path] | None = None,
            batch: int = 8, progress: bool = False,
            skipped: list | None = None) -> Iterator[Prediction]:
    """Score image files or folders with ``engine`` (from :func:`open_engine`), in batches.

    An image (or plane file) that cannot be read raises ``ValueError``; with a ``skipped``
    list it is appended there as ``(path, reason)`` instead and the rest are scored."""
    from tqdm import tqdm

    bundle = engine.bundle
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    images = image_paths(inputs)
    extra = plane_files(bundle, images, planes)
    image_plane = bundle.image
    threshold = bundle.threshold
    score_name, map_name = bundle.score_output, bundle.map_output
    bar = tqdm(total=len(images), desc="predict", unit="img", disable=not progress, file=sys.stderr)
    try:
        for start in range(0, len(images), batch):
            chunk, fitted = [], {spec.name: [] for spec in bundle.inputs}
            for j in range(start, min(start + batch, len(images))):
                try:
                    row = {image_plane.name: fit_files([images[j]], image_plane)[0]}
                    for spec in bundle.inputs[1:]:
                        row[spec.name] = fit_image(read_plane(extra[spec.name][j], spec.channels),
                                                   (spec.height, spec.width), spec.fit, spec.interpolation)
                except ValueError as exc:
                    if skipped is None:
                        raise
                    skipped.append((images[j], str(exc)))
                    continue
                chunk.append(images[j])
                for name, plane in row.items():
                    fitted[name].append(plane)
            bar.update(min(start + batch, len(images)) - start - len(chunk))
            if not chunk:
                continue
            feeds = {name: np.stack(planes_) for name, planes_ in fitted.items()}
            frames = feeds[image_plane.name]
            for s in bundle.state:  # independent images: every one from the initial state
                feeds[s.input] = np.stack([s.initial] * len(chunk))
            out = engine.infer(feeds, [score_name, map_name])
            for i, path in enumerate(chunk):
                score = float(out[score_name][i])
                label = None if threshold is None else bool(score > threshold)
                yield Prediction(path, score, label, threshold, calibrated_score(score, threshold),
                                 frames[i], np.asarray(out[map_name][i], np.float32))
            bar.update(len(chunk))
    finally:
        bar.close()


# -- the command ---------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, help="image files and/or folders of images")
    parser.add_argument("--bundle", type=Path, required=True, help="bundle folder (from export or enroll)")
    parser.add_argument("--out", type=Path, required=True,
                        help="new folder for predictions.csv and overlays/ (never overwritten)")
    parser.add_argument("--overlays", choices=OVERLAYS, default="anomalous",
                        help="which images get an overlay picture (default: anomalous)")
    parser.add_argument("--plane", action="append", default=[], metavar="NAME=DIR",
                        help="RGB-D bundles: a folder of the named plane's files, one per image with "
                             "its stem (.tiff or .npy); repeat for each plane")
    parser.add_argument("--batch", type=int, default=8, help="images per engine call")
    parser.add_argument("--backend", default="ort", help="engine backend: ort (default) or tensorrt")


def _planes(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--plane {item!r} must look like NAME=DIR (e.g. xyz=scans/xyz)")
        if name in out:
            raise ValueError(f"--plane {name} given twice; give each plane once")
        out[name] = folder
    return out


def run(args: argparse.Namespace) -> int:
    from edge_inspect.runtime.engines import open_engine

    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise ValueError(f"{args.out} already exists and is not an empty folder; predictions are "
                         "never written over anything: choose a new --out")
    planes = _planes(args.plane)
    bundle = load_bundle(args.bundle)
    engine = open_engine(bundle, args.backend)
    plane_files(bundle, image_paths(args.images), planes)  # wrong paths: before --out appears
    args.out.mkdir(parents=True, exist_ok=True)
    overlays = args.out / "overlays"
    n = n_bad = 0
    skipped: list = []
    t0 = time.perf_counter()
    with (args.out / CSV_NAME).open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "score", "label", "threshold", "calibrated_score"])
        for p in predict(engine, args.images, planes, args.batch, progress=True, skipped=skipped):
            n += 1
            n_bad += bool(p.label)
            label = "" if p.label is None else ("anomalous" if p.label else "normal")
            threshold = "" if p.threshold is None else f"{p.threshold:.6g}"
            writer.writerow([str(p.path), f"{p.score:.6g}", label, threshold, f"{p.calibrated_score:.4f}"])
            if args.overlays == "all" or (args.overlays == "anomalous" and p.label):
                overlays.mkdir(exist_ok=True)
                picture = render_overlay(p.frame, p.anomaly_map, p.score, p.threshold, p.label, p.path.name)
                cv2.imwrite(str(overlays / f"{n:05d}-{p.path.stem}.png"), picture)
    seconds = time.perf_counter() - t0
    verdict = (f"{n_bad} anomalous (threshold {bundle.threshold:.4g})" if bundle.threshold is not None
               else "no threshold in this bundle, so no labels (export an enrolled / calibrated checkpoint)")
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    unread = f"; {len(skipped)} unreadable, skipped (listed above)" if skipped else ""
    print(f"scored {n} images in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f} img/s): {verdict}; "
          f"{args.out / CSV_NAME}{unread}")
    return 0


__all__ = ["Prediction", "image_paths", "plane_files", "predict", "read_plane"]
