"""``edge-inspect demo``: the offline demo, runnable with no downloaded weights.

At this stage of the project (foundation: backbones, datasets, metrics) the demo shows the
weight-free ``texture`` backbone on real images no one here made, the simulated textile
images of ``conformal-clip-data``: it takes K nominal images as the only training data,
keeps their patch tokens as a nearest-neighbour memory, and scores held-out nominal,
local-defect and global-defect images two ways:

* ``patch-max``: the largest distance of any patch token to its nearest memory token
  (finds small local defects);
* ``global``: the distance of the image's CLS token (its mean texture statistics) to the
  mean of the shots' CLS tokens (finds texture-wide changes).

It prints image AUROC / AP / F1-max per defect kind and writes pictures: score histograms
and heatmap overlays. The streaming demo (camera -> ZeroMQ -> engine) replaces this when
the runtime lands; the tuned few-shot head comes with the trainer.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from trainer.backbones.texture import TextureBackbone
from trainer.data import RecordDataset, TextileImages
from trainer.data.transforms import fit_image, to_batch
from trainer.metrics import evaluate

log = logging.getLogger(__name__)
TAPS = (1, 2, 3)
CROP = 248  # 250x250 images cropped, not resampled (see trainer.backbones.texture)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shots", type=int, default=4, help="nominal images in the memory")
    parser.add_argument("--per-kind", type=int, default=100,
                        help="held-out images per kind (nominal, local, global)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("demo-output"),
                        help="folder for metrics.json and the pictures")
    parser.add_argument("--batch", type=int, default=16)


def extract(backbone: TextureBackbone, ds: RecordDataset, indices: list[int], batch: int,
            desc: str) -> tuple[torch.Tensor, list[np.ndarray]]:
    """Concatenated tap tokens ``(N, 1 + rows*cols, C)`` and the cropped images."""
    tokens, images = [], []
    for start in tqdm(range(0, len(indices), batch), desc=desc, unit="batch", leave=False):
        crops = [fit_image(ds[i].image, (CROP, CROP), "center_crop")
                 for i in indices[start:start + batch]]
        images.extend(crops)
        x = to_batch(crops, (CROP, CROP), backbone.normalization, "center_crop")
        with torch.no_grad():
            taps = backbone.forward_taps(x, TAPS)
        tokens.append(torch.cat([taps[k] for k in TAPS], dim=-1))
    return torch.cat(tokens), images


class NearestNeighbourScorer:
    """Standardized nearest-neighbour distances to the shots' patch tokens."""

    def __init__(self, shot_tokens: torch.Tensor) -> None:
        patches = shot_tokens[:, 1:].reshape(-1, shot_tokens.shape[-1])
        self.mean = patches.mean(0)
        self.std = patches.std(0) + 1e-6
        self.memory = (patches - self.mean) / self.std
        self.global_ref = ((shot_tokens[:, 0] - self.mean) / self.std).mean(0)

    def patch_distances(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(N, rows*cols)`` distance of each patch to its nearest memory patch."""
        z = (tokens[:, 1:] - self.mean) / self.std
        d = torch.cdist(z.reshape(-1, z.shape[-1]), self.memory).min(dim=1).values
        return d.reshape(z.shape[0], -1)

    def global_distance(self, tokens: torch.Tensor) -> torch.Tensor:
        return (((tokens[:, 0] - self.mean) / self.std) - self.global_ref).norm(dim=1)


def _plots(out: Path, scores: dict[str, dict[str, np.ndarray]], maps: np.ndarray,
           images: list[np.ndarray], grid: tuple[int, int]) -> None:
    import cv2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (name, by_kind) in zip(axes, scores.items(), strict=True):
        bins = np.linspace(min(v.min() for v in by_kind.values()),
                           max(v.max() for v in by_kind.values()), 40)
        for kind, values in by_kind.items():
            ax.hist(values, bins=bins, alpha=0.55, label=kind)
        ax.set_title(f"{name} score")
        ax.set_xlabel("score")
        ax.legend()
    axes[0].set_ylabel("images")
    fig.tight_layout()
    fig.savefig(out / "score_histograms.png", dpi=110)
    plt.close(fig)

    tiles = []
    vmax = float(maps.max())
    for image, amap in zip(images, maps, strict=True):
        heat = cv2.resize(amap.reshape(grid).astype(np.float32), image.shape[1::-1],
                          interpolation=cv2.INTER_LINEAR)
        heat = cv2.applyColorMap(np.uint8(255 * np.clip(heat / vmax, 0, 1)), cv2.COLORMAP_JET)
        overlay = cv2.addWeighted(image[..., ::-1], 0.55, heat, 0.45, 0)
        tiles.append(np.hstack([image[..., ::-1], overlay]))
    cv2.imwrite(str(out / "local_defect_heatmaps.png"), np.vstack(tiles))


def run(args: argparse.Namespace) -> int:
    rng = np.random.default_rng(args.seed)
    data = {kind: TextileImages([kind]) for kind in TextileImages.KINDS}
    nominal_order = rng.permutation(len(data["nominal"])).tolist()
    shots = nominal_order[: args.shots]
    held_out = {
        "nominal": nominal_order[args.shots: args.shots + args.per_kind],
        "local": rng.permutation(len(data["local"]))[: args.per_kind].tolist(),
        "global": rng.permutation(len(data["global"]))[: args.per_kind].tolist(),
    }
    backbone = TextureBackbone(CROP).eval()
    shot_tokens, _ = extract(backbone, data["nominal"], shots, args.batch, "shots")
    scorer = NearestNeighbourScorer(shot_tokens)
    patch_max, global_score, local_maps, local_images = {}, {}, None, None
    for kind, idx in held_out.items():
        tokens, images = extract(backbone, data[kind], idx, args.batch, kind)
        dist = scorer.patch_distances(tokens)
        patch_max[kind] = dist.max(dim=1).values.numpy()
        global_score[kind] = scorer.global_distance(tokens).numpy()
        if kind == "local":
            local_maps, local_images = dist[:4].numpy(), images[:4]

    results: dict[str, dict] = {}
    print(f"\ntexture backbone, {args.shots} nominal shots, {args.per_kind} held-out images per "
          f"kind, seed {args.seed}")
    print(f"{'defect kind':12s} {'score':10s} {'AUROC':>7s} {'AP':>7s} {'F1-max':>7s}")
    for kind in ("local", "global"):
        for name, scores in (("patch-max", patch_max), ("global", global_score)):
            y = np.r_[np.zeros(len(scores["nominal"])), np.ones(len(scores[kind]))]
            m = evaluate(y, np.r_[scores["nominal"], scores[kind]])
            results[f"{kind}/{name}"] = m.as_dict()
            print(f"{kind:12s} {name:10s} {m.image_auroc:7.3f} {m.image_ap:7.3f} "
                  f"{m.image_f1_max:7.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(
        {"shots": args.shots, "per_kind": args.per_kind, "seed": args.seed, "metrics": results},
        indent=2))
    _plots(args.out, {"patch-max": patch_max, "global": global_score}, local_maps,
           local_images, backbone.grid)
    print(f"\nwrote {args.out}/metrics.json, score_histograms.png, local_defect_heatmaps.png")
    return 0
