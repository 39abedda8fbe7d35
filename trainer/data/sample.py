"""The one item type every dataset yields, and the image/mask readers with clear errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from edge_inspect.runtime.preprocess import IMAGE_SUFFIXES


class DatasetError(ValueError):
    """A dataset on disk that does not match its expected layout, named with the path."""


@dataclass
class Sample:
    """One image of an anomaly-detection dataset.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB.
        label: 0 normal, 1 anomalous.
        mask: ``(H, W)`` uint8 in {0, 1}; zeros when the dataset has no mask.
        class_name: object / texture category (``bottle``, ``textile``).
        path: the image file.
        defect: defect type (``good`` for normal images).
        xyz: ``(H, W, 3)`` float32 point map for 3D datasets, else None.
    """

    image: np.ndarray
    label: int
    mask: np.ndarray
    class_name: str
    path: Path
    defect: str = "good"
    xyz: np.ndarray | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Record:
    """Where a sample lives on disk; datasets index records and read lazily."""

    image: Path
    label: int
    class_name: str
    defect: str
    mask: Path | None = None
    xyz: Path | None = None
    render: str = "rgb"  # depth / normals: the image is rendered from 3D data (render3d)


def list_images(folder: Path) -> list[Path]:
    """Image files in ``folder`` (not recursive), sorted."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a folder, else a :class:`DatasetError` saying what was expected."""
    if not path.is_dir():
        raise DatasetError(f"missing folder {path} ({what})")
    return path


def read_rgb(path: Path) -> np.ndarray:
    """Read an image as ``(H, W, 3)`` uint8 RGB; gray images are expanded."""
    from edge_inspect.runtime.preprocess import read_rgb as _read

    try:
        return _read(path)
    except ValueError:
        reason = "file not found" if not Path(path).exists() else "unreadable or corrupt image"
        raise DatasetError(f"cannot read image {path}: {reason}") from None


def read_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Read a ground-truth mask as {0, 1} uint8 and check it matches the image size."""
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise DatasetError(f"cannot read mask {path}: missing, unreadable or corrupt")
    if mask.shape != tuple(shape):
        raise DatasetError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                           f"{shape[1]}x{shape[0]}; masks must match their image")
    return (mask > 0).astype(np.uint8)


def read_xyz(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Read an organized point cloud (``H x W x 3`` float TIFF) as float32."""
    import tifffile

    try:
        xyz = np.asarray(tifffile.imread(path), dtype=np.float32)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read point map {path}: {exc}") from exc
    if xyz.ndim != 3 or xyz.shape[2] != 3 or xyz.shape[:2] != tuple(shape):
        raise DatasetError(f"point map {path} has shape {xyz.shape}, expected "
                           f"({shape[0]}, {shape[1]}, 3) to match its RGB image")
    return xyz


def read_eyecandies_xyz(depth_path: Path, shape: tuple[int, int]) -> np.ndarray:
    """An Eyecandies sample's point map from ``<id>_depth.png`` and ``<id>_info_depth.yaml``."""
    import yaml

    from edge_inspect.trainer.data.render3d import eyecandies_xyz

    info = depth_path.with_name(depth_path.name.replace("_depth.png", "_info_depth.yaml"))
    try:
        norm = (yaml.safe_load(info.read_text()) or {})["normalization"]
        near, far = float(norm["min"]), float(norm["max"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        raise DatasetError(f"cannot read the depth normalization (normalization: min, max) in "
                           f"{info}: {exc}") from exc
    depth = cv2.imread(str(depth_path), cv2.IMREAD_UNCHANGED)
    if depth is None or depth.ndim != 2 or depth.dtype != np.uint16:
        raise DatasetError(f"cannot read depth image {depth_path} (16-bit grey expected)")
    if depth.shape != tuple(shape):
        raise DatasetError(f"depth image {depth_path} is {depth.shape[1]}x{depth.shape[0]}, its RGB "
                           f"image {shape[1]}x{shape[0]}")
    return eyecandies_xyz(depth, near, far)


def _rendered(record: Record) -> np.ndarray:
    """The image of a record whose ``render`` is depth or normals (trainer.data.render3d)."""
    from edge_inspect.trainer.data import render3d

    if record.xyz is not None:  # MVTec 3D-AD: from the point map
        import tifffile

        try:
            xyz = np.asarray(tifffile.imread(record.xyz), dtype=np.float32)
        except (OSError, ValueError) as exc:
            raise DatasetError(f"cannot read point map {record.xyz}: {exc}") from exc
        if xyz.ndim != 3 or xyz.shape[2] != 3:
            raise DatasetError(f"point map {record.xyz} has shape {xyz.shape}, expected (H, W, 3)")
        return (render3d.depth_from_xyz if record.render == "depth" else render3d.normals_from_xyz)(xyz)
    if record.render == "depth":  # Eyecandies: 16-bit depth png, rendered scenes (no holes)
        depth = cv2.imread(str(record.image), cv2.IMREAD_UNCHANGED)
        if depth is None or depth.ndim != 2:
            raise DatasetError(f"cannot read depth image {record.image} (16-bit grey expected)")
        return render3d.depth_image(depth.astype(np.float64), np.ones(depth.shape, bool))
    return read_rgb(record.image)  # Eyecandies normals: already encoded as RGB


def load_record(record: Record) -> Sample:
    """Read the files of ``record`` into a :class:`Sample`."""
    if record.render != "rgb":
        image = _rendered(record)
        hw = image.shape[:2]
        mask = read_mask(record.mask, hw) if record.mask else np.zeros(hw, np.uint8)
        return Sample(image, record.label, mask, record.class_name, record.image, record.defect)
    image = read_rgb(record.image)
    hw = image.shape[:2]
    mask = read_mask(record.mask, hw) if record.mask else np.zeros(hw, np.uint8)
    if record.xyz is None:
        xyz = None
    elif record.xyz.suffix == ".png":  # Eyecandies: 16-bit depth + its normalization
        xyz = read_eyecandies_xyz(record.xyz, hw)
    else:
        xyz = read_xyz(record.xyz, hw)
    return Sample(image, record.label, mask, record.class_name, record.image, record.defect, xyz)


class RecordDataset:
    """A list of records read lazily; indexable like a torch ``Dataset``."""

    def __init__(self, records: list[Record], name: str) -> None:
        if not records:
            raise DatasetError(f"{name}: no images found")
        self.records = records
        self.name = name

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        return load_record(self.records[index])

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.records])

    @property
    def class_names(self) -> list[str]:
        return sorted({r.class_name for r in self.records})

    def __repr__(self) -> str:
        n_bad = int(self.labels.sum())
        return (f"{type(self).__name__}({self.name}: {len(self)} images, {n_bad} anomalous, "
                f"classes {self.class_names})")


class ItemDataset(RecordDataset):
    """Chosen items ``(dataset, index)`` of other datasets as one dataset (a run's shots)."""

    def __init__(self, items: list[tuple[RecordDataset, int]], name: str) -> None:
        self.items = list(items)
        super().__init__([ds.records[i] for ds, i in self.items], name)

    def __getitem__(self, index: int) -> Sample:
        ds, i = self.items[index]
        return ds[i]
