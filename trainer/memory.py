"""Few-shot memories built from K normal images, usable by every method.

* :class:`PatchMemory` -- nearest-neighbour patch memory (PatchCore / AF-CLIP+ style):
  a patch's score is its distance to the closest normal patch. ``metric="cosine"`` gives
  AF-CLIP+'s ``min_b (1 - <c, b>) / 2`` (Eq. 17) on L2-normalized features;
  ``metric="standardized"`` gives the Euclidean distance after standardizing each channel
  with the shots' mean and std (for features whose channels have unrelated units, like the
  texture backbone's log energies).
* :class:`WindowGaussian` -- the global statistics of a stationary texture: a Gaussian
  (mean, full covariance) of feature means over sliding windows of the patch grid. A
  test image's score is the mean squared Mahalanobis distance of its windows, divided by
  the feature count so normal images score about 1 (the chi-square mean; unseen normal
  images score somewhat higher, since a covariance from few windows overfits them).
* :class:`ImageShift` -- a Gaussian of the image-level mean feature, fitted on held-out
  normal images (not the shots: K images cannot estimate a covariance of image means). A
  test image's score is its squared Mahalanobis distance divided by the feature count
  (about 1 for normal images). A texture that drifts slightly everywhere moves the image
  mean far more, relative to its normal spread, than it moves any one window: on the
  textile images this catches the global defects that the window Gaussian misses
  (``benchmarks/textile_detectors.py``).

All are plain tensors and matrix products, so they export to ONNX as constants.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

METRICS = ("cosine", "standardized")


def nearest_cosine_distance(query: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """AF-CLIP+ Eq. 17 / CMAD Eq. 12: ``min_b (1 - <q, b>) / 2`` for ``(B, N, C)`` queries.

    ``bank`` ``(M, C)`` must already be L2-normalized; one matmul and a min, so the same
    code runs eagerly and as an exported graph (the bank can be a graph input).
    """
    q = F.normalize(query, dim=-1)
    return ((1.0 - q @ bank.T) / 2.0).amin(dim=-1)


class PatchMemory(nn.Module):
    """Normal patch features of K shots; scores are nearest-neighbour distances.

    Args:
        patches: ``(K, N, C)`` patch tokens of the shots (CLS excluded).
        metric: ``cosine`` or ``standardized`` (see module docstring).
        chunk: query rows per distance block, bounding memory use; None: one block (what the
            exported graph does, so it keeps a dynamic batch size).
    """

    def __init__(self, patches: torch.Tensor, metric: str = "cosine", chunk: int | None = None) -> None:
        super().__init__()
        if metric not in METRICS:
            raise ValueError(f"memory metric {metric!r} unknown; choose one of {METRICS}")
        if patches.ndim != 3 or patches.shape[0] < 1:
            raise ValueError(f"expected shot patches (K, N, C), got {tuple(patches.shape)}")
        self.metric = metric
        self.chunk = chunk
        flat = patches.reshape(-1, patches.shape[-1]).float()
        if metric == "standardized":
            mean, std = flat.mean(0), flat.std(0).clamp(min=1e-6)
        else:
            mean, std = flat.new_zeros(flat.shape[1]), flat.new_ones(flat.shape[1])
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.register_buffer("bank", self.embed(flat))
        self.shots, self.per_shot = patches.shape[0], patches.shape[1]

    @classmethod
    def from_state(cls, bank: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                   metric: str) -> PatchMemory:
        """A memory from stored tensors, used as they are (no copy: an export can bind inputs)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.metric, self.chunk = metric, None
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.register_buffer("bank", bank)
        self.shots, self.per_shot = 1, bank.shape[0]
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Features as the memory compares them (normalized or standardized)."""
        if self.metric == "cosine":
            return F.normalize(x.float(), dim=-1)
        return (x.float() - self.mean) / self.std

    @staticmethod
    def _nearest(query: torch.Tensor, bank: torch.Tensor, metric: str,
                 chunk: int | None) -> torch.Tensor:
        if chunk is None:
            chunks = [query]
        else:
            chunks = [query[s:s + chunk] for s in range(0, query.shape[0], chunk)]
        out = []
        for q in chunks:
            if metric == "cosine":
                out.append(((1.0 - q @ bank.T) / 2.0).min(dim=1).values)
            else:
                out.append(torch.cdist(q, bank).min(dim=1).values)
        return torch.cat(out)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """``(B, N, C)`` -> ``(B, N)`` distance of each patch to its nearest memory patch."""
        b, n, c = patches.shape
        q = self.embed(patches.reshape(-1, c))
        return self._nearest(q, self.bank, self.metric, self.chunk).reshape(b, n)

    def fold_reference(self, grid: tuple[int, int], shots: int | None = None) -> torch.Tensor:
        """Typical image-max score of a normal image, from the shots alone.

        Each shot is cut into top and bottom halves; each half is scored against the memory
        without itself (so K = 1 still works) and its maximum kept. Returns the mean of
        those maxima: a scale for the memory's scores that needs no extra normal images.
        ``shots``: only the first that many images of the memory (the unturned shots of a
        memory that also holds turned copies); default all.
        """
        shots = self.shots if shots is None else shots
        bank = self.bank[:shots * self.per_shot].reshape(shots, self.per_shot, -1)
        rows = torch.arange(self.per_shot, device=bank.device) // grid[1]
        top = rows < grid[0] // 2
        maxima = []
        for k in range(shots):
            for half in (top, ~top):
                keep = torch.ones(shots, self.per_shot, dtype=torch.bool, device=bank.device)
                keep[k, half] = False
                d = self._nearest(bank[k, half], bank[keep], self.metric, self.chunk)
                maxima.append(d.max())
        return torch.stack(maxima).mean()


def fit_gaussian(x: torch.Tensor, ridge: float, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and inverse covariance of the rows of ``x`` ``(n, C)``, the covariance's diagonal
    raised by ``ridge`` times its mean variance (keeps near-constant channels invertible)."""
    if x.shape[0] <= x.shape[1] + 1:
        raise ValueError(f"{x.shape[0]} {what} cannot estimate a {x.shape[1]}-d covariance; "
                         f"give more than {x.shape[1] + 1}")
    x = x.double()
    cov = torch.cov(x.T)
    cov = cov + ridge * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype,
                                                           device=cov.device)
    return x.mean(0).float(), torch.linalg.inv(cov).float()


