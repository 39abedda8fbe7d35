"""Why the textile operating point misses: each detector of the memory head on its own.

Same draws as ``textile_operating_point.py`` (K = 4 nominal shots per seed, the demo's
model). For every image it keeps the two detectors' scores separately -- local (patch
memory) and window (the Gaussian of window-mean texture features) -- plus an image-level
mean-shift statistic ``(m - mu)^T P (m - mu)`` of the image's mean texture features, and
reports per seed the share of each defect kind above each detector's own 1 % quantile of
the test normals (its detection rate at 1 % false alarms), and the normal 99 % quantile of
the window detector.

``--reference N`` adds the candidate fix of issue 13: the mean-shift statistic with its
reference (mean, covariance of image-level features) fitted on N held-out normals, and a
threshold per detector from ``--calibration`` further normals (``--local-share`` of the
false-alarm budget to the local detector, the rest to the shift), fused by
``max(score_d / t_d) > 1``; test false alarms and misses per kind.

    .venv/bin/python benchmarks/textile_detectors.py --reference 100 --calibration 300 --local-share 0.7

Writes benchmarks/results/textile_detectors.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from edge_inspect.trainer.config import RunConfig
from edge_inspect.trainer.data.batches import BatchLoader
from edge_inspect.trainer.evaluate import load_head, split_normals

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def detector_scores(head, loader, test, idx: list[int]) -> dict[str, np.ndarray]:
    local, window, means = [], [], []
    for s in range(0, len(idx), 32):
        b = loader([(test, i) for i in idx[s:s + 32]])
        taps = head.backbone.forward_taps(b.images, head.taps)
        patches, grids = head._features(taps)
        local.append((head.local(patches) / head.local_reference).amax(1))
        window.append(1 + torch.log(head.glob(grids).clamp(min=1e-6)))
        means.append(head.glob.window_means(grids.float()).mean(1))
    return {"local": torch.cat(local).numpy(), "window": torch.cat(window).numpy(),
            "means": torch.cat(means).double().numpy()}


def mahalanobis(x: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    d = x - mean
    return np.einsum("ij,jk,ik->i", d, precision, d) / x.shape[1]


def gaussian(x: np.ndarray, ridge: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    cov = np.cov(x.T)
    cov += ridge * np.trace(cov) / len(cov) * np.eye(len(cov))
    return x.mean(0), np.linalg.inv(cov)


def upper(x: np.ndarray, rate: float) -> float:
    """The conformal threshold: at most a ``rate`` share of new normals above it."""
    s = np.sort(x)
    return float(s[min(math.ceil((len(s) + 1) * (1 - rate)), len(s)) - 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="draws first-seed .. first-seed + seeds - 1 (fresh ones to confirm a choice)")
    parser.add_argument("--rate", type=float, default=0.01)
    parser.add_argument("--reference", type=int, default=0, help="normals for the shift reference")
    parser.add_argument("--calibration", type=int, default=300, help="normals for the thresholds")
    parser.add_argument("--local-share", type=float, default=0.5,
                        help="share of the false-alarm budget given to the local detector")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    cfg = RunConfig.from_yaml(ROOT / "configs/memory/textile-texture.yaml", [
        "calibration.normals=0", "eval.limit=null", "data.target=[{name: textile, kind: textile}]",
        "head.global_detector=window", "head.border_rings=0"])  # the detectors as they were before issue 13
    head = load_head(cfg, None)
    loader = BatchLoader(head.backbone.input_size, head.backbone.normalization, cfg.fit_mode,
                         cfg.interpolation)
    spec = cfg.target_data[0]
    test = spec.open()
    rows = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        shots, _, idx = split_normals(cfg, spec, test, None, "textile", seed)
        head.enroll(loader(shots).images)
        sc = detector_scores(head, loader, test, idx)
        kinds = np.array([test.records[i].defect for i in idx])
        good = kinds == "good"
        shots_mean = head.glob.mean.double().numpy()
        shift = mahalanobis(sc["means"], shots_mean, head.glob.precision.double().numpy())
        row = {"seed": seed, "window_normal_q99": float(np.quantile(sc["window"][good], 0.99))}
        for name, x in (("local", sc["local"]), ("window", sc["window"]), ("shift_k_shot", shift)):
            t = np.quantile(x[good], 1 - args.rate)
            for kind in ("local", "global"):
                row[f"{name}_detects_{kind}"] = float((x[kinds == kind] > t).mean())
        if args.reference:
            normals = np.nonzero(good)[0]
            order = np.random.default_rng(seed).permutation(normals)
            ref = order[:args.reference]
            cal = order[args.reference:args.reference + args.calibration]
            rest = order[args.reference + args.calibration:]
            shift_ref = mahalanobis(sc["means"], *gaussian(sc["means"][ref]))
            a_local = args.rate * args.local_share
            fused = np.maximum(sc["local"] / upper(sc["local"][cal], a_local),
                               shift_ref / upper(shift_ref[cal], args.rate - a_local))
            row["fix_false_alarms"] = float((fused[rest] > 1).mean())
            row["fix_n_test_normal"] = int(rest.size)
            for kind in ("local", "global"):
                row[f"fix_miss_{kind}"] = float((fused[kinds == kind] <= 1).mean())
        rows.append(row)
        print(row, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"rate": args.rate, "reference": args.reference, "calibration": args.calibration,
              "local_share": args.local_share, "rows": rows}
    (args.out / "textile_detectors.json").write_text(json.dumps(report, indent=2))
    flags = (f" --reference {args.reference} --calibration {args.calibration} --local-share "
             f"{args.local_share}" if args.reference else "")
    lines = [f"Memory head detectors on the textile images, K = 4, {args.seeds} shot draws; "
             f"detection rate at each detector's own {args.rate:.0%} false alarms.",
             f"Command: `python benchmarks/textile_detectors.py{flags}`",
             "", "| seed | local detector: local / global | window detector: local / global | "
             "window normal q99 | K-shot shift: global |"
             + (" fix: false alarms / miss local / miss global |" if args.reference else ""),
             "|---|---|---|---|---|" + ("---|" if args.reference else "")]
    for r in rows:
        line = (f"| {r['seed']} | {r['local_detects_local']:.1%} / {r['local_detects_global']:.1%} | "
                f"{r['window_detects_local']:.1%} / {r['window_detects_global']:.1%} | "
                f"{r['window_normal_q99']:.2f} | {r['shift_k_shot_detects_global']:.1%} |")
        if args.reference:
            line += (f" {r['fix_false_alarms']:.2%} / {r['fix_miss_local']:.1%} / "
                     f"{r['fix_miss_global']:.1%} |")
        lines.append(line)
    (args.out / "textile_detectors.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
