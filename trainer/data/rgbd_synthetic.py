"""The generated RGB-D task as a dataset: scenes of :mod:`runtime.synthetic_rgbd` (a printed
sheet on a curved support; geometry-only dents, colour-only stains), each drawn from
``(seed, split, index)`` alone: identical on every machine, no files. Samples carry
``image`` (RGB uint8), ``xyz`` (float32 metres) and the defect mask.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_inspect.runtime.synthetic_rgbd import KINDS, intrinsics, render
from edge_inspect.trainer.data.sample import Record, RecordDataset, Sample

__all__ = ["KINDS", "SyntheticRGBD", "intrinsics", "render"]


class SyntheticRGBD(RecordDataset):
    """RGB + point-cloud pairs with geometry-only dents and colour-only stains.

    Args:
        split: ``train`` (normal only) or ``test`` (a third normal, a third of each kind).
        count: images.
        size: image side in pixels.
        seed: base seed.
        dropout: fraction of points missing at random.
    """

    def __init__(self, split: str = "test", count: int = 30, size: int = 112, seed: int = 0,
                 dropout: float = 0.0) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split {split!r} unknown; use train or test")
        self.split, self.size, self.seed, self.dropout = split, size, seed, dropout
        records = []
        for i in range(count):
            kind = "good" if split == "train" else ("good", *KINDS)[i % 3]
            records.append(Record(Path(f"rgbd/{split}/{i:04d}.png"), int(kind != "good"), "sheet", kind))
        super().__init__(records, f"synthetic RGB-D {split}")

    def __getitem__(self, index: int) -> Sample:
        record = self.records[index]
        rng = np.random.default_rng([self.seed, 0 if self.split == "train" else 1, index])
        image, xyz, mask = render(self.size, rng, record.defect, self.dropout)
        return Sample(image, record.label, mask, record.class_name, record.image, record.defect, xyz)