def mahalanobis(x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """``(..., C)`` -> ``(...)`` squared Mahalanobis distance divided by ``C``."""
    d = x.float() - mean
    return ((d @ precision) * d).sum(-1) / d.shape[-1]


class WindowGaussian(nn.Module):
    """Gaussian of window-mean features over the patch grid (global texture statistics).

    Args:
        grids: ``(K, C, rows, cols)`` patch features of the shots.
        window: window side in patches; ``stride`` its step.
        ridge: added to the covariance diagonal, relative to its mean variance.
    """

    def __init__(self, grids: torch.Tensor, window: int = 8, stride: int = 4,
                 ridge: float = 1e-6) -> None:
        super().__init__()
        if grids.shape[-1] < window or grids.shape[-2] < window:
            raise ValueError(f"grid {tuple(grids.shape[-2:])} is smaller than window {window}")
        self.window, self.stride = window, stride
        self.ridge = ridge
        windows = self.window_means(grids.float()).reshape(-1, grids.shape[1])
        mean, precision = fit_gaussian(windows, ridge, "windows")
        self.register_buffer("mean", mean)
        self.register_buffer("precision", precision)

    @classmethod
    def from_state(cls, mean: torch.Tensor, precision: torch.Tensor, window: int,
                   stride: int) -> WindowGaussian:
        """Rebuild a fitted Gaussian from its stored mean and precision (checkpoints)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.window, self.stride, self.ridge = window, stride, 0.0
        self.register_buffer("mean", mean)
        self.register_buffer("precision", precision)
        return self

    def window_means(self, grids: torch.Tensor) -> torch.Tensor:
        """``(B, C, rows, cols)`` -> ``(B, windows, C)``."""
        return F.avg_pool2d(grids, self.window, self.stride).flatten(2).transpose(1, 2)

    def forward(self, grids: torch.Tensor) -> torch.Tensor:
        """``(B, C, rows, cols)`` -> ``(B,)`` mean squared Mahalanobis distance / C."""
        return mahalanobis(self.window_means(grids.float()), self.mean, self.precision).mean(-1)


class ImageShift(nn.Module):
    """Gaussian of image-mean features of held-out normal images (a global shift detector).

    Args:
        means: ``(n, C)`` image-mean features (:meth:`image_means`) of normal images that are
            not the shots; more than ``C + 1`` of them.
        ridge: added to the covariance diagonal, relative to its mean variance.
    """

    def __init__(self, means: torch.Tensor, ridge: float = 1e-6) -> None:
        super().__init__()
        mean, precision = fit_gaussian(means.float(), ridge, "reference normal images")
        self.register_buffer("mean", mean)
        self.register_buffer("precision", precision)

    @classmethod
    def from_state(cls, mean: torch.Tensor, precision: torch.Tensor) -> ImageShift:
        """A fitted reference from its stored mean and precision, used as they are."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.register_buffer("mean", mean)
        self.register_buffer("precision", precision)
        return self

    @staticmethod
    def image_means(grids: torch.Tensor) -> torch.Tensor:
        """``(B, C, rows, cols)`` -> ``(B, C)``, the mean over the patch grid."""
        return grids.float().mean(dim=(2, 3))

    def forward(self, grids: torch.Tensor) -> torch.Tensor:
        """``(B, C, rows, cols)`` -> ``(B,)`` squared Mahalanobis distance of the image mean / C."""
        return mahalanobis(self.image_means(grids), self.mean, self.precision)
