"""Metrics names per DESIGN and the health endpoints over real HTTP."""

import json
import urllib.error
import urllib.request

import pytest

from edge_inspect.runtime.health import HealthServer
from edge_inspect.runtime.metrics import RuntimeMetrics, calibrated_score


def _get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_endpoints_and_metric_names():
    m = RuntimeMetrics()
    m.frames_received.labels("cam0").inc(3)
    m.drop("cam0", "malformed")
    m.stage_seconds.labels("infer", "cam0").observe(0.0003)
    m.e2e_latency.labels("cam0").observe(0.02)
    m.anomaly_score.labels("cam0", "textile").observe(calibrated_score(2.0, 1.0))
    state = {"engine_warm": False, "cameras_fresh": True}
    server = HealthServer(m.registry, lambda: dict(state), port=0).start()
    try:
        status, body = _get(server.port, "/metrics")
        assert status == 200
        for name in ("edge_inspect_frames_received_total{camera=\"cam0\"} 3.0",
                     'edge_inspect_frames_dropped_total{camera="cam0",reason="malformed"} 1.0',
                     'edge_inspect_stage_seconds_bucket{camera="cam0",le="0.0005",stage="infer"} 1.0',
                     "edge_inspect_e2e_latency_seconds_count", "edge_inspect_anomaly_score_bucket",
                     "edge_inspect_camera_up", "edge_inspect_last_frame_timestamp_seconds",
                     "edge_inspect_model_info", "edge_inspect_frames_inferred_total",
                     "edge_inspect_anomalies_total"):
            assert name in body, name
        assert _get(server.port, "/healthz") == (200, "ok\n")
        status, body = _get(server.port, "/readyz")
        assert status == 503 and json.loads(body) == {"engine_warm": False, "cameras_fresh": True}
        state["engine_warm"] = True
        assert _get(server.port, "/readyz")[0] == 200
        assert _get(server.port, "/nope")[0] == 404
    finally:
        server.stop()


def test_drop_reasons_are_bounded_and_scores_calibrated():
    with pytest.raises(ValueError, match="reason"):
        RuntimeMetrics().drop("cam0", "cosmic rays")
    assert calibrated_score(1.0, 2.0) == 0.25 and calibrated_score(9.0, 1.0) == 1.0
    assert calibrated_score(-1.0, None) == 0.0
