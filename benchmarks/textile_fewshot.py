"""Few-shot quality on the textile images of conformal-clip-data, texture backbone + memory.

Fit on K nominal images only (no defective image seen; the shots-only head,
``global_detector: window``: the shipped shift detector needs held-out normals, see
``textile_operating_point.py``), then score every other nominal
image and all local- and global-defect images; image AUROC of nominal vs local and nominal
vs global, for K in {1, 4, 16} and 3 seeds (the shots drawn by the seed). Backbone
features are computed once per image and shared by all runs.

    .venv/bin/python benchmarks/textile_fewshot.py

Writes benchmarks/results/textile_fewshot.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from edge_inspect.trainer.backbones.texture import TextureBackbone
from edge_inspect.trainer.data import TextileImages
from edge_inspect.trainer.data.transforms import to_batch
from edge_inspect.trainer.heads.memory import TEXTURE_MEMORY, MemoryHead
from edge_inspect.trainer.metrics import auroc

RESULTS = Path(__file__).resolve().parent / "results"
INPUT = 248  # 250x250 images, centre-cropped (no resampling)


def extract_all(backbone: TextureBackbone, taps: tuple[int, ...], batch: int = 32):
    """Taps of every textile image, per kind: {kind: {tap: (N, 1 + grid, C)}}."""
    out = {}
    for kind in TextileImages.KINDS:
        ds = TextileImages([kind])
        chunks: dict[int, list[torch.Tensor]] = {k: [] for k in taps}
        for start in tqdm(range(0, len(ds), batch), desc=f"features {kind}", unit="batch"):
            images = [ds[i].image for i in range(start, min(start + batch, len(ds)))]
            x = to_batch(images, (INPUT, INPUT), backbone.normalization, "center_crop")
            with torch.no_grad():
                feats = backbone.forward_taps(x, taps)
            for k in taps:
                chunks[k].append(feats[k])
        out[kind] = {k: torch.cat(v) for k, v in chunks.items()}
    return out


def select(taps: dict[int, torch.Tensor], idx) -> dict[int, torch.Tensor]:
    return {k: v[idx] for k, v in taps.items()}


def score(head: MemoryHead, taps: dict[int, torch.Tensor], batch: int = 64) -> np.ndarray:
    n = next(iter(taps.values())).shape[0]
    out = []
    with torch.no_grad():
        for s in range(0, n, batch):
            out.append(head.score_taps(select(taps, slice(s, s + batch)))[0])
    return torch.cat(out).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    cfg = replace(TEXTURE_MEMORY, global_detector="window", border_rings=0)
    backbone = TextureBackbone(INPUT).eval()
    taps = tuple(sorted(set(cfg.local_taps) | set(cfg.global_taps)))
    feats = extract_all(backbone, taps)
    n_nominal = next(iter(feats["nominal"].values())).shape[0]

    rows = []
    for k in args.shots:
        for seed in tqdm(args.seeds, desc=f"K={k}", unit="seed"):
            order = np.random.default_rng(seed).permutation(n_nominal)
            shots, held_out = order[:k], order[k:]
            head = MemoryHead(backbone, cfg, select(feats["nominal"], torch.as_tensor(shots)))
            normal = score(head, select(feats["nominal"], torch.as_tensor(held_out)))
            row = {"shots": k, "seed": seed, "n_nominal": len(normal)}
            for kind in ("local", "global"):
                defect = score(head, feats[kind])
                y = np.r_[np.zeros(len(normal)), np.ones(len(defect))]
                row[f"auroc_{kind}"] = auroc(y, np.r_[normal, defect])
                row[f"n_{kind}"] = len(defect)
            rows.append(row)

    # Per-frame cost of the memory scoring relative to the backbone, K = 4, batch 1.
    head = MemoryHead(backbone, cfg, select(feats["nominal"], torch.arange(4)))
    x = to_batch([TextileImages(["nominal"])[999].image], (INPUT, INPUT),
                 backbone.normalization, "center_crop")
    with torch.no_grad():
        for _ in range(5):
            head(x)
        t0 = time.perf_counter()
        for _ in range(50):
            f = backbone.forward_taps(x, taps)
        t1 = time.perf_counter()
        for _ in range(50):
            head.score_taps(f)
        t2 = time.perf_counter()
    cost_ratio = (t2 - t1) / (t1 - t0)

    summary = []
    for k in args.shots:
        sel = [r for r in rows if r["shots"] == k]
        entry = {"shots": k}
        for kind in ("local", "global"):
            v = np.array([r[f"auroc_{kind}"] for r in sel])
            entry[kind] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                           "min": float(v.min())}
        summary.append(entry)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "textile_fewshot.json").write_text(json.dumps({
        "command": "python benchmarks/textile_fewshot.py",
        "config": cfg.__dict__, "input": INPUT, "torch": torch.__version__,
        "machine": platform.machine(), "runs": rows, "summary": summary,
        "memory_scoring_over_backbone_cost_k4": cost_ratio,
    }, indent=2))
    lines = ["| K nominal shots | AUROC nominal vs local | AUROC nominal vs global |",
             "|---|---|---|"]
    for e in summary:
        lines.append(f"| {e['shots']} | {e['local']['mean']:.4f} ± {e['local']['std']:.4f} "
                     f"(min {e['local']['min']:.4f}) | {e['global']['mean']:.4f} ± "
                     f"{e['global']['std']:.4f} (min {e['global']['min']:.4f}) |")
    table = "\n".join(lines)
    (args.out / "textile_fewshot.md").write_text(
        "Texture backbone + few-shot memory, textile images (conformal-clip-data); mean ± std "
        f"over seeds {args.seeds}.\nCommand: `python benchmarks/textile_fewshot.py`\n\n{table}\n\n"
        f"Memory scoring costs {cost_ratio:.2f}x the backbone's feature extraction per frame "
        "(K = 4, batch 1, same run).\n")
    _plot(summary, args.out / "textile_fewshot.png")
    print(table)
    print(f"memory scoring / backbone cost per frame (K=4): {cost_ratio:.2f}")


def _plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    ks = [e["shots"] for e in summary]
    for kind in ("local", "global"):
        ax.errorbar(ks, [e[kind]["mean"] for e in summary], yerr=[e[kind]["std"] for e in summary],
                    marker="o", capsize=3, label=f"nominal vs {kind}")
    ax.axhline(0.99, color="gray", ls="--", lw=0.8, label="target 0.99")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K nominal shots")
    ax.set_ylabel("image AUROC")
    ax.set_title("texture + memory on textile images")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
