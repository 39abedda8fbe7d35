"""The model the pipeline serves, read once per batch so it can be swapped between batches.

A :class:`ModelSlot` holds the current :class:`ServingModel` (bundle, engine, threshold,
name) and the per-camera state the bundle declares (``manifest.state``: tensors an engine
carries between frames of one camera). The pipeline takes ``slot.current`` once per batch
and hands the same object to the publish stage, so a batch is scored, thresholded and
labelled by one model even if a swap happens meanwhile. :meth:`ModelSlot.swap` replaces the
model between batches and resets every camera's state (hot reload builds on it).

A state with ``gate: normal`` is carried only from frames whose score is at or below the
serving threshold: an anomalous frame leaves its camera's state as it was, so a defect
never becomes the reference the next frames are judged against. A reset bumps the camera's
generation; a batch fed before the reset (:meth:`generations`) stores nothing for it, so a
reset is never undone by a batch that was in the engine meanwhile.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

import numpy as np

from edge_inspect.runtime.bundle import MANIFEST, Bundle


def bundle_id(bundle: Bundle) -> str:
    """``<folder>@<12 hex of the manifest's sha256>``: which bundle scored a frame (an enrolled
    bundle keeps its run's name but gets a new folder and manifest)."""
    digest = hashlib.sha256((bundle.root / MANIFEST).read_bytes()).hexdigest()[:12]
    return f"{bundle.root.name}@{digest}"


@dataclass(frozen=True)
class ServingModel:
    bundle: Bundle
    engine: object
    name: str
    threshold: float | None
    bundle_id: str = ""

    @property
    def backend(self) -> str:
        return getattr(self.engine, "backend", "?")

    @property
    def precision(self) -> str:
        return getattr(self.engine, "precision", "fp32")


class ModelSlot:
    def __init__(self, bundle: Bundle, engine, name: str | None = None) -> None:
        self._lock = threading.Lock()
        self._state: dict[str, dict[str, np.ndarray]] = {}
        self._generation: dict[str, int] = {}  # per camera, bumped by a reset
        self._all_generation = 0  # bumped by a reset of every camera (and a swap)
        self.current = ServingModel(bundle, engine, name or bundle.name, bundle.threshold, bundle_id(bundle))

    def swap(self, bundle: Bundle, engine, name: str | None = None) -> ServingModel:
        """Serve another model from the next batch on; returns the old one. State resets."""
        model = ServingModel(bundle, engine, name or bundle.name, bundle.threshold, bundle_id(bundle))
        with self._lock:
            old = self.current
            self.current = model
            self._state.clear()
            self._all_generation += 1
            return old

    # -- per-camera state ------------------------------------------------------------------------
    def state_feeds(self, model: ServingModel, cameras: list[str]) -> dict[str, np.ndarray]:
        """The state inputs for a batch of ``cameras`` (initial values for a new camera)."""
        if not model.bundle.state:
            return {}
        with self._lock:
            return {s.input: np.stack([self._state.get(cam, {}).get(s.input, s.initial) for cam in cameras])
                    for s in model.bundle.state}

    def generations(self, cameras: list[str]) -> list[tuple[int, int]]:
        """The cameras' reset generations: take them before :meth:`state_feeds` and hand them
        to :meth:`keep_state`."""
        with self._lock:
            return [(self._all_generation, self._generation.get(cam, 0)) for cam in cameras]

    def keep_state(self, model: ServingModel, cameras: list[str], outputs: dict[str, np.ndarray],
                   generations: list[tuple[int, int]] | None = None) -> None:
        """Store each camera's state outputs as its next state inputs (if ``model`` still
        serves and, given ``generations``, the camera was not reset since); a ``gate: normal``
        state only from frames scored at or below the threshold."""
        if not model.bundle.state:
            return
        gated = any(s.gate == "normal" for s in model.bundle.state)
        scores = outputs[model.bundle.score_output] if gated else None
        with self._lock:
            if model is not self.current:  # swapped meanwhile: the old model's state is void
                return
            for i, cam in enumerate(cameras):
                if generations is not None and generations[i] != (self._all_generation,
                                                                  self._generation.get(cam, 0)):
                    continue  # reset while this batch was in the engine
                normal = gated and model.threshold is not None and float(scores[i]) <= model.threshold
                kept = self._state.setdefault(cam, {})
                for s in model.bundle.state:
                    if s.gate == "always" or normal:
                        kept[s.input] = np.array(outputs[s.output][i])

    def reset_state(self, camera: str | None = None, rule: str = "command") -> bool:
        """Forget one camera's state (or all) -- each state whose reset rules include ``rule``;
        True when the bundle has such a state."""
        with self._lock:
            inputs = [s.input for s in self.current.bundle.state if rule in s.reset]
            if not inputs:
                return False
            if camera is None:
                self._all_generation += 1
            else:
                self._generation[camera] = self._generation.get(camera, 0) + 1
            for cam in [camera] if camera is not None else list(self._state):
                for name in inputs:
                    self._state.get(cam, {}).pop(name, None)
            return True
