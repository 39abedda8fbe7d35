"""Batches for the fit and evaluate loops: samples of several datasets -> model tensors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edge_inspect.trainer.backbones.base import Normalization
from edge_inspect.trainer.data.sample import RecordDataset, Sample
from edge_inspect.trainer.data.transforms import fit_image, fit_mask, to_batch


@dataclass
class Batch:
    """Model input and truth for a list of samples (images fitted to the input size)."""

    images: torch.Tensor  # (B, 3, H, W) normalized
    labels: torch.Tensor  # (B,)
    masks: torch.Tensor  # (B, H, W) uint8
    pictures: list[np.ndarray]  # fitted uint8 RGB, for overlays
    samples: list[Sample]


class BatchLoader:
    """Reads samples and fits them to the backbone's input (one place for both loops)."""

    def __init__(self, size: tuple[int, int], normalization: Normalization, fit_mode: str,
                 interpolation: str = "bicubic") -> None:
        self.size, self.normalization, self.fit_mode = size, normalization, fit_mode
        self.interpolation = interpolation

    def __call__(self, items: list[tuple[RecordDataset, int]]) -> Batch:
        samples = [ds[i] for ds, i in items]
        pictures = [fit_image(s.image, self.size, self.fit_mode, self.interpolation) for s in samples]
        images = to_batch(pictures, self.size, self.normalization, self.fit_mode, self.interpolation)
        masks = np.stack([fit_mask(s.mask, self.size, self.fit_mode) for s in samples])
        labels = torch.tensor([s.label for s in samples])
        return Batch(images, labels, torch.from_numpy(masks), pictures, samples)


class StepBatches(torch.utils.data.Dataset):
    """Item ``s`` is the batch of optimiser step ``s``: lets a DataLoader prefetch with workers.

    The order is a seeded permutation per epoch, so step ``s`` always sees the same images:
    resuming at step ``s`` continues the exact sequence.
    """

    def __init__(self, datasets: list[RecordDataset], batch_size: int, seed: tuple[int, ...],
                 loader: BatchLoader) -> None:
        self.items = [(ds, i) for ds in datasets for i in range(len(ds))]
        self.batch_size, self.seed, self.loader = batch_size, seed, loader
        self.steps_per_epoch = -(-len(self.items) // batch_size)

    def indices(self, step: int) -> list[int]:
        epoch, within = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([*self.seed, epoch]).permutation(len(self.items))
        return order[within * self.batch_size:(within + 1) * self.batch_size].tolist()

    def __len__(self) -> int:
        return 1 << 30  # indexed by step; the sampler bounds it

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images, labels, masks and the samples' ids (keys of the feature cache)."""
        idx = self.indices(step)
        b = self.loader([self.items[i] for i in idx])
        return b.images, b.labels, b.masks, torch.tensor(idx)
