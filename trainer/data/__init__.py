"""Datasets: layouts on disk -> :class:`Sample` items (image, label, mask, class, path)."""

from edge_inspect.trainer.data.datasets import (
    Eyecandies,
    FolderDataset,
    MVTec3DAD,
    MVTecAD,
    TextileImages,
    VisA,
)
from edge_inspect.trainer.data.sample import DatasetError, Record, RecordDataset, Sample

__all__ = ["DatasetError", "Eyecandies", "FolderDataset", "MVTec3DAD", "MVTecAD", "Record",
           "RecordDataset", "Sample", "TextileImages", "VisA"]
