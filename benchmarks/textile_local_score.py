"""The memory head's local detector on the textile images: the largest patch score (the
previous setting) against the mean of the 3 largest (``head.local_top: 3``), per shot draw.

The demo's model (``configs/memory/textile-texture.yaml``: texture backbone, K = 4 shots,
each also turned by 90/180/270 degrees, border-ring scales, Gumbel tails, 0.65 of a 1 %
false-alarm budget to the local detector). Per draw the shots, held-out normals and test
images are drawn as ``edge-inspect eval`` draws them; the memory is enrolled by the head
itself (:meth:`MemoryHead.enroll`, turns included); every held-out and test image's patch
distances (over the memory's fold reference) and global score are kept in
``<cache>/<seed>.npz``, so the candidates below are scored on identical numbers and a
rerun reuses them. Candidates, each calibrated as ``eval`` calibrates (100 normals fit the
border scales, 400 set the per-detector Gumbel thresholds):

* ``max``: the local detector is the largest patch score (before this change);
* ``max, 0.7 % target``: the same at a lower false-alarm target (the other way to bring
  the worst draws under 2 %: fewer false alarms for more misses);
* ``top-3 mean`` (shipped): the mean of the 3 largest patch scores. A normal image's largest
  patch score is often one odd patch of weave; a defect raises several neighbouring
  patches, so averaging the top 3 lowers the normal tail more than the defects' scores.

Draw ranges are reported apart: 0-59 were looked at while issue 13's calibration settings
were chosen (with the largest patch score), 60-79 while the top-3 mean was chosen, 80-99
were first scored after that choice (unseen).

    .venv/bin/python benchmarks/textile_local_score.py --seeds 100   # ~2 h on 2 cores (75 s a draw)

Writes <out>/textile_local_score.{json,md} (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from textile_calibration_choices import all_features, textile_setup  # the same features
from tqdm import tqdm

from edge_inspect.runtime.calibration import gumbel_threshold
from edge_inspect.runtime.enrollment import border_scale
from edge_inspect.trainer.evaluate import split_normals
from edge_inspect.trainer.memory import ImageShift, mahalanobis
from edge_inspect.trainer.metrics import auroc

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
TARGET = {"false_alarm": 0.02, "miss": 0.05, "auroc": 0.99}  # issue 13
REFERENCE, SHARE = 100, 0.65
CANDIDATES = {"max": (1, 0.01), "max, 0.7 % target": (1, 0.007), "top-3 mean (shipped)": (3, 0.01)}
RANGES = (("0-59 (calibration chosen on)", 0, 60), ("60-79 (top-3 chosen on)", 60, 80),
          ("80-99 (unseen)", 80, 100))


@torch.no_grad()
def draw_scores(cfg, head, loader, test, local, means, seed: int) -> dict:
    """Patch distances over the fold reference and global scores of one draw's held-out
    (first) and test images."""
    shots, calib, test_idx = split_normals(cfg, cfg.target_data[0], test, None, "textile", seed)
    head.enroll(loader(shots).images)
    idx = [i for _, i in calib] + test_idx
    patch = torch.cat([head.local(local[idx[s:s + 64]]) / head.local_reference
                       for s in range(0, len(idx), 64)])
    shift = ImageShift(means[[i for _, i in calib[:REFERENCE]]])
    glob = 1.0 + torch.log(mahalanobis(means[idx], shift.mean, shift.precision).clamp(min=1e-6))
    return {"patch": patch.float().numpy(), "glob": glob.double().numpy(),
            "kinds": np.array([test.records[i].defect for i in idx]), "n_calib": len(calib)}


def operating_point(d: dict, grid: tuple[int, int], top: int, rate: float) -> dict:
    patch = d["patch"].astype(np.float64)
    patch = patch / border_scale(patch[:REFERENCE], grid, 1, 0.999)
    local = np.sort(patch, axis=1)[:, -top:].mean(axis=1)
    glob, n = d["glob"], int(d["n_calib"])
    t_local = gumbel_threshold(local[REFERENCE:n], rate * SHARE)
    t_global = gumbel_threshold(glob[REFERENCE:n], rate * (1 - SHARE))
    score = np.maximum(local / t_local, glob / t_global)[n:]
    kinds = d["kinds"][n:]
    good = score[kinds == "good"]
    out = {"false_alarm": float((good > 1).mean())}
    for kind in ("local", "global"):
        bad = score[kinds == kind]
        out[f"miss_{kind}"] = float((bad <= 1).mean())
        out[f"auroc_{kind}"] = auroc(np.r_[np.zeros(good.size), np.ones(bad.size)], np.r_[good, bad])
    return out


def summary(rows: list[dict]) -> dict:
    failing = [r["seed"] for r in rows if r["false_alarm"] > TARGET["false_alarm"]
               or max(r["miss_local"], r["miss_global"]) > TARGET["miss"]
               or min(r["auroc_local"], r["auroc_global"]) < TARGET["auroc"]]
    out = {"draws": len(rows), "failing": failing}
    for k in ("false_alarm", "miss_local", "miss_global"):
        out[f"worst_{k}"] = max(r[k] for r in rows)
        out[f"mean_{k}"] = float(np.mean([r[k] for r in rows]))
    for k in ("auroc_local", "auroc_global"):
        out[f"worst_{k}"] = min(r[k] for r in rows)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--cache", type=Path, default=Path("runs/textile-local-score-cache"),
                        help="folder of per-draw scores (reused when present)")
    parser.add_argument("--cached-only", action="store_true",
                        help="score only the draws already in --cache (compute no new ones)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    cfg, head, loader, test = textile_setup()
    args.cache.mkdir(parents=True, exist_ok=True)
    features = None
    rows = {name: [] for name in CANDIDATES}
    for seed in tqdm(range(args.seeds), desc="draws", unit="draw"):
        file = args.cache / f"{seed}.npz"
        if not file.exists() and args.cached_only:
            continue
        if not file.exists():
            if features is None:
                features = all_features(head, loader, test)
            np.savez(file, **draw_scores(cfg, head, loader, test, *features, seed))
        d = dict(np.load(file))
        for name, (top, rate) in CANDIDATES.items():
            rows[name].append({"seed": seed} | operating_point(d, head.backbone.grid, top, rate))
    report = {"config": "configs/memory/textile-texture.yaml", "target": TARGET, "candidates": {}}
    lines = [f"Textile images, texture + memory, K = {cfg.shots} with shot turns; local detector "
             "candidates, per-detector Gumbel thresholds.",
             f"Command: `.venv/bin/python benchmarks/textile_local_score.py --seeds {args.seeds}"
             f"{' --cached-only' if args.cached_only else ''}`", "",
             "| candidate | draws | worst false alarms (mean) | worst miss local (mean) | "
             "worst miss global | worst AUROC local / global | draws failing a target |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        report["candidates"][name] = {"rows": r}
        for label, lo, hi in RANGES:
            part = [x for x in r if lo <= x["seed"] < hi]
            if not part:
                continue
            s = summary(part)
            report["candidates"][name][label] = s
            lines.append(f"| {name} | {label}, {s['draws']} | {s['worst_false_alarm']:.2%} "
                         f"({s['mean_false_alarm']:.2%}) | {s['worst_miss_local']:.1%} "
                         f"({s['mean_miss_local']:.2%}) | {s['worst_miss_global']:.1%} | "
                         f"{s['worst_auroc_local']:.4f} / {s['worst_auroc_global']:.4f} | "
                         f"{s['failing'] or 'none'} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "textile_local_score.json").write_text(json.dumps(report, indent=2))
    (args.out / "textile_local_score.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
