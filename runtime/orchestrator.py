"""Starts and stops a runtime: camera processes, the pipeline and the health server.

It wires the parts the pipeline itself never builds: the frame receiver (ZeroMQ; one SUB
dialling every camera's PUB in ``live``, one bound PULL in ``every_part``), the model slot
(bundle + engine), the sinks (results socket, captures) and the metrics. The pipeline
exists (and is warm) before any camera sends. SIGTERM or Ctrl-C (handled by the CLI) stop
everything: the sources at their next frame, the pipeline after its current batch;
children still running after the grace period are killed.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
import time
from pathlib import Path

from edge_inspect.runtime.bundle import load_bundle
from edge_inspect.runtime.camera_process import camera_process
from edge_inspect.runtime.capture import CaptureStore
from edge_inspect.runtime.metrics import RuntimeMetrics
from edge_inspect.runtime.model_slot import ModelSlot
from edge_inspect.runtime.pipeline import Pipeline, PipelineConfig
from edge_inspect.runtime.profile import Profile
from edge_inspect.runtime.sinks import CaptureSink, ResultSocketSink
from edge_inspect.runtime.source_registry import check_source
from edge_inspect.runtime.supervisor import SourceSupervisor
from edge_inspect.runtime.transport.sockets import Receiver, Sender, TransportConfig

log = logging.getLogger(__name__)


class Runtime:
    """Sources (processes) + pipeline + health server, started and stopped together."""

    def __init__(self, cfg: Profile) -> None:
        self.cfg = cfg
        self.cameras = [c.as_dict() for c in cfg.cameras]
        for cam in self.cameras:
            check_source(cam)
        Path(cfg.endpoint_dir).mkdir(parents=True, exist_ok=True)
        self.bundle = load_bundle(cfg.bundle)
        self.metrics = RuntimeMetrics()
        p = cfg.pipeline
        self.pipeline_cfg = PipelineConfig(cfg.mode, p.max_batch, p.max_wait_ms, p.heatmap_size,
                                           p.camera_timeout_s, [c.id for c in cfg.cameras])
        self.stop = threading.Event()
        self.mp = mp.get_context("spawn")
        self.supervisor = SourceSupervisor(self._spawn_source, self.cameras, self.metrics.source_restarts)
        self.pipeline: Pipeline | None = None
        self.health = None
        self.error: BaseException | None = None  # why the pipeline thread ended, if it failed

    @property
    def processes(self) -> dict[str, mp.Process]:
        """The current process of every camera (a restarted camera has a new one)."""
        return self.supervisor.processes

    def _spawn_source(self, cam: dict) -> mp.Process:
        proc = self.mp.Process(target=camera_process, name=f"source-{cam['id']}", daemon=True,
                               args=(cam, self.cfg.frames_endpoint(cam["id"]), self.cfg.mode))
        proc.start()
        return proc

    def _frame_receiver(self) -> Receiver:
        endpoints = [self.cfg.frames_endpoint(c.id) for c in self.cfg.cameras]
        if self.cfg.mode == "every_part":
            return Receiver(TransportConfig(endpoints[0], mode="every_part"))
        return Receiver(TransportConfig(endpoints[0], mode="live"), also_connect=endpoints[1:])

    def _sinks(self) -> list:
        results = Sender(TransportConfig(self.cfg.results_endpoint, mode="live", hwm=1000))  # small messages
        sinks: list = [ResultSocketSink(results)]
        if self.cfg.captures is not None:
            sinks.append(CaptureSink(CaptureStore(self.cfg.captures.folder, self.cfg.captures.retain)))
        return sinks

    def start(self) -> Runtime:
        from edge_inspect.runtime.engines import open_engine
        from edge_inspect.runtime.health import HealthServer

        engine = open_engine(self.bundle, self.cfg.backend, **self.cfg.backend_options)
        slot = ModelSlot(self.bundle, engine, self.cfg.model_name)
        self.pipeline = Pipeline(slot, self._frame_receiver(), self._sinks(), self.pipeline_cfg,
                                 self.metrics)
        self.pipeline.warmup()
        http = self.cfg.http
        if http.port is not None:
            try:
                self.health = HealthServer(self.metrics.registry, self.pipeline.ready, http.host,
                                           http.port).start()
            except OSError as exc:
                self.pipeline.close()
                raise ValueError(f"cannot serve /metrics on {http.host}:{http.port} ({exc}); "
                                 "choose another http.port (0 picks a free one)") from None
        self.supervisor.start_all()
        self.supervisor_thread = threading.Thread(target=self.supervisor.run, args=(self.stop,),
                                                  name="source-supervisor", daemon=True)
        self.supervisor_thread.start()
        self.thread = threading.Thread(target=self._run_pipeline, name="pipeline", daemon=True)
        self.thread.start()
        return self

    def _run_pipeline(self) -> None:
        try:
            self.pipeline.run(self.stop)
        except BaseException as exc:  # noqa: BLE001 - reported by check()
            log.exception("the pipeline failed")
            self.error = exc

    def check(self) -> None:
        """Raise if the pipeline has failed (a dead pipeline must not look like a quiet one)."""
        if self.error is not None:
            raise RuntimeError(f"the pipeline stopped: {type(self.error).__name__}: {self.error}")

    def sources_done(self) -> bool:
        """Every camera ended cleanly (a crashed one is restarted, so it is not done)."""
        return all(not p.is_alive() and p.exitcode == 0 for p in self.processes.values())

    def shutdown(self, grace_s: float = 1.5) -> None:
        self.stop.set()
        self.supervisor.stop()  # no restart from here on
        if getattr(self, "supervisor_thread", None) is not None:
            self.supervisor_thread.join(1)
        for proc in self.processes.values():
            if proc.is_alive():
                proc.terminate()  # SIGTERM: the source stops at its next frame
        deadline = time.monotonic() + grace_s
        for proc in self.processes.values():
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.processes.values():
            if proc.is_alive():
                proc.kill()
                proc.join(1)
        if getattr(self, "thread", None) is not None:
            self.thread.join(max(0.1, deadline - time.monotonic()))
        if self.pipeline is not None:
            self.pipeline.close()
        if self.health is not None:
            self.health.stop()
