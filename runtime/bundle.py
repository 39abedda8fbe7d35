"""Model bundles: read and check a bundle folder before any engine touches it.

A bundle (written by ``edge-inspect export``) is a folder with ``model.onnx``,
``manifest.json``, ``parity.json`` and, for few-shot methods, ``memory.npz`` (named arrays
fed to the graph's ``memory.<name>`` inputs; DESIGN names a single ``memory.npy``, but the
memory head needs several arrays). The manifest is the contract between export and the
runtime: input plane, outputs and their meaning, threshold, sha256 of every file.

Every problem is a :class:`BundleError` naming the file and the fix: a missing file, a
checksum mismatch, an unknown schema version, a manifest without a required field.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(ValueError):
    """A bundle that cannot be served, with the reason and the fix."""


def refuse_existing(out: Path) -> None:
    """Bundles are versions: a new one never replaces a folder that exists."""
    if Path(out).exists():
        raise FileExistsError(f"{out} exists; choose another --out (bundles are never overwritten)")


@contextmanager
def staged_bundle(out: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``out``, renamed to ``out`` when the block succeeds and
    removed when it fails: a bundle is either complete or absent."""
    out = Path(out)
    refuse_existing(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        load_bundle(tmp)  # the runtime's own reader accepts it before it becomes visible
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class InputPlane:
    """The image input: ``(batch, height, width, 3)`` uint8 RGB unless the manifest says otherwise."""

    name: str
    height: int
    width: int
    layout: str
    dtype: str
    fit: str
    normalization: dict

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, 3)


@dataclass
class Bundle:
    """A checked bundle: manifest, paths and the memory arrays (if any)."""

    root: Path
    manifest: dict
    image: InputPlane
    memory: dict[str, np.ndarray]

    @property
    def model_path(self) -> Path:
        return self.root / self.manifest["model"]

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.manifest["outputs"]]

    @property
    def threshold(self) -> float | None:
        t = self.manifest.get("threshold")
        return None if t is None else float(t["threshold"])

    def feeds(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Graph inputs for a batch: the checked images plus the memory arrays."""
        return {self.image.name: check_images(self.image, images)} | {
            f"memory.{k}": v for k, v in self.memory.items()}


def check_images(plane: InputPlane, images: np.ndarray) -> np.ndarray:
    """Raise a clear error for a batch the graph would reject deep inside ONNX Runtime."""
    if not isinstance(images, np.ndarray):
        raise BundleError(f"images must be a numpy array, got {type(images).__name__}")
    if images.ndim == 3:
        images = images[None]
    if images.dtype != np.dtype(plane.dtype):
        raise BundleError(f"input {plane.name!r} needs dtype {plane.dtype}, got {images.dtype}; "
                          "pass the fitted RGB frame as uint8")
    if images.ndim != 4 or images.shape[1:] != plane.shape:
        raise BundleError(f"input {plane.name!r} needs (batch, {plane.height}, {plane.width}, 3) "
                          f"{plane.layout}, got {images.shape}; fit frames to the bundle's size "
                          f"first ({plane.fit})")
    return np.ascontiguousarray(images)


REQUIRED = ("schema_version", "method", "model", "input", "outputs", "files")


def load_bundle(root: str | Path, verify: bool = True) -> Bundle:
    """Read ``root/manifest.json``, check the schema and every file's sha256, load the memory."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{root} is not a bundle: {MANIFEST} is missing (make one with "
                          "`edge-inspect export`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}); re-export the bundle") from exc
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise BundleError(f"{path} lacks {missing}; re-export the bundle")
    version = manifest["schema_version"]
    if version != SCHEMA_VERSION:
        raise BundleError(f"{path} has schema version {version!r}; this runtime reads version "
                          f"{SCHEMA_VERSION}. Re-export with a matching edge-inspect, or upgrade")
    for name, digest in manifest["files"].items():
        file = root / name
        if not file.is_file():
            raise BundleError(f"bundle file {file} is missing (listed in {MANIFEST})")
        if verify and sha256_file(file) != digest:
            raise BundleError(f"{file} does not match its sha256 in {MANIFEST}: the file was "
                              "changed or truncated; re-export or restore it")
    if manifest["model"] not in manifest["files"]:
        raise BundleError(f"{path}: the model file {manifest['model']} is not checksummed")
    spec = manifest["input"]
    try:
        image = InputPlane(spec["name"], int(spec["height"]), int(spec["width"]), spec["layout"],
                           spec["dtype"], spec["fit"], spec["normalization"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{path}: input plane is incomplete ({exc}); re-export") from exc
    memory: dict[str, np.ndarray] = {}
    if manifest.get("memory"):
        mem_file = root / manifest["memory"]["file"]
        if manifest["memory"]["file"] not in manifest["files"]:
            raise BundleError(f"{path}: the memory file is not checksummed")
        with np.load(mem_file, allow_pickle=False) as data:
            memory = {k: data[k] for k in data.files}
        want = set(manifest["memory"]["arrays"])
        if set(memory) != want:
            raise BundleError(f"{mem_file} holds {sorted(memory)}, the manifest expects {sorted(want)}")
    return Bundle(root, manifest, image, memory)
