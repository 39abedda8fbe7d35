"""The engine interface: load a bundle, warm up, infer a batch; io names from the manifest."""

from __future__ import annotations

import numpy as np

from runtime.bundle import Bundle


class EngineError(RuntimeError):
    """An engine that cannot load or run a bundle, with the reason."""


class Engine:
    """Runs a bundle's graph. Subclasses implement :meth:`_run`.

    ``infer(images)`` takes fitted uint8 RGB frames ``(B, H, W, 3)`` (or one ``(H, W, 3)``)
    and returns the manifest's outputs by name (``image_score``, ``anomaly_map``, features).
    """

    backend = ""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle

    @property
    def input_names(self) -> list[str]:
        return [self.bundle.image.name] + [f"memory.{k}" for k in self.bundle.memory]

    @property
    def output_names(self) -> list[str]:
        return self.bundle.output_names

    def infer(self, images: np.ndarray, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        feeds = self.bundle.feeds(images)
        names = outputs or ["image_score", "anomaly_map"]
        unknown = set(names) - set(self.output_names)
        if unknown:
            raise EngineError(f"the bundle has no outputs {sorted(unknown)}; it has {self.output_names}")
        return dict(zip(names, self._run(feeds, names), strict=True))

    def warmup(self, runs: int = 2) -> None:
        """Run a black batch so the first real frame does not pay for lazy initialisation."""
        h, w, c = self.bundle.image.shape
        for _ in range(runs):
            self.infer(np.zeros((1, h, w, c), np.uint8))

    def _run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        raise NotImplementedError
