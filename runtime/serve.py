"""``edge-inspect serve --config configs/runtime/<profile>.yaml``: the thin CLI.

The profile is parsed and checked by :mod:`edge_inspect.runtime.profile`; the runtime is
started and stopped by :mod:`edge_inspect.runtime.orchestrator`. This module only wires
them to the command line and to signals: SIGTERM and Ctrl-C (any number of times) stop the
runtime once, cleanly; SIGHUP, or a new ``bundle`` path in the profile file, reloads the
model (:mod:`edge_inspect.runtime.reload`). Exit codes: 0 -- stopped by a signal, or every camera was a finite
replay and finished; 1 -- the pipeline failed, or the cameras ended when they should not
have (the reason is printed); 2 -- the profile or bundle cannot be served.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from edge_inspect.runtime.health import port_free
from edge_inspect.runtime.orchestrator import Runtime
from edge_inspect.runtime.profile import Profile
from edge_inspect.runtime.transport.shm_ring import SHM_DIR

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="configs/runtime/<profile>.yaml")
    parser.add_argument("--check", action="store_true",
                        help="validate the profile, its bundle (checksums, planes), cameras and keys, "
                             "print what would be served and exit; starts nothing")


def check(cfg: Profile, path: Path) -> int:
    """``--check``: everything ``serve`` checks before it starts (a problem raises the same
    one-line error, exit 2), and whether the metrics port is free, without starting."""
    runtime = Runtime(cfg)  # parses the bundle, checks sources, planes and keys; opens nothing
    bundle = runtime.bundle
    threshold = "none (uncalibrated: no verdicts)" if bundle.threshold is None else f"{bundle.threshold:.4g}"
    print(f"{path}: valid. bundle {cfg.bundle} (method {bundle.manifest['method']}, planes "
          f"{[p.name for p in bundle.inputs]}, threshold {threshold}); mode {cfg.mode}; cameras "
          + ", ".join(f"{c.id} ({c.source})" for c in cfg.cameras))
    if runtime.ring_bytes:
        free = shm_free_bytes()
        print(f"transport shm: {len(runtime.processed)} ring(s) of {cfg.transport.slots} slots x "
              f"{runtime.slot_bytes / 2**20:.1f} MiB = {runtime.ring_bytes / 2**20:.0f} MiB of shared memory"
              + (f" ({free / 2**20:.0f} MiB free)" if free is not None else ""))
        if free is not None and free < runtime.ring_bytes:
            print(f"edge-inspect serve: the frame rings need {runtime.ring_bytes / 2**20:.0f} MiB but "
                  f"{SHM_DIR} has {free / 2**20:.0f} MiB free; lower transport.slots or "
                  "transport.frame_pixels, or give the machine more (docker run --shm-size)", file=sys.stderr)
            return 2
    if cfg.http is not None and cfg.http.port and not port_free(cfg.http.host, cfg.http.port):
        print(f"edge-inspect serve: {cfg.http.host}:{cfg.http.port} is in use; serve would fail to "
              "open /metrics there (stop the other process or change http.port)", file=sys.stderr)
        return 2
    return 0


def shm_free_bytes() -> int | None:
    """Free bytes in /dev/shm (None where there is none: not Linux)."""
    try:
        return shutil.disk_usage(SHM_DIR).free
    except OSError:
        return None


def run(args: argparse.Namespace) -> int:
    cfg = Profile.from_yaml(args.config)
    if args.check:
        return check(cfg, args.config)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # set before start: no KeyboardInterrupt anywhere
        signal.signal(sig, lambda *_: stopping.set())
    hup = threading.Event()
    signal.signal(signal.SIGHUP, lambda *_: hup.set())  # reload: handled by the loop below
    runtime = Runtime(cfg).start()
    watch = ProfileWatch(args.config, cfg.bundle)
    port = runtime.health.port if runtime.health else None
    print(f"serving {cfg.bundle} on {len(cfg.cameras)} camera(s); results on {cfg.results_endpoint}"
          + (f"; metrics on http://{cfg.http.host}:{port}/metrics" if port else ""), flush=True)
    ended, why = False, None
    try:
        while not stopping.is_set() and runtime.error is None:
            ended, why = runtime.sources_ended()
            if ended:
                _drain(runtime, stopping)
                break
            changed = watch.bundle_changed()
            if changed:  # POST /model/reload without a path follows the profile too
                runtime.cfg.bundle = watch.bundle
            if hup.is_set() or changed:
                hup.clear()
                runtime.reloader.request(watch.bundle, "profile change" if changed else "SIGHUP")
            stopping.wait(0.2)
    finally:
        runtime.shutdown()
    print(f"stopped after {runtime.pipeline.frames_done} frames", flush=True)
    if runtime.error is not None:  # a failed pipeline exits non-zero with its reason, in one line
        print(f"edge-inspect serve: the pipeline stopped: {type(runtime.error).__name__}: "
              f"{runtime.error} (the log above has the details)", file=sys.stderr)
        return 1
    if ended and why:
        print(f"edge-inspect serve: every camera has ended: {why}", file=sys.stderr)
        return 1
    if ended:
        print("every camera finished its replay", flush=True)
    return 0


class ProfileWatch:
    """The profile's ``bundle`` as the file says now: a new path there is a reload. A profile
    that no longer parses is logged once per change and ignored (the serving model stays)."""

    def __init__(self, path: Path, bundle: str) -> None:
        self.path, self.bundle = Path(path), bundle
        self.mtime = self._mtime()

    def _mtime(self) -> float | None:
        try:
            return self.path.stat().st_mtime_ns
        except OSError:
            return None

    def bundle_changed(self) -> bool:
        mtime = self._mtime()
        if mtime == self.mtime:
            return False
        self.mtime = mtime
        try:
            bundle = Profile.from_yaml(self.path).bundle
        except (ValueError, OSError) as exc:
            log.error("profile %s changed but does not load (%s); still serving the current model",
                      self.path, exc)
            return False
        if bundle == self.bundle:
            return False
        self.bundle = bundle
        return True


def _drain(runtime: Runtime, stopping: threading.Event, quiet_s: float = 1.0, max_s: float = 30.0) -> None:
    """The cameras have ended: score what is still queued (every_part loses nothing) before
    stopping, i.e. wait until no frame was scored for ``quiet_s`` (at most ``max_s``)."""
    deadline = time.monotonic() + max_s
    done, quiet_since = runtime.pipeline.frames_done, time.monotonic()
    while time.monotonic() < deadline and not stopping.is_set() and runtime.error is None:
        if runtime.pipeline.frames_done != done:
            done, quiet_since = runtime.pipeline.frames_done, time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            return
        stopping.wait(0.1)
