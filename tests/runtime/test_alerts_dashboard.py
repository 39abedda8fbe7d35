"""Alert rules and the Grafana dashboard: valid structure, and every metric they use exists.

`promtool check rules` runs too when promtool is installed (it is not on our CI machine;
the schema test below always runs).
"""

import json
import re
import shutil
import subprocess

import pytest
import yaml

from edge_inspect.runtime.metrics import RuntimeMetrics
from tests.runtime.test_no_torch import REPO

ALERTS = REPO / "configs" / "prometheus" / "alerts.yaml"
DASHBOARD = REPO / "configs" / "grafana" / "edge-inspect.json"
NEEDED = {"EdgeInspectStreamStalled", "EdgeInspectP99LatencyHigh", "EdgeInspectAnomalyRateHigh",
          "EdgeInspectFrameDrops", "EdgeInspectRuntimeDown"}


def _known_series() -> set[str]:
    names = set()
    for family in RuntimeMetrics().registry.collect():
        names.add(family.name)
        names |= {s.name for s in family.samples}
        if family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count")}
        if family.type == "counter":
            names.add(family.name + "_total")
    return names


def _metrics_in(expr: str) -> set[str]:
    return set(re.findall(r"\b(edge_inspect_[a-z0-9_]+)", expr))


def test_alert_rules_schema_and_metrics():
    doc = yaml.safe_load(ALERTS.read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} == NEEDED
    known = _known_series()
    for r in rules:
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}, r["alert"]
        assert re.fullmatch(r"\d+[smh]", r["for"]) and r["labels"]["severity"] in ("warning", "critical")
        assert r["annotations"]["summary"] and r["annotations"]["description"]
        used = _metrics_in(r["expr"])
        assert used and used <= known, (r["alert"], used - known)
        assert r["expr"].count("(") == r["expr"].count(")")


def test_dashboard_panels_use_existing_metrics():
    dash = json.loads(DASHBOARD.read_text())
    known = _known_series()
    assert dash["uid"] == "edge-inspect" and len(dash["panels"]) >= 6
    for panel in dash["panels"]:
        for target in panel["targets"]:
            used = _metrics_in(target["expr"])
            assert used and used <= known, (panel["title"], used - known)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed here")
def test_promtool_accepts_the_rules():
    proc = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboard_filters_every_camera_series_by_the_camera_variable():
    dash = json.loads(DASHBOARD.read_text())
    (var,) = [v for v in dash["templating"]["list"] if v["name"] == "camera"]
    assert var["type"] == "query" and "label_values(edge_inspect_frames_received_total, camera)" in (
        var["query"]["query"]) and var["includeAll"] and var["multi"]
    metrics = RuntimeMetrics()
    metrics.start_cameras(["cam"], "m")  # every per-camera series exists once a camera does
    camera_labelled = {f.name for f in metrics.registry.collect()
                       if any("camera" in s.labels for s in f.samples)}
    assert {"edge_inspect_frames_dropped", "edge_inspect_last_score"} <= camera_labelled
    checked = 0
    for panel in dash["panels"]:
        for target in panel["targets"]:
            for name in _metrics_in(target["expr"]):
                base = re.sub(r"_(total|bucket|sum|count)$", "", name)
                if base in camera_labelled:
                    assert re.search(rf'{name}\{{camera=~"\$camera"\}}', target["expr"]), target["expr"]
                    checked += 1
    assert checked >= 9
    assert any("edge_inspect_threshold" in t["expr"] for p in dash["panels"] for t in p["targets"])
