"""The offline demo runs end to end on the real textile images and writes its pictures."""

import json

from runtime.cli import main


def test_demo_small_run(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--shots", "4", "--per-kind", "30", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {"local/patch-max", "local/global", "global/patch-max", "global/global"}
    # Each score finds the defect kind it is built for, with 4 shots.
    assert metrics["local/patch-max"]["image_auroc"] > 0.85
    assert metrics["global/global"]["image_auroc"] > 0.8
    for png in ("score_histograms.png", "local_defect_heatmaps.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "AUROC" in capsys.readouterr().out
