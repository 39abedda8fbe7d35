"""Model bundles: read and check a bundle folder before any engine touches it (schema 2).

A bundle (written by ``edge-inspect export`` or ``enroll``) is a folder with ``model.onnx``,
``manifest.json``, ``parity.json`` and, for few-shot methods, ``memory.npz`` (named arrays
fed to the graph's ``memory.<name>`` inputs). The manifest is the contract between export
and the runtime:

* ``inputs``: one entry per input plane (name, modality ``rgb`` / ``depth`` / ``normals`` /
  ``xyz``, dtype, layout, size, channels, fit mode, interpolation, normalization); an RGB-D
  bundle has two;
* ``outputs``: name, **role** (``score``, ``map``, ``feature``, ``state``), shape, dtype; the
  runtime finds the score and the map by role, never by name;
* ``state``: tensors an engine carries between frames of one camera (input name, output
  name, initial value, scope ``camera``, reset rules, and ``gate``: ``always`` carries every
  frame's output, ``normal`` only that of frames scored at or below the bundle's threshold,
  which such a bundle must then have);
* ``memory``: the arrays file, and the enrollment **recipe** with its parameters (so
  ``enroll`` needs no trainer config), with optional per-category banks;
* threshold and how it was calibrated, method, backbone, resolved config, sha256 of every
  file, versions.

Schema-1 bundles (one ``input``, outputs named ``image_score`` / ``anomaly_map``) still load:
:func:`upgrade_schema_1` turns their manifest into the schema-2 form in memory.

Every field is checked before use and every file name is confined to the bundle folder
(a plain name: no ``/``, no ``..``, not absolute) before anything is opened. Every problem
is a :class:`BundleError` naming the bundle, the field and the fix.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)
MANIFEST = "manifest.json"
MODALITIES = ("rgb", "depth", "normals", "xyz")
ROLES = ("score", "map", "feature", "state")
FIT_MODES = ("resize", "center_crop", "short_side_crop")
INTERPOLATIONS = ("bicubic", "bicubic_antialias", "bilinear", "area", "nearest", "none")
GEOMETRY = ("depth", "xyz", "normals")
GEOMETRY_INTERPOLATIONS = ("nearest", "bilinear", "none")
LAYOUTS = ("NHWC",)
DTYPES = ("uint8", "uint16", "float16", "float32")
RESET_RULES = ("reload", "sequence_restart", "command")
STATE_SCOPES = ("camera",)
STATE_GATES = ("always", "normal")
_SHA256 = re.compile(r"[0-9a-f]{64}")


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


def plain_name(name: object) -> bool:
    """A file name that stays inside the bundle folder: no separator, not ``.``/``..``."""
    return (isinstance(name, str) and bool(name) and name not in (".", "..") and "/" not in name
            and "\\" not in name and "\x00" not in name)


@dataclass(frozen=True)
class InputPlane:
    """One graph input fed from a camera plane: ``(batch, height, width, channels)``."""

    name: str
    modality: str
    dtype: str
    layout: str
    height: int
    width: int
    channels: int
    fit: str
    interpolation: str
    normalization: dict

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)

    def as_dict(self) -> dict:
        return {"name": self.name, "modality": self.modality, "dtype": self.dtype,
                "layout": self.layout, "size": [self.height, self.width], "channels": self.channels,
                "fit": self.fit, "interpolation": self.interpolation,
                "normalization": self.normalization}


@dataclass(frozen=True)
class OutputSpec:
    name: str
    role: str
    shape: tuple
    dtype: str
    meaning: str = ""


@dataclass(frozen=True)
class StateSpec:
    """A tensor carried between frames of one camera: fed to ``input``, read from ``output``."""

    name: str
    input: str
    output: str
    initial: np.ndarray = field(compare=False)
    scope: str = "camera"
    reset: tuple[str, ...] = RESET_RULES
    gate: str = "always"  # "normal": carried only from frames scored <= the threshold


@dataclass
class Bundle:
    """A checked bundle: the (schema-2 form of the) manifest, planes, outputs, memory, state."""

    root: Path
    manifest: dict
    inputs: list[InputPlane]
    outputs: list[OutputSpec]
    memory: dict[str, np.ndarray]
    state: list[StateSpec] = field(default_factory=list)
    category_memory: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    schema_read: int = SCHEMA_VERSION

    @property
    def model_path(self) -> Path:
        return self.root / self.manifest["model"]

    @property
    def name(self) -> str:
        return self.manifest.get("name") or self.root.name

    @property
    def image(self) -> InputPlane:
        """The RGB plane (the first plane when none is RGB): what single-camera tools fit."""
        return next((p for p in self.inputs if p.modality == "rgb"), self.inputs[0])

    def plane(self, name: str) -> InputPlane:
        for p in self.inputs:
            if p.name == name:
                return p
        raise BundleError(f"{self.root}: no input plane {name!r}; it has {[p.name for p in self.inputs]}")

    def output(self, role: str) -> str:
        """The name of the one output with ``role`` (``score`` or ``map``)."""
        names = [o.name for o in self.outputs if o.role == role]
        if len(names) != 1:
            raise BundleError(f"{self.root}: expected one {role} output, found {names}; re-export")
        return names[0]

    @property
    def score_output(self) -> str:
        return self.output("score")

    @property
    def map_output(self) -> str:
        return self.output("map")

    @property
    def feature_outputs(self) -> list[OutputSpec]:
        return [o for o in self.outputs if o.role == "feature"]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    @property
    def categories(self) -> list[str]:
        return sorted(self.category_memory)

    @property
    def memory_recipe(self) -> dict | None:
        memory = self.manifest.get("memory")
        return memory.get("recipe") if memory else None

    @property
    def threshold(self) -> float | None:
        t = self.manifest.get("threshold")
        return None if t is None else float(t["threshold"])

    def memory_for(self, category: str | None = None) -> dict[str, np.ndarray]:
        """The memory arrays to feed: a category's bank when given, else the default one."""
        if category is None:
            return self.memory
        if category not in self.category_memory:
            raise BundleError(f"{self.root}: no memory bank for category {category!r}; it has "
                              f"{self.categories} (enroll that category first)")
        return self.category_memory[category]

    def feeds(self, planes: Mapping[str, np.ndarray], category: str | None = None) -> dict[str, np.ndarray]:
        """Graph inputs for a batch: every plane checked, plus the memory arrays.

        ``planes`` maps input names to ``(B, H, W, C)`` (or one ``(H, W, C)``) arrays; state
        inputs, when the bundle declares state, come in the same mapping.
        """
        if not isinstance(planes, Mapping):
            raise BundleError(f"engine feeds must be a mapping of input name -> array (inputs: "
                              f"{[p.name for p in self.inputs]}), got {type(planes).__name__}")
        state_inputs = {s.input for s in self.state}
        unknown = set(planes) - {p.name for p in self.inputs} - state_inputs
        missing = [p.name for p in self.inputs if p.name not in planes]
        if unknown or missing:
            raise BundleError(f"feeds for {self.root.name}: missing planes {missing}, unknown "
                              f"{sorted(unknown)}; the bundle takes {[p.name for p in self.inputs]}")
        out = {p.name: check_plane(p, planes[p.name]) for p in self.inputs}
        batch = {a.shape[0] for a in out.values()}
        if len(batch) != 1:
            raise BundleError(f"planes of one batch must hold the same number of frames, got "
                              f"{ {k: v.shape[0] for k, v in out.items()} }")
        (n,) = batch
        for s in self.state:  # a caller that keeps no state gets every frame from the initial one
            value = planes.get(s.input)
            if value is None:
                value = np.broadcast_to(s.initial, (n, *s.initial.shape))
            out[s.input] = np.ascontiguousarray(value)
        return out | {f"memory.{k}": v for k, v in self.memory_for(category).items()}


