"""Hot model reload: a new bundle is loaded, checked and warmed beside the serving one, then
swapped in between two batches; if anything fails, the old one keeps serving.

Triggers (``serve``): SIGHUP (the profile's bundle path again, or its new path if the
profile changed), ``POST /model/reload`` (``?bundle=PATH`` for another bundle; answers when
the swap is done or has failed), and a change of the profile file's ``bundle``.

Steps, on one side thread (a request while one runs waits for it and then runs): read the
bundle (every file's checksum), check that each camera sends the planes it takes, open its
engine with the profile's backend, warm it, then :meth:`ModelSlot.swap` (the pipeline takes
the model once per batch, so no batch mixes two; every camera's carried state resets).
Frames keep flowing meanwhile; the only pause is the engine swap itself plus whatever the
warm-up takes from a shared CPU or GPU (``benchmarks/reload_pause.py`` measures it). Each
outcome is counted in ``edge_inspect_model_reloads_total{outcome="ok|failed"}`` and logged
in one line; ``edge_inspect_model_info`` then names the serving bundle (folder and
manifest digest), as does every result's ``bundle`` field.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from edge_inspect.runtime.bundle import load_bundle
from edge_inspect.runtime.orchestrator import needed_planes
from edge_inspect.runtime.source_registry import check_planes

log = logging.getLogger(__name__)


class ReloadError(RuntimeError):
    """A reload that did not happen; the old model keeps serving."""


class Reloader:
    """Serializes reload requests of one runtime and carries them out on a side thread."""

    def __init__(self, runtime) -> None:
        self.runtime = runtime
        self.lock = threading.Lock()  # one reload at a time
        self.last_error: str | None = None
        self.swap_seconds: list[float] = []  # time the swap itself held the slot

    def reload(self, path: str | Path | None = None, reason: str = "command") -> str:
        """Load, check, warm and swap in the bundle at ``path`` (default: the profile's);
        returns the new bundle's id; raises :class:`ReloadError` when the old one stays."""
        rt = self.runtime
        path = Path(path or rt.cfg.bundle)
        with self.lock:
            t0 = time.perf_counter()
            try:
                bundle = load_bundle(path)
                needed = list(needed_planes(bundle))
                for cam in rt.cameras:
                    check_planes(cam, needed, str(path))
                rt.check_transport(bundle)
                from edge_inspect.runtime.engines import open_engine

                engine = open_engine(bundle, rt.cfg.backend, **rt.cfg.backend_options)
                engine.warmup()
            except Exception as exc:  # noqa: BLE001 - any failure keeps the old model
                self.last_error = f"{type(exc).__name__}: {exc}"
                rt.metrics.model_reloads.labels("failed").inc()
                log.error("reload (%s) of %s failed, still serving %s: %s", reason, path,
                          rt.pipeline.slot.current.bundle_id, self.last_error)
                raise ReloadError(f"reload of {path} failed, still serving "
                                  f"{rt.pipeline.slot.current.bundle_id}: {self.last_error}") from None
            t_swap = time.perf_counter()
            old = rt.pipeline.slot.swap(bundle, engine, rt.cfg.model_name)
            self.swap_seconds.append(time.perf_counter() - t_swap)
            new = rt.pipeline.slot.current
            rt.pipeline.announce_model(new, old)
            rt.metrics.model_reloads.labels("ok").inc()
            self.last_error = None
            log.info("reload (%s): serving %s instead of %s (loaded and warmed in %.2f s)", reason,
                     new.bundle_id, old.bundle_id, t_swap - t0)
            return new.bundle_id

    def request(self, path: str | Path | None = None, reason: str = "signal") -> threading.Thread:
        """:meth:`reload` on a new thread (a signal handler must not wait); errors are logged
        and counted there."""
        def run() -> None:
            try:
                self.reload(path, reason)
            except ReloadError:
                pass

        thread = threading.Thread(target=run, name="reload", daemon=True)
        thread.start()
        return thread
