"""Datasets named in run configs: ``{name, kind, root, split, ...}`` -> a dataset object.

``kind`` is one of :data:`KINDS`. Extra keys go to the dataset class (``categories`` for
MVTec / VisA / MVTec 3D-AD / Eyecandies, ``render`` (rgb / depth / normals) for MVTec
3D-AD and Eyecandies, ``kinds`` for textile, ``classes`` / ``per_class`` / ``size`` /
``seed`` for synthetic; ``count`` / ``size`` / ``seed`` / ``dropout`` for rgbd_synthetic, the
generated RGB + point-cloud task). Kinds with a train split of normal images give the few-shot memory
and the calibration normals from it; the others (``folder``, ``textile``) lend them from
the test split's normal images, which are then left out of the evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_inspect.trainer.data.datasets import (
    Eyecandies,
    FolderDataset,
    MVTec3DAD,
    MVTecAD,
    TextileImages,
    VisA,
)
from edge_inspect.trainer.data.rgbd_synthetic import SyntheticRGBD
from edge_inspect.trainer.data.sample import RecordDataset
from edge_inspect.trainer.data.synthetic import SyntheticDefects

KINDS = ("mvtec", "visa", "mvtec3d", "eyecandies", "folder", "textile", "synthetic", "rgbd_synthetic")
WITH_TRAIN_SPLIT = ("mvtec", "visa", "mvtec3d", "eyecandies", "synthetic", "rgbd_synthetic")
OPTIONS = {
    "mvtec": ("categories",), "visa": ("categories",), "mvtec3d": ("categories", "render"),
    "eyecandies": ("categories", "render"),
    "folder": ("class_name",), "textile": ("kinds",),
    "synthetic": ("classes", "per_class", "size", "seed", "blob_radius"),
    "rgbd_synthetic": ("count", "size", "seed", "dropout"),
}
GENERATED = ("textile", "synthetic", "rgbd_synthetic")  # no root folder


@dataclass
class DatasetSpec:
    """One dataset entry of a run config."""

    name: str
    kind: str
    root: str | None = None
    split: str = "test"
    options: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict, where: str) -> DatasetSpec:
        data = dict(data)
        for key in ("name", "kind"):
            if key not in data:
                raise ValueError(f"{where}: dataset entry {data} lacks '{key}'")
        if data["kind"] not in KINDS:
            raise ValueError(f"{where}: dataset kind {data['kind']!r} unknown; choose one of {KINDS}")
        name, kind = data.pop("name"), data.pop("kind")
        root, split = data.pop("root", None), data.pop("split", "test")
        unknown = set(data) - set(OPTIONS[kind])
        if unknown:
            raise ValueError(f"{where}: dataset {name!r} ({kind}) has unknown keys {sorted(unknown)}; "
                             f"allowed besides name/kind/root/split: {list(OPTIONS[kind])}")
        if kind not in GENERATED and root is None:
            raise ValueError(f"{where}: dataset {name!r} ({kind}) needs a 'root' folder")
        return cls(name, kind, root, split, data)

    def as_dict(self) -> dict:
        out = {"name": self.name, "kind": self.kind, "split": self.split, **self.options}
        if self.root is not None:
            out["root"] = self.root
        return out

    @property
    def has_train_split(self) -> bool:
        return self.kind in WITH_TRAIN_SPLIT

    def open(self, split: str | None = None) -> RecordDataset:
        """The dataset at ``split`` (default: the entry's own split).

        ``all``: the train split followed by the test split, as CMAD builds an auxiliary
        set (train/good + test/good + every test anomaly).
        """
        split = split or self.split
        if split == "all":
            if not self.has_train_split:
                raise ValueError(f"dataset {self.name!r} ({self.kind}) has no train split; "
                                 "split: all needs one")
            parts = [self.open("train"), self.open("test")]
            return RecordDataset([r for p in parts for r in p.records],
                                 f"{self.name}: train + test ({' + '.join(p.name for p in parts)})")
        o = self.options
        if self.kind == "mvtec":
            return MVTecAD(self.root, split, o.get("categories"))
        if self.kind == "visa":
            return VisA(self.root, split, o.get("categories"))
        if self.kind == "mvtec3d":
            return MVTec3DAD(self.root, split, o.get("categories"), o.get("render", "rgb"))
        if self.kind == "eyecandies":
            return Eyecandies(self.root, split, o.get("categories"), o.get("render", "normals"))
        if self.kind == "folder":
            return FolderDataset(self.root, o.get("class_name"))
        if self.kind == "textile":
            return TextileImages(o.get("kinds", TextileImages.KINDS), self.root)
        if self.kind == "rgbd_synthetic":
            return SyntheticRGBD(split, o.get("count", 30), o.get("size", 112), o.get("seed", 0),
                                 o.get("dropout", 0.0))
        return SyntheticDefects(split, tuple(o.get("classes", ("stripes",))),
                                o.get("per_class", 32), o.get("size", 128), o.get("seed", 0),
                                tuple(o.get("blob_radius", (10, 20))))