def check_plane(plane: InputPlane, frames: np.ndarray) -> np.ndarray:
    """Raise a clear error for a batch the graph would reject deep inside the engine."""
    if not isinstance(frames, np.ndarray):
        raise BundleError(f"input {plane.name!r} must be a numpy array, got {type(frames).__name__}")
    if frames.ndim == 3:
        frames = frames[None]
    if frames.dtype != np.dtype(plane.dtype):
        raise BundleError(f"input {plane.name!r} needs dtype {plane.dtype}, got {frames.dtype}; "
                          f"pass the fitted {plane.modality} frame as {plane.dtype}")
    if frames.ndim != 4 or frames.shape[1:] != plane.shape:
        raise BundleError(f"input {plane.name!r} needs (batch, {plane.height}, {plane.width}, "
                          f"{plane.channels}) {plane.layout}, got {frames.shape}; fit frames to the "
                          f"bundle's size first ({plane.fit})")
    return np.ascontiguousarray(frames)


# -- reading ---------------------------------------------------------------------------------
class _Fields:
    """Typed access to one manifest section; every failure names the bundle and the field."""

    def __init__(self, path: Path, data: object, where: str) -> None:
        self.path, self.where = path, where
        if not isinstance(data, dict):
            self.fail(f"must be an object, got {type(data).__name__}")
        self.data = data

    def fail(self, problem: str):
        raise BundleError(f"{self.path}: {self.where} {problem}; re-export the bundle (or fix the "
                          "manifest)")

    def get(self, key: str, kind, default=...):
        if key not in self.data:
            if default is ...:
                self.fail(f"lacks '{key}'")
            return default
        value = self.data[key]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            self.fail(f"'{key}' must be an integer, got {value!r}")
        if kind is float and (isinstance(value, bool) or not isinstance(value, int | float)
                              or not math.isfinite(value)):
            self.fail(f"'{key}' must be a finite number, got {value!r}")
        if kind not in (int, float) and not isinstance(value, kind):
            self.fail(f"'{key}' must be a {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
        return value

    def choice(self, key: str, allowed: tuple, default=...) -> str:
        value = self.get(key, str, default)
        if value not in allowed:
            self.fail(f"'{key}' is {value!r}; allowed: {list(allowed)}")
        return value

    def file(self, key: str, files: dict) -> str:
        name = self.get(key, str)
        if not plain_name(name):
            self.fail(f"'{key}' names {name!r}, not a plain file name inside the bundle folder")
        if name not in files:
            self.fail(f"'{key}' names {name!r}, which is not checksummed in 'files'")
        return name


def _plane(path: Path, raw: object, i: int) -> InputPlane:
    f = _Fields(path, raw, f"inputs[{i}]")
    size = f.get("size", list)
    if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
        f.fail(f"'size' must be [height, width] of positive integers, got {size!r}")
    channels = f.get("channels", int)
    if not 1 <= channels <= 4:
        f.fail(f"'channels' must be 1..4, got {channels}")
    norm = f.get("normalization", dict)
    modality, interpolation = f.choice("modality", MODALITIES), f.choice("interpolation", INTERPOLATIONS)
    if modality in GEOMETRY and interpolation not in GEOMETRY_INTERPOLATIONS:
        f.fail(f"is a {modality} plane with interpolation {interpolation!r}; geometry takes "
               f"{list(GEOMETRY_INTERPOLATIONS)} (bicubic and area blend depths across edges and holes)")
    return InputPlane(f.get("name", str), modality, f.choice("dtype", DTYPES),
                      f.choice("layout", LAYOUTS), size[0], size[1], channels,
                      f.choice("fit", FIT_MODES), interpolation, norm)


def _output(path: Path, raw: object, i: int) -> OutputSpec:
    f = _Fields(path, raw, f"outputs[{i}]")
    shape = f.get("shape", list)
    return OutputSpec(f.get("name", str), f.choice("role", ROLES), tuple(shape),
                      f.get("dtype", str, "float32"), f.get("meaning", str, ""))


def _arrays_file(root: Path, path: Path, spec: _Fields, files: dict) -> dict[str, np.ndarray]:
    name = spec.file("file", files)
    want = spec.get("arrays", dict)
    with np.load(root / name, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    if set(arrays) != set(want):
        spec.fail(f"expects arrays {sorted(want)} but {name} holds {sorted(arrays)}")
    for key, shape in want.items():
        if not isinstance(shape, list) or list(arrays[key].shape) != shape:
            spec.fail(f"declares array {key!r} with shape {shape!r} but {name} holds "
                      f"{list(arrays[key].shape)}")
    return arrays


def _state(root: Path, path: Path, raw: object, i: int, files: dict) -> StateSpec:
    f = _Fields(path, raw, f"state[{i}]")
    init = _Fields(path, f.get("initial", dict), f"state[{i}].initial")
    dtype = init.choice("dtype", ("float32", "float16"), "float32")
    if "file" in init.data:
        with np.load(root / init.file("file", files), allow_pickle=False) as data:
            key = init.get("array", str)
            if key not in data.files:
                init.fail(f"names array {key!r}, which its file does not hold")
            initial = data[key].astype(dtype)
    else:
        shape = init.get("shape", list)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape):
            init.fail(f"'shape' must be non-negative integers, got {shape!r}")
        initial = np.full(shape, init.get("fill", float, 0.0), dtype)
    reset = f.get("reset", list, list(RESET_RULES))
    bad = [r for r in reset if r not in RESET_RULES]
    if bad:
        f.fail(f"'reset' has unknown rules {bad}; allowed: {list(RESET_RULES)}")
    return StateSpec(f.get("name", str), f.get("input", str), f.get("output", str), initial,
                     f.choice("scope", STATE_SCOPES, "camera"), tuple(reset),
                     f.choice("gate", STATE_GATES, "always"))


def upgrade_schema_1(manifest: dict) -> dict:
    """A schema-1 manifest in the schema-2 form (in memory; the files are not touched).

    Schema 1 had one ``input`` (height, width; RGB uint8), outputs known by name, and no
    memory recipe: the recipe follows from the method and its head config, as the schema-1
    enrollment did.
    """
    m = dict(manifest)
    old = m.pop("input", None)
    if not isinstance(old, dict):
        raise BundleError("schema-1 manifest lacks its 'input' object; re-export the bundle")
    try:
        fit = old["fit"]
        m["inputs"] = [{"name": old["name"], "modality": old.get("modality", "rgb"),
                        "dtype": old["dtype"], "layout": old["layout"],
                        "size": [old["height"], old["width"]], "channels": 3, "fit": fit,
                        "interpolation": "bicubic" if fit == "resize" else "none",
                        "normalization": old["normalization"]}]
    except KeyError as exc:
        raise BundleError(f"schema-1 manifest: input lacks {exc}; re-export the bundle") from None
    roles = {"image_score": "score", "anomaly_map": "map"}
    m["outputs"] = [dict(o, role=roles.get(o.get("name"), "feature")) if isinstance(o, dict) else o
                    for o in m.get("outputs") or []]
    m["state"] = []
    if isinstance(m.get("memory"), dict):
        m["memory"] = dict(m["memory"], recipe=_schema_1_recipe(m))
    m["schema_version"] = SCHEMA_VERSION
    m["upgraded_from_schema"] = 1
    return m


def _schema_1_recipe(manifest: dict) -> dict:
    method = manifest.get("method")
    if method in ("afclip", "cmad"):
        return {"kind": "bank_per_set", "feature": "features"}
    if method == "memory":
        head = (manifest.get("config") or {}).get("head") or {}
        return {"kind": "patch_memory", "metric": head.get("metric", "standardized"),
                "use_global": bool(head.get("use_global", True)), "window": head.get("window", 8),
                "stride": head.get("stride", 2)}
    raise BundleError(f"schema-1 bundle of method {method!r} has a memory but no known recipe; "
                      "re-export it with this edge-inspect")


REQUIRED = ("schema_version", "method", "model", "inputs", "outputs", "files")


def read_manifest(root: Path) -> tuple[dict, int]:
    """The manifest in schema-2 form and the schema version the file had."""
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{root} is not a bundle: {MANIFEST} is missing (make one with "
                          "`edge-inspect export`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}); re-export the bundle") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path} must hold a JSON object; re-export the bundle")
    version = manifest.get("schema_version")
    if version not in READABLE_SCHEMAS or isinstance(version, bool):
        raise BundleError(f"{path} has schema version {version!r}; this runtime reads versions "
                          f"{list(READABLE_SCHEMAS)}. Re-export with a matching edge-inspect, or upgrade")
    if version == 1:
        manifest = upgrade_schema_1(manifest)
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise BundleError(f"{path} lacks {missing}; re-export the bundle")
    return manifest, version


