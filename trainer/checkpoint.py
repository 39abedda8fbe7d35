"""Checkpoints: the trainable parameters (safetensors) plus the resolved config.

One ``.safetensors`` file. Tensors: ``params/<name>`` (what training changed) and, in an
enrolled checkpoint, ``memory/<name>`` (the few-shot memory). Metadata (strings):
``format``, ``method``, ``config`` (resolved YAML) and ``calibration`` (JSON: the decision
threshold and how it was obtained). The frozen backbone is not stored: it comes from the
weights file the config names. Files are written to a temporary name and renamed, so an
interrupted write never replaces a good checkpoint.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

FORMAT = "edge-inspect-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, named with the reason and the fix."""


@dataclass
class Checkpoint:
    """What a checkpoint file holds."""

    method: str
    config: str
    params: dict[str, torch.Tensor]
    memory: dict[str, torch.Tensor] = field(default_factory=dict)
    calibration: dict | None = None
    extra: dict = field(default_factory=dict)


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path`` (same folder, atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {f"params/{k}": v.detach().contiguous().cpu() for k, v in ckpt.params.items()}
    tensors |= {f"memory/{k}": v.detach().contiguous().cpu() for k, v in ckpt.memory.items()}
    meta = {"format": FORMAT, "method": ckpt.method, "config": ckpt.config,
            "calibration": json.dumps(ckpt.calibration), "extra": json.dumps(ckpt.extra)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; `edge-inspect train` writes "
                              "<run dir>/checkpoint.safetensors")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an edge-inspect checkpoint (format "
                              f"{meta.get('format')!r}, expected {FORMAT!r})")
    return Checkpoint(
        meta["method"], meta["config"],
        {k[7:]: v for k, v in tensors.items() if k.startswith("params/")},
        {k[7:]: v for k, v in tensors.items() if k.startswith("memory/")},
        json.loads(meta.get("calibration") or "null"), json.loads(meta.get("extra") or "{}"),
    )
