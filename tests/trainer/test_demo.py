"""The offline demo runs end to end on the real textile images and writes its pictures."""

import json

from runtime.cli import main


def test_demo_small_run(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--shots", "4", "--limit", "120", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["method"] == "memory" and report["shots"] == 4
    for kind in ("local", "global"):
        row = report["datasets"][f"textile-{kind}"]["classes"]["textile"]
        assert row["n_test"] == 120 and row["n_anomalous"] > 20
        # K = 4 nominal shots, no defect seen: both defect kinds are found
        assert row["image_auroc"] > 0.97, (kind, row["image_auroc"])
        cal = row["calibration"]["false_alarm"]
        assert cal["n_normal"] == 100 and cal["target_false_alarm_rate"] == 0.01
        for png in (f"roc-textile-{kind}.png", f"histograms-textile-{kind}.png",
                    f"overlays/textile-{kind}-textile.png"):
            assert (out / png).read_bytes()[:4] == b"\x89PNG"
        assert (out / "enrolled" / f"textile-{kind}-textile.safetensors").exists()
    assert "I-AUROC" in capsys.readouterr().out
