"""Datasets: one item type (:class:`Sample`) for every on-disk layout."""

from edge_inspect.trainer.data.datasets import FolderDataset, MVTec3DAD, MVTecAD, TextileImages, VisA
from edge_inspect.trainer.data.sample import DatasetError, Record, RecordDataset, Sample

__all__ = ["DatasetError", "FolderDataset", "MVTec3DAD", "MVTecAD", "Record", "RecordDataset",
           "Sample", "TextileImages", "VisA"]
