"""Camera source kinds in one place: which kinds exist, their options, and how to build one.

A kind's options are its constructor's parameters (so the list cannot drift from the
code); ``path`` is the folder source's name for ``images`` given as a folder. A new kind
is one entry in :data:`SOURCES`. ``external`` is the one kind without a process: its frames
are sent to the runtime's ``frames`` endpoint by a sender elsewhere (another machine).
Every camera may declare ``planes`` (what its frames carry; by default its source kind's,
``[rgb]`` for an external camera), which ``serve`` checks against the bundle's inputs.
"""

from __future__ import annotations

import inspect
import threading

from edge_inspect.runtime.sources import (
    CaptureSource,
    FolderSource,
    RGBDFolderSource,
    SyntheticRGBDSource,
    SyntheticSource,
)

SOURCES = {"folder": FolderSource, "capture": CaptureSource, "synthetic": SyntheticSource,
           "rgbd_folder": RGBDFolderSource, "rgbd_synthetic": SyntheticRGBDSource}
EXTERNAL = "external"
SOURCE_KINDS = (*SOURCES, EXTERNAL)
ALIASES = {"folder": {"path": "images"}}  # profile key -> constructor parameter
REQUIRED = {"capture": ("uri",), "rgbd_folder": ("path",)}


PLANE_NAMES = ("rgb", "depth", "xyz", "normals")


def source_options(kind: str) -> tuple[str, ...]:
    """A source kind's camera options: its constructor's parameters, their aliases, planes."""
    if kind == EXTERNAL:
        return ("planes",)
    names = tuple(n for n in inspect.signature(SOURCES[kind]).parameters if n != "stop")
    return names + tuple(ALIASES.get(kind, {})) + ("planes",)


def camera_planes(cam: dict) -> tuple[str, ...]:
    """The planes a camera's frames carry: its ``planes`` option, else its source kind's."""
    kind = cam["source"]
    own = ("rgb",) if kind == EXTERNAL else SOURCES[kind].PLANES
    declared = cam.get("planes")
    if declared is None:
        return own
    if (not isinstance(declared, list) or not declared
            or any(p not in PLANE_NAMES for p in declared) or len(set(declared)) != len(declared)):
        raise ValueError(f"camera {cam['id']}: planes must be a list of distinct names from "
                         f"{list(PLANE_NAMES)}, got {declared!r}")
    if kind != EXTERNAL and not set(declared) <= set(own):
        raise ValueError(f"camera {cam['id']}: a {kind} source sends {list(own)}, not {declared}")
    return tuple(declared)


def check_planes(cam: dict, needed: list[str], bundle: str) -> None:
    """Refuse at start a camera that cannot feed every input plane of the bundle."""
    missing = [p for p in needed if p not in camera_planes(cam)]
    if missing:
        raise ValueError(f"camera {cam['id']} sends planes {list(camera_planes(cam))} but {bundle} also "
                         f"takes {missing}: use an RGB-D source (rgbd_folder, rgbd_synthetic) or, for "
                         f"an external camera that sends them, declare planes: {needed}")


SOURCE_OPTIONS = {kind: source_options(kind) for kind in SOURCE_KINDS}


def check_source(cam: dict) -> None:
    """Build a camera's source once, so a misspelt option or a missing folder or file stops
    ``serve`` at start with a message naming the camera, instead of killing that camera's
    process later."""
    kind, opts = cam["source"], set(cam) - {"id", "source"}
    unknown = opts - set(SOURCE_OPTIONS[kind])
    if unknown:
        raise ValueError(f"camera {cam['id']}: unknown {kind} options {sorted(unknown)}; "
                         f"allowed: {list(SOURCE_OPTIONS[kind])}")
    if kind == "folder" and len(opts & {"path", "images"}) != 1:
        raise ValueError(f"camera {cam['id']}: a folder source needs path or images (one of them)")
    for key in REQUIRED.get(kind, ()):
        if key not in opts:
            raise ValueError(f"camera {cam['id']}: a {kind} source needs {key}")
    camera_planes(cam)
    if kind == EXTERNAL:
        return
    try:
        make_source(cam, threading.Event())
    except (ValueError, FileNotFoundError) as exc:
        raise type(exc)(f"camera {cam['id']}: {exc}") from None
    except TypeError as exc:  # an option of the wrong type, e.g. size: 5
        raise ValueError(f"camera {cam['id']}: {exc}") from None


def is_finite(cam: dict) -> bool:
    """Whether a camera's source ends by itself: a replay or video file without ``loop``, or
    synthetic frames with a ``count`` (its end is a normal end of ``serve``)."""
    kind = cam["source"]
    if kind in ("folder", "rgbd_folder"):
        return not cam.get("loop", False)
    if kind in ("synthetic", "rgbd_synthetic"):
        return cam.get("count") is not None
    if kind == "capture":
        uri = str(cam.get("uri", ""))
        return not uri.isdigit() and "://" not in uri and not cam.get("loop", False)
    return False


def make_source(cam: dict, stop: threading.Event):
    """The source object for a camera mapping (``id``, ``source`` and its options)."""
    opts = {k: v for k, v in cam.items() if k not in ("id", "source", "planes")}
    for alias, name in ALIASES.get(cam["source"], {}).items():
        if alias in opts:
            opts[name] = opts.pop(alias)
    if "size" in opts and isinstance(opts["size"], list | tuple):
        opts["size"] = tuple(opts["size"])
    return SOURCES[cam["source"]](stop=stop, **opts)