def load_bundle(root: str | Path, verify: bool = True) -> Bundle:
    """Read ``root/manifest.json``, check every field and every file's sha256, load the memory."""
    root = Path(root)
    manifest, version = read_manifest(root)
    path = root / MANIFEST
    top = _Fields(path, manifest, "manifest")
    top.get("method", str)
    files = top.get("files", dict)
    for name, digest in files.items():  # every name checked before any file is opened
        if not plain_name(name):
            top.fail(f"'files' lists {name!r}, not a plain file name inside the bundle folder")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            top.fail(f"'files' gives {name!r} the digest {digest!r}, not a sha256 hex string")
    top.file("model", files)  # a plain, checksummed name
    memory_spec = top.get("memory", dict | None, None)
    threshold = top.get("threshold", dict | None, None)
    if threshold is not None:
        _Fields(path, threshold, "threshold").get("threshold", float)
    inputs = [_plane(path, p, i) for i, p in enumerate(top.get("inputs", list))]
    outputs = [_output(path, o, i) for i, o in enumerate(top.get("outputs", list))]
    if not inputs:
        top.fail("'inputs' is empty")
    names = [p.name for p in inputs] + [o.name for o in outputs]
    if len(set(names)) != len(names):
        top.fail(f"repeats an input or output name: {names}")
    for role in ("score", "map"):
        if [o.role for o in outputs].count(role) != 1:
            top.fail(f"needs exactly one output with role {role!r}, has "
                     f"{[o.name for o in outputs if o.role == role]}")
    inside = root.resolve()
    for name in files:
        file = root / name
        if not file.is_file():
            raise BundleError(f"bundle file {file} is missing (listed in {MANIFEST})")
        if file.resolve().parent != inside:  # a symlink out of the folder
            raise BundleError(f"bundle file {file} links to {file.resolve()}, outside the bundle "
                              "folder; copy the file into the bundle instead of linking it")
        if verify and sha256_file(file) != files[name]:
            raise BundleError(f"{file} does not match its sha256 in {MANIFEST}: the file was "
                              "changed or truncated; re-export or restore it")
    state = [_state(root, path, s, i, files) for i, s in enumerate(top.get("state", list, []))]
    state_outputs = {o.name for o in outputs if o.role == "state"}
    for s in state:
        if s.output not in state_outputs:
            top.fail(f"state {s.name!r} reads output {s.output!r}, which is not an output with role 'state'")
        if s.gate == "normal" and manifest.get("threshold") is None:
            top.fail(f"state {s.name!r} is carried only from frames scored normal (gate: normal), "
                     "but the bundle has no threshold; export a calibrated checkpoint")
    memory: dict[str, np.ndarray] = {}
    categories: dict[str, dict[str, np.ndarray]] = {}
    if memory_spec is not None:
        spec = _Fields(path, memory_spec, "memory")
        memory = _arrays_file(root, path, spec, files)
        recipe = spec.get("recipe", dict | None, None)
        if recipe is not None:
            _Fields(path, recipe, "memory.recipe").get("kind", str)
        for cat, raw in spec.get("categories", dict, {}).items():
            categories[cat] = _arrays_file(root, path, _Fields(path, raw, f"memory.categories[{cat!r}]"),
                                           files)
    return Bundle(root, manifest, inputs, outputs, memory, state, categories, version)
