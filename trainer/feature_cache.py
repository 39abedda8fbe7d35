"""Frozen-backbone features of training images, computed once and reused every epoch.

The backbone is frozen and AF-CLIP and CMAD train without augmentation, so an image's
taps are the same every time it is drawn. Training asks the method for them
(``MethodTraining.frozen_features``) only for images not cached yet; cached ones come from
host memory (not page-locked: tens of GB of pinned memory would starve the host; the
DataLoader's image batches are pinned on a GPU). Features are stored in ``dtype`` and every
step reads them back through the same rounding, so the loss does not depend on whether an
image was seen before. A budget in bytes bounds the cache; past it, the rest is recomputed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)
Features = dict[str, torch.Tensor]
CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class FeatureCache:
    """Per-sample features keyed by the sample's index in the training set."""

    def __init__(self, max_bytes: int, dtype: str = "float32") -> None:
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"train.cache_dtype {dtype!r} unknown; choose one of {list(CACHE_DTYPES)}")
        self.max_bytes, self.dtype = int(max_bytes), CACHE_DTYPES[dtype]
        self.store: dict[int, Features] = {}
        self.bytes = 0
        self.hits = self.misses = 0
        self._full_logged = False

    def __len__(self) -> int:
        return len(self.store)

    def features(self, keys: list[int], images: torch.Tensor, compute: Callable[..., Features],
                 planes: tuple[torch.Tensor, ...] = ()) -> Features:
        """Features of the batch ``images`` (sample ids ``keys``; ``planes``: the batch's
        further input planes), computing only the missing ones as ``compute(images,
        *planes)``; returned on the images' device in float32, batch-first."""
        missing = [i for i, k in enumerate(keys) if k not in self.store]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh: Features = {}
        if missing:
            with torch.no_grad():
                fresh = compute(images[missing], *[p[missing] for p in planes])
            fresh = {n: t.detach().to(self.dtype) for n, t in fresh.items()}
            for j, i in enumerate(missing):
                self._put(keys[i], {n: t[j] for n, t in fresh.items()})
        computed = set(missing)
        cached = [i for i in range(len(keys)) if i not in computed]
        example = fresh if fresh else self.store[keys[0]]
        out = {}
        for n, t in example.items():
            batch = torch.empty((len(keys), *t.shape[1 if fresh else 0:]), dtype=torch.float32,
                                device=images.device)
            if cached:  # one host-to-device copy for the cached rows of the batch
                with torch.autocast(images.device.type, enabled=False):  # stack as stored
                    rows = torch.stack([self.store[keys[i]][n] for i in cached])
                batch[cached] = rows.to(images.device, non_blocking=True).float()
            if missing:
                batch[missing] = fresh[n].float()
            out[n] = batch
        return out

    def _put(self, key: int, feats: Features) -> None:
        size = sum(t.numel() * t.element_size() for t in feats.values())
        if self.bytes + size > self.max_bytes:
            if not self._full_logged:
                log.info("feature cache full at %.2f GB (%d images); the rest is recomputed; "
                         "raise train.cache_gb to cache more", self.bytes / 1e9, len(self.store))
                self._full_logged = True
            return
        self.store[key] = {n: t.to("cpu", copy=True) for n, t in feats.items()}
        self.bytes += size
