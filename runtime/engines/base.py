"""The engine interface: load a bundle, warm up, infer a batch of named planes; io from the manifest."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edge_inspect.runtime.bundle import Bundle


class EngineError(RuntimeError):
    """An engine that cannot load or run a bundle, with the reason."""


class Engine:
    """Runs a bundle's graph. Subclasses implement :meth:`_run`.

    ``infer(feeds)`` takes one array per named input plane (``{"image": (B, H, W, 3)}``; an
    RGB-D bundle takes two), plus the state inputs when the bundle declares state, and
    returns the asked outputs by name (default: the outputs with roles ``score`` and
    ``map``). The few-shot memory is fed from the bundle (a category's bank when
    ``category`` is given).
    """

    backend = ""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle

    @property
    def input_names(self) -> list[str]:
        return ([p.name for p in self.bundle.inputs] + [s.input for s in self.bundle.state]
                + [f"memory.{k}" for k in self.bundle.memory])

    @property
    def output_names(self) -> list[str]:
        return self.bundle.output_names

    def infer(self, feeds: Mapping[str, np.ndarray], outputs: list[str] | None = None,
              category: str | None = None) -> dict[str, np.ndarray]:
        graph_feeds = self.bundle.feeds(feeds, category)
        names = outputs or [self.bundle.score_output, self.bundle.map_output]
        unknown = set(names) - set(self.output_names)
        if unknown:
            raise EngineError(f"the bundle has no outputs {sorted(unknown)}; it has {self.output_names}")
        return dict(zip(names, self._run(graph_feeds, names), strict=True))

    def blank_feeds(self, batch: int = 1) -> dict[str, np.ndarray]:
        """Zero frames for every plane and the initial state: what warm-up runs."""
        feeds = {p.name: np.zeros((batch, *p.shape), p.dtype) for p in self.bundle.inputs}
        for s in self.bundle.state:
            feeds[s.input] = np.repeat(s.initial[None], batch, axis=0)
        return feeds

    def warmup(self, runs: int = 2) -> None:
        """Run a blank batch so the first real frame does not pay for lazy initialisation."""
        for _ in range(runs):
            self.infer(self.blank_feeds())

    def _run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        raise NotImplementedError
