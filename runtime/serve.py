"""``edge-inspect serve --config configs/runtime/<profile>.yaml``: the thin CLI.

The profile is parsed and checked by :mod:`edge_inspect.runtime.profile`; the runtime is
started and stopped by :mod:`edge_inspect.runtime.orchestrator`. This module only wires
them to the command line and to signals.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from edge_inspect.runtime.orchestrator import Runtime
from edge_inspect.runtime.profile import Profile


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="configs/runtime/<profile>.yaml")


def run(args: argparse.Namespace) -> int:
    cfg = Profile.from_yaml(args.config)
    runtime = Runtime(cfg).start()
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    port = runtime.health.port if runtime.health else None
    print(f"serving {cfg.bundle} on {len(cfg.cameras)} camera(s); results on {cfg.results_endpoint}"
          + (f"; metrics on http://{cfg.http.host}:{port}/metrics" if port else ""), flush=True)
    try:
        while not stopping.is_set() and not runtime.sources_done() and runtime.error is None:
            stopping.wait(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        runtime.shutdown()
    print(f"stopped after {runtime.pipeline.frames_done} frames")
    runtime.check()  # a failed pipeline exits non-zero with its reason
    return 0
