"""Dataset layouts: MVTec AD, VisA, MVTec 3D-AD, Eyecandies, a generic folder, the textile
images.

Each class only finds the files and builds :class:`Record`s; reading and checking happen in
:mod:`trainer.data.sample`, so every layout reports a bad file the same way.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

from edge_inspect.trainer.data.render3d import RENDERINGS
from edge_inspect.trainer.data.sample import (
    DatasetError,
    Record,
    RecordDataset,
    list_images,
    require_dir,
)

SPLITS = ("train", "test")


def _check_split(split: str, allowed: Iterable[str] = SPLITS) -> None:
    if split not in allowed:
        raise ValueError(f"split {split!r} unknown; use one of {tuple(allowed)}")


def _categories(root: Path, wanted: str | list[str] | None, marker: str) -> list[str]:
    """Category folders under ``root`` (those containing ``marker``), or the requested ones."""
    require_dir(root, "the dataset root")
    if wanted is None:
        found = sorted(p.name for p in root.iterdir() if (p / marker).is_dir())
        if not found:
            raise DatasetError(f"{root} holds no category folders with a {marker}/ inside")
        return found
    names = [wanted] if isinstance(wanted, str) else list(wanted)
    for name in names:
        require_dir(root / name, f"category {name!r}")
    return names


def _defect_dirs(root: Path, categories: str | list[str] | None, split: str,
                 dataset: str) -> Iterable[tuple[str, str, Path]]:
    """``(category, defect type, folder)`` for ``<root>/<category>/<split>/<defect>/``."""
    for cat in _categories(root, categories, "train"):
        split_dir = require_dir(root / cat / split, f"{dataset} {split} split of {cat}")
        for defect_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            yield cat, defect_dir.name, defect_dir


class MVTecAD(RecordDataset):
    """MVTec AD: ``<root>/<class>/{train/good, test/<defect>, ground_truth/<defect>}``.

    Masks are ``ground_truth/<defect>/<stem>_mask.png``; a missing mask for a defective
    image is an error (the archive always has one).
    """

    def __init__(self, root: str | Path, split: str = "test",
                 categories: str | list[str] | None = None) -> None:
        _check_split(split)
        root = Path(root)
        records = []
        for cat, defect, folder in _defect_dirs(root, categories, split, "MVTec AD"):
            for image in list_images(folder):
                mask = None
                if defect != "good":
                    mask = root / cat / "ground_truth" / defect / f"{image.stem}_mask.png"
                    if not mask.exists():
                        raise DatasetError(f"missing mask {mask} for defective image {image}")
                records.append(Record(image, int(defect != "good"), cat, defect, mask))
        super().__init__(records, f"MVTec AD {split} at {root}")


class VisA(RecordDataset):
    """VisA with its split csv (``split_csv/1cls.csv``: object, split, label, image, mask).

    Paths in the csv are relative to ``root``. Labels are ``normal`` / ``anomaly``.
    """

    def __init__(self, root: str | Path, split: str = "test",
                 categories: str | list[str] | None = None,
                 split_csv: str | Path = "split_csv/1cls.csv") -> None:
        _check_split(split)
        root = Path(root)
        require_dir(root, "the VisA root")
        csv_path = root / split_csv if not Path(split_csv).is_absolute() else Path(split_csv)
        if not csv_path.exists():
            raise DatasetError(f"missing VisA split file {csv_path}; VisA's split_csv/1cls.csv "
                               "comes with the dataset's prepare script")
        wanted = None if categories is None else (
            {categories} if isinstance(categories, str) else set(categories))
        records = []
        with csv_path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            need = {"object", "split", "label", "image", "mask"}
            if not need <= set(reader.fieldnames or ()):
                raise DatasetError(f"{csv_path} needs columns {sorted(need)}, has {reader.fieldnames}")
            for row in reader:
                if row["split"] != split or (wanted and row["object"] not in wanted):
                    continue
                label = {"normal": 0, "anomaly": 1}.get(row["label"])
                if label is None:
                    raise DatasetError(f"{csv_path}: label {row['label']!r} is neither normal "
                                       "nor anomaly")
                mask = root / row["mask"] if label and row["mask"] else None
                records.append(Record(root / row["image"], label, row["object"],
                                      "anomaly" if label else "good", mask))
        if wanted:
            missing = wanted - {r.class_name for r in records}
            if missing:
                raise DatasetError(f"{csv_path} has no {split} rows for {sorted(missing)}")
        super().__init__(records, f"VisA {split} at {root}")


class MVTec3DAD(RecordDataset):
    """MVTec 3D-AD: ``<root>/<class>/<split>/<defect>/{rgb,xyz,gt}`` (xyz: float TIFF).

    ``render``: ``rgb`` (the colour images, with the point map alongside), or ``depth`` /
    ``normals`` rendered from the point map (:mod:`trainer.data.render3d`).
    """

    def __init__(self, root: str | Path, split: str = "test",
                 categories: str | list[str] | None = None, render: str = "rgb") -> None:
        _check_split(split, ("train", "validation", "test"))
        if render not in RENDERINGS:
            raise ValueError(f"MVTec 3D-AD render {render!r} unknown; choose one of {RENDERINGS}")
        root = Path(root)
        records = []
        for cat, defect, folder in _defect_dirs(root, categories, split, "MVTec 3D-AD"):
            for image in list_images(require_dir(folder / "rgb", "RGB images")):
                xyz = folder / "xyz" / f"{image.stem}.tiff"
                if not xyz.exists():
                    raise DatasetError(f"missing point map {xyz} for {image}")
                mask = folder / "gt" / f"{image.stem}.png"
                if defect != "good" and not mask.exists():
                    raise DatasetError(f"missing mask {mask} for defective image {image}")
                records.append(Record(image, int(defect != "good"), cat, defect,
                                      mask if defect != "good" else None, xyz, render))
        super().__init__(records, f"MVTec 3D-AD {split} ({render}) at {root}")


class Eyecandies(RecordDataset):
    """Eyecandies (eyecan-ai): ``<root>/<Category>/<split>/data/<id>_<item>.<ext>``.

    Splits ``train`` and ``val`` (all normal), ``test`` (= ``test_public``, labelled; the
    private test has no labels). Samples are found by their image file; labels from
    ``<id>_metadata.yaml`` (``anomalous: 0/1``; train and val samples without one are
    good), masks ``<id>_mask.png``. ``render``: ``rgb`` (``<id>_image_5.png``, the global light),
    ``normals`` (``<id>_normals.png``, the dataset's own RGB encoding of the unit normals)
    or ``depth`` (``<id>_depth.png`` rendered as :mod:`trainer.data.render3d` says). With
    ``rgb`` each sample also carries its point map (PIRN's 3D plane), from ``<id>_depth.png``
    and ``<id>_info_depth.yaml`` (:func:`trainer.data.render3d.eyecandies_xyz`), when the
    sample has both.
    """

    FOLDERS = {"train": "train", "val": "val", "test": "test_public"}
    FILES = {"rgb": "image_5.png", "normals": "normals.png", "depth": "depth.png"}

    def __init__(self, root: str | Path, split: str = "test",
                 categories: str | list[str] | None = None, render: str = "normals") -> None:
        import yaml

        _check_split(split, tuple(self.FOLDERS))
        if render not in self.FILES:
            raise ValueError(f"Eyecandies render {render!r} unknown; choose one of {tuple(self.FILES)}")
        root = Path(root)
        records = []
        for cat in _categories(root, categories, self.FOLDERS[split]):
            data = require_dir(root / cat / self.FOLDERS[split] / "data", f"Eyecandies {cat} {split}")
            suffix = f"_{self.FILES[render]}"
            images = sorted(data.glob(f"*{suffix}"))
            if not images:
                raise DatasetError(f"{data} holds no *{suffix} files ({render} images)")
            for image in images:
                sample_id = image.name[: -len(suffix)]
                meta = data / f"{sample_id}_metadata.yaml"
                if not meta.exists() and split != "test":
                    label = 0  # train and val hold good samples only
                elif not meta.exists():
                    raise DatasetError(f"missing {meta}: the label of test sample {sample_id}")
                else:
                    try:
                        label = int((yaml.safe_load(meta.read_text()) or {}).get("anomalous", 0))
                    except (yaml.YAMLError, TypeError, ValueError, AttributeError) as exc:
                        raise DatasetError(f"cannot read the label in {meta}: {exc}") from exc
                mask = data / f"{sample_id}_mask.png"
                if label and not mask.exists():
                    raise DatasetError(f"missing mask {mask} for anomalous sample {sample_id}")
                depth = data / f"{sample_id}_depth.png"
                info = data / f"{sample_id}_info_depth.yaml"
                if render == "rgb" and depth.exists() != info.exists():
                    raise DatasetError(f"{sample_id} in {data} has only one of {depth.name} and "
                                       f"{info.name}; its point map needs both")
                xyz = depth if render == "rgb" and depth.exists() else None
                records.append(Record(image, label, cat, "anomalous" if label else "good",
                                      mask if label else None, xyz, render))
        super().__init__(records, f"Eyecandies {split} ({render}) at {root}")


class FolderDataset(RecordDataset):
    """A generic folder: ``<root>/good/*`` normal, every other subfolder a defect type.

    Optional masks: ``<root>/masks/<defect>/<stem>.png`` or ``<stem>_mask.png``; defective
    images without a mask get an all-zero mask (image-level labels only). The class name
    defaults to the folder's name.
    """

    MASK_DIR = "masks"

    def __init__(self, root: str | Path, class_name: str | None = None) -> None:
        root = Path(root)
        require_dir(root, "a folder with good/ and one subfolder per defect type")
        require_dir(root / "good", "normal images")
        name = class_name or root.name
        records = []
        for sub in sorted(p for p in root.iterdir() if p.is_dir() and p.name != self.MASK_DIR):
            defect = sub.name
            for image in list_images(sub):
                mask = None
                if defect != "good":
                    for cand in (f"{image.stem}.png", f"{image.stem}_mask.png"):
                        if (root / self.MASK_DIR / defect / cand).exists():
                            mask = root / self.MASK_DIR / defect / cand
                            break
                records.append(Record(image, int(defect != "good"), name, defect, mask))
        super().__init__(records, f"folder {root}")


class TextileImages(RecordDataset):
    """The simulated textile images of the PyPI package ``conformal-clip-data``.

    1000 nominal, 500 local-defect and 500 global-defect 250x250 gray JPEGs (Megahed et al.
    2025); no masks. ``kinds`` picks which of ``nominal``, ``local``, ``global`` to include.
    """

    KINDS = ("nominal", "local", "global")

    def __init__(self, kinds: Iterable[str] = KINDS, root: str | Path | None = None) -> None:
        if root is None:
            try:
                import conformal_clip_data
            except ImportError as exc:
                raise DatasetError("the textile images come from the PyPI package "
                                   "conformal-clip-data: pip install conformal-clip-data") from exc
            root = conformal_clip_data.textile_simulated_root()
        root = Path(root)
        records = []
        for kind in kinds:
            if kind not in self.KINDS:
                raise ValueError(f"textile kind {kind!r} unknown; use {self.KINDS}")
            folder = require_dir(root / kind, f"textile {kind} images")
            for image in list_images(folder):
                records.append(Record(image, int(kind != "nominal"), "textile",
                                      "good" if kind == "nominal" else kind))
        super().__init__(records, f"textile {list(kinds)} at {root}")
