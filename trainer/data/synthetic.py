"""A generated anomaly task with planted defects and exact masks, for tests and smoke runs.

Every image is a seeded texture (a few oriented sinusoids plus noise, one style per
class); anomalous images get one to two planted blobs of a different colour and grain,
whose pixels are the ground-truth mask. Images are generated on demand from
``(seed, split, index)``, so the task is identical on every machine and needs no files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_inspect.trainer.data.sample import Record, RecordDataset, Sample

STYLES = ("stripes", "grain", "weave", "fine")


class SyntheticDefects(RecordDataset):
    """Planted-defect images.

    Args:
        split: ``train`` (normal images only) or ``test`` (half anomalous).
        classes: class names, each one of :data:`STYLES`.
        per_class: images per class.
        size: image side in pixels.
        seed: base seed; different splits and classes draw from different streams.
        blob_radius: (min, max) defect radius in pixels.
    """

    def __init__(self, split: str = "test", classes: tuple[str, ...] | list[str] = ("stripes",),
                 per_class: int = 32, size: int = 128, seed: int = 0,
                 blob_radius: tuple[int, int] = (10, 20)) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split {split!r} unknown; use train or test")
        unknown = set(classes) - set(STYLES)
        if unknown:
            raise ValueError(f"synthetic classes {sorted(unknown)} unknown; choose from {STYLES}")
        self.split, self.size, self.seed = split, size, seed
        self.blob_radius = blob_radius
        records = []
        for name in classes:
            for i in range(per_class):
                label = int(split == "test" and i % 2 == 1)
                path = Path(f"synthetic/{split}/{name}/{i:04d}.png")
                records.append(Record(path, label, name, "blob" if label else "good"))
        super().__init__(records, f"synthetic {split} {list(classes)}")

    def __getitem__(self, index: int) -> Sample:
        rec = self.records[index]
        style = STYLES.index(rec.class_name)
        stream = [self.seed, int(self.split == "test"), style, index]
        rng = np.random.default_rng(stream)
        image = self._texture(rng, style)
        mask = np.zeros((self.size, self.size), np.uint8)
        if rec.label:
            for _ in range(rng.integers(1, 3)):
                self._plant(rng, image, mask)
        return Sample(np.clip(image, 0, 255).astype(np.uint8), rec.label, mask, rec.class_name,
                      rec.image, rec.defect)

    def _texture(self, rng: np.random.Generator, style: int) -> np.ndarray:
        n = self.size
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
        base = np.zeros((n, n), np.float32)
        freqs = (6.0, 3.0, 10.0, 13.0)[style]
        for _ in range(3):
            angle = rng.uniform(0, np.pi)
            f = freqs * rng.uniform(0.8, 1.2)
            phase = rng.uniform(0, 2 * np.pi)
            base += np.sin(2 * np.pi * f * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
        base = 128 + 25 * base / 3 + rng.normal(0, 8, (n, n))
        tint = np.array([(1.0, 0.95, 0.9), (0.9, 1.0, 0.95), (0.95, 0.9, 1.0), (1.1, 0.9, 0.9)][style],
                        np.float32)
        return base[..., None] * tint

    def _plant(self, rng: np.random.Generator, image: np.ndarray, mask: np.ndarray) -> None:
        n = self.size
        r = rng.integers(self.blob_radius[0], self.blob_radius[1] + 1)
        cy, cx = rng.integers(r, n - r, size=2)
        yy, xx = np.mgrid[0:n, 0:n]
        ax, ay = r * rng.uniform(0.7, 1.3), r * rng.uniform(0.7, 1.3)
        blob = ((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2 <= 1.0
        colour = rng.choice([(200, 60, 40), (40, 40, 40), (230, 220, 90)])
        grain = rng.normal(0, 20, (n, n, 1))
        image[blob] = (np.asarray(colour, np.float32) + grain)[blob]
        mask[blob] = 1
