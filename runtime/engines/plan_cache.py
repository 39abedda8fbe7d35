"""TensorRT plan cache: a plan is used only when everything it was built for matches.

Key (DESIGN): ONNX sha256 + TensorRT version + GPU name and compute capability +
precision + input shapes (the optimisation profile). Each plan ``<digest>.plan`` has a
sidecar ``<digest>.json`` with the key fields and the plan's own sha256. A plan whose
sidecar is missing, names other fields, or whose bytes do not match is deleted and rebuilt,
never deserialized.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlanKey:
    """What a TensorRT plan depends on."""

    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    input_shapes: tuple[tuple[str, tuple[tuple[int, ...], ...]], ...]  # name -> (min, opt, max)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["input_shapes"] = {name: [list(s) for s in shapes] for name, shapes in self.input_shapes}
        return d

    @property
    def digest(self) -> str:
        blob = json.dumps(self.as_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:32]


class PlanCache:
    """Plans in a folder (by default the bundle's ``engines/``)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def paths(self, key: PlanKey) -> tuple[Path, Path]:
        return self.folder / f"{key.digest}.plan", self.folder / f"{key.digest}.json"

    def load(self, key: PlanKey) -> bytes | None:
        """The plan for ``key``, or None (a stale or damaged plan is removed)."""
        plan_path, meta_path = self.paths(key)
        if not plan_path.exists():
            return None
        reason = None
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            meta, reason = None, "its sidecar is missing or unreadable"
        plan = plan_path.read_bytes()
        if meta is not None:
            if meta.get("key") != key.as_dict():
                reason = "it was built for another model, TensorRT, GPU, precision or shape"
            elif meta.get("plan_sha256") != hashlib.sha256(plan).hexdigest():
                reason = "its bytes do not match the recorded sha256"
        if reason:
            log.warning("not using TensorRT plan %s: %s; rebuilding", plan_path, reason)
            plan_path.unlink(missing_ok=True)
            meta_path.unlink(missing_ok=True)
            return None
        return plan

    def store(self, key: PlanKey, plan: bytes) -> Path:
        """Write plan and sidecar (each via a temporary file and rename)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        plan_path, meta_path = self.paths(key)
        for path, data in ((plan_path, plan), (meta_path, json.dumps(
                {"key": key.as_dict(), "plan_sha256": hashlib.sha256(plan).hexdigest()},
                indent=2).encode())):
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return plan_path
