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
    planes: tuple[torch.Tensor, ...] = ()  # the head's further planes (B, C, H, W) float32, raw


# How a 3D plane fits the input: nearest neighbour only, so no point is ever blended with a
# missing one or across a depth edge (the bundle declares the same for the runtime).
GEOMETRY_INTERPOLATION = "nearest"
GEOMETRY_PLANES = ("xyz", "depth")


def sample_plane(sample: Sample, name: str) -> np.ndarray:
    """A sample's raw 3D plane ``(H, W, C)`` float32: ``xyz`` (its point map) or ``depth``
    (the point map's z, the depth of an organized cloud from a pinhole camera)."""
    if name not in GEOMETRY_PLANES:
        raise ValueError(f"input plane {name!r} unknown; choose one of {GEOMETRY_PLANES}")
    if sample.xyz is None:
        raise ValueError(f"{sample.path} has no 3D data, but the model takes a {name} plane: use "
                         "an RGB-D dataset (mvtec3d; eyecandies with render: rgb and its "
                         "<id>_depth.png + <id>_info_depth.yaml; rgbd_synthetic)")
    return sample.xyz if name == "xyz" else sample.xyz[..., 2:3]


class BatchLoader:
    """Reads samples and fits them to the backbone's input (one place for both loops).

    ``planes``: the further input planes a head takes after the RGB image (``xyz`` /
    ``depth``), fitted like the image but with nearest-neighbour resampling, not normalized.
    """

    def __init__(self, size: tuple[int, int], normalization: Normalization, fit_mode: str,
                 interpolation: str = "bicubic", planes: tuple[str, ...] = ()) -> None:
        self.size, self.normalization, self.fit_mode = size, normalization, fit_mode
        self.interpolation = interpolation
        self.planes = tuple(planes)

    def __call__(self, items: list[tuple[RecordDataset, int]]) -> Batch:
        samples = [ds[i] for ds, i in items]
        pictures = [fit_image(s.image, self.size, self.fit_mode, self.interpolation) for s in samples]
        images = to_batch(pictures, self.size, self.normalization, self.fit_mode, self.interpolation)
        masks = np.stack([fit_mask(s.mask, self.size, self.fit_mode) for s in samples])
        labels = torch.tensor([s.label for s in samples])
        planes = tuple(
            torch.from_numpy(np.stack([fit_image(sample_plane(s, name), self.size, self.fit_mode,
                                                 GEOMETRY_INTERPOLATION) for s in samples]))
            .permute(0, 3, 1, 2).float().contiguous()
            for name in self.planes)
        return Batch(images, labels, torch.from_numpy(masks), pictures, samples, planes)


SAMPLINGS = ("shuffle", "balanced")


class StepBatches(torch.utils.data.Dataset):
    """Item ``s`` is the batch of optimiser step ``s``: lets a DataLoader prefetch with workers.

    ``shuffle``: a seeded permutation of all images per epoch. ``balanced`` (CMAD's code):
    half the batch normal, half anomalous, each class walking its own seeded permutations
    and starting a new one when it runs out (the smaller class is seen more often). Either
    way step ``s`` always sees the same images: resuming at ``s`` continues the sequence.
    """

    def __init__(self, datasets: list[RecordDataset], batch_size: int, seed: tuple[int, ...],
                 loader: BatchLoader, sampling: str = "shuffle") -> None:
        if sampling not in SAMPLINGS:
            raise ValueError(f"train.sampling {sampling!r} unknown; choose one of {SAMPLINGS}")
        self.items = [(ds, i) for ds in datasets for i in range(len(ds))]
        self.batch_size, self.seed, self.loader = batch_size, seed, loader
        self.sampling = sampling
        self.steps_per_epoch = -(-len(self.items) // batch_size)
        self._orders: dict[tuple[int, int], np.ndarray] = {}
        if sampling == "balanced":
            labels = np.array([ds.records[i].label for ds, i in self.items])
            self.pools = [np.nonzero(labels == c)[0] for c in (0, 1)]
            names = ", ".join(ds.name for ds in datasets)
            if batch_size % 2 or not all(len(p) for p in self.pools):
                raise ValueError(f"balanced batches need an even train.batch_size and both normal "
                                 f"and anomalous images; {names} has {len(self.pools[0])} normal, "
                                 f"{len(self.pools[1])} anomalous (use train.sampling=shuffle)")

    def _balanced(self, step: int) -> list[int]:
        half, out = self.batch_size // 2, []
        for c, pool in enumerate(self.pools):
            for draw in range(step * half, (step + 1) * half):
                epoch, within = divmod(draw, len(pool))
                if (c, epoch) not in self._orders:
                    self._orders = {k: v for k, v in self._orders.items()
                                    if k[0] != c or k[1] >= epoch - 1}
                    rng = np.random.default_rng([*self.seed, c, epoch])
                    self._orders[c, epoch] = rng.permutation(len(pool))
                out.append(int(pool[self._orders[c, epoch][within]]))
        return out

    def indices(self, step: int) -> list[int]:
        if self.sampling == "balanced":
            return self._balanced(step)
        epoch, within = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([*self.seed, epoch]).permutation(len(self.items))
        return order[within * self.batch_size:(within + 1) * self.batch_size].tolist()

    def __len__(self) -> int:
        return 1 << 30  # indexed by step; the sampler bounds it

    def __getitem__(self, step: int):
        """Images, labels, masks, the samples' ids (keys of the feature cache) and the
        further planes (a tuple, empty for RGB-only heads)."""
        idx = self.indices(step)
        b = self.loader([self.items[i] for i in idx])
        return b.images, b.labels, b.masks, torch.tensor(idx), b.planes
