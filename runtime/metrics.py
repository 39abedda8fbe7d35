"""Prometheus metrics of the runtime (names and labels from DESIGN), in one registry.

Base units, ``_total`` only on counters, bounded labels (``camera``, ``model``, ``stage``,
``reason``, ``backend``, ``precision``), histograms rather than averaged gauges, with
sub-millisecond buckets for the per-stage times.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "edge_inspect_"
STAGES = ("transport", "preprocess", "infer", "postprocess", "publish")
# overwritten: a shared-memory frame whose slot the camera rewrote before it was fitted
CAMERA_DROP_REASONS = ("hwm", "stale", "malformed", "overwritten")
DROP_REASONS = (*CAMERA_DROP_REASONS, "unknown_camera")
# The one camera label of frames that name no camera of the profile (or none that decodes):
# a sender inventing ids must not create series. Profiles may not use it as an id.
UNATTRIBUTED = "unknown"
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03,
                 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                   0.75, 1.0, 2.0, 5.0)
SCORE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))


@dataclass
class CameraSeries:
    """One camera's labelled series, looked up once: the per-frame path only observes."""

    received: Counter
    last_frame: Gauge
    up: Gauge
    inferred: Counter
    anomalies: Counter
    score: Histogram
    e2e: Histogram
    stages: dict[str, Histogram]
    raw_score: Gauge


class RuntimeMetrics:
    """Every runtime metric, registered in its own :class:`CollectorRegistry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        p = PREFIX
        self.frames_received = Counter(p + "frames_received", "Frames received from cameras",
                                       ["camera"], registry=r)
        self.frames_dropped = Counter(p + "frames_dropped", "Frames dropped, by reason "
                                      f"({', '.join(DROP_REASONS)})", ["camera", "reason"], registry=r)
        self.frames_inferred = Counter(p + "frames_inferred", "Frames scored by the model",
                                       ["camera", "model"], registry=r)
        self.anomalies = Counter(p + "anomalies", "Frames whose score exceeded the threshold",
                                 ["camera", "model"], registry=r)
        self.anomaly_score = Histogram(p + "anomaly_score", "Calibrated anomaly score "
                                       "(0.5 at the threshold, clipped to [0, 1])",
                                       ["camera", "model"], buckets=SCORE_BUCKETS, registry=r)
        self.stage_seconds = Histogram(p + "stage_seconds", "Time per pipeline stage",
                                       ["stage", "camera"], buckets=STAGE_BUCKETS, registry=r)
        self.e2e_latency = Histogram(p + "e2e_latency_seconds", "Capture to result published",
                                     ["camera"], buckets=LATENCY_BUCKETS, registry=r)
        self.last_frame = Gauge(p + "last_frame_timestamp_seconds", "Unix time of the last frame "
                                "received", ["camera"], registry=r)
        self.camera_up = Gauge(p + "camera_up", "1 while the camera delivers frames", ["camera"],
                               registry=r)
        self.source_restarts = Counter(p + "source_restarts", "Camera processes restarted after "
                                       "a crash", ["camera"], registry=r)
        self.captures_skipped = Counter(p + "captures_skipped", "Anomalous frames not captured "
                                        "because the capture writer was behind", ["camera"], registry=r)
        self.state_resets = Counter(p + "state_resets", "Carried per-camera model state reset, by "
                                    "rule (sequence_restart, command)", ["rule"], registry=r)
        self._cameras: dict[tuple[str, str], CameraSeries] = {}
        self.model_info = Gauge(p + "model_info", "The model being served (value 1); bundle: its "
                                "folder@manifest digest", ["model", "bundle", "backend", "precision"],
                                registry=r)
        self.model_reloads = Counter(p + "model_reloads", "Hot reloads of the model, by outcome "
                                     "(ok, failed: the old model kept serving)", ["outcome"], registry=r)
        self.sink_messages = Counter(p + "sink_messages", "Results handed to a sink (queued), "
                                     "acknowledged (delivered) or dropped", ["sink", "outcome"],
                                     registry=r)
        self.mqtt_connected = Gauge(p + "mqtt_connected", "1 while the MQTT sink is connected",
                                    registry=r)
        self.threshold = Gauge(p + "threshold", "The serving decision threshold on the raw score "
                               "(the anomaly_score histogram's 0.5); NaN without one", ["model"],
                               registry=r)
        self.last_score = Gauge(p + "last_score", "Raw anomaly score of the camera's last scored "
                                "frame (compare with edge_inspect_threshold)", ["camera"], registry=r)

    def camera(self, camera: str, model: str) -> CameraSeries:
        """The cached series of ``camera`` (label lookups take a lock; frames should not)."""
        series = self._cameras.get((camera, model))
        if series is None:
            series = self._cameras[(camera, model)] = CameraSeries(
                self.frames_received.labels(camera), self.last_frame.labels(camera),
                self.camera_up.labels(camera), self.frames_inferred.labels(camera, model),
                self.anomalies.labels(camera, model), self.anomaly_score.labels(camera, model),
                self.e2e_latency.labels(camera),
                {stage: self.stage_seconds.labels(stage, camera) for stage in STAGES},
                self.last_score.labels(camera))
        return series

    def start_cameras(self, cameras, model: str) -> None:
        """Create every configured camera's series at zero (and the unattributed drops), so a
        dashboard shows 0, not "no data", before the first frame or the first drop."""
        for cam in cameras:
            self.camera(cam, model)
            for reason in CAMERA_DROP_REASONS:  # (unknown_camera: unattributed only)
                self.frames_dropped.labels(cam, reason)
            self.source_restarts.labels(cam)
            self.captures_skipped.labels(cam)
        for reason in ("malformed", "unknown_camera"):
            self.frames_dropped.labels(UNATTRIBUTED, reason)

    def drop(self, camera: str, reason: str, n: int = 1) -> None:
        if reason not in DROP_REASONS:
            raise ValueError(f"drop reason {reason!r} unknown; use {DROP_REASONS}")
        if n:
            self.frames_dropped.labels(camera, reason).inc(n)


def calibrated_score(score: float, threshold: float | None) -> float:
    """Map a raw score to [0, 1] with the threshold at 0.5 (for the score histogram)."""
    if threshold is None or threshold <= 0:
        return min(max(score, 0.0), 1.0)
    return min(max(0.5 * score / threshold, 0.0), 1.0)
