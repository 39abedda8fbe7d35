"""Read weight files into a flat ``{name: tensor}`` dict without unsafe unpickling.

Formats: safetensors; torch zip/pickle checkpoints via ``torch.load(weights_only=True)``;
TorchScript archives (OpenAI's ``ViT-L-14-336px.pt``) via a restricted unpickler of the
archive's ``data.pkl`` that rebuilds tensors and module attributes and refuses every other
global, so no code in the file runs (``torch.jit.load`` would execute the archive's
TorchScript code, and ``torch.load(weights_only=True)`` rejects TorchScript archives).
Hugging Face model folders: ``model.safetensors`` or ``pytorch_model.bin``.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path

import torch


class WeightsFileError(ValueError):
    """A weights file that cannot be read or does not fit the requested architecture."""


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _ScriptObject:
    """Stand-in for a TorchScript module: keeps its attribute dict, runs nothing."""

    def __init__(self, *args: object) -> None:
        self.state: dict = {}

    def __setstate__(self, state: object) -> None:
        self.state = state if isinstance(state, dict) else {"__state__": state}


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple,
                    *unused: object) -> torch.Tensor:
    return torch.as_strided(storage, size, stride, offset).clone()


class _TorchScriptUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self.archive = archive
        self.prefix = prefix

    def find_class(self, module: str, name: str):  # noqa: D102 - pickle hook
        if module.startswith("__torch__"):
            return _ScriptObject
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, requires_grad, hooks: data
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name} from a TorchScript archive: only tensors and "
            "module attributes are read"
        )

    def persistent_load(self, pid: tuple) -> torch.Tensor:
        kind, dtype, key = pid[0], pid[1], pid[2]
        if kind != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
        if not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unknown storage type {dtype!r}")
        raw = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
        if not raw:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(raw, dtype=dtype)


def _flatten_script_object(obj: object, prefix: str, out: dict[str, torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix.rstrip(".")] = obj
    elif isinstance(obj, _ScriptObject):
        for name, value in obj.state.items():
            _flatten_script_object(value, f"{prefix}{name}.", out)


def is_torchscript_archive(path: Path) -> bool:
    """True for a zip whose ``data.pkl`` sits beside TorchScript ``code/``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any("/code/" in n for n in names) and any(n.endswith("/data.pkl") for n in names)


def read_torchscript_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a TorchScript archive, named like ``module.state_dict()``."""
    with zipfile.ZipFile(path) as zf:
        data_pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not data_pkl:
            raise WeightsFileError(f"{path}: TorchScript archive without data.pkl")
        prefix = data_pkl[0][: -len("data.pkl")]
        try:
            root = _TorchScriptUnpickler(zf.read(data_pkl[0]), zf, prefix).load()
        except (pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError, RuntimeError,
                zipfile.BadZipFile, zlib.error) as exc:  # RuntimeError: a tensor past its storage
            raise WeightsFileError(f"{path}: cannot read TorchScript archive (corrupt or "
                                   f"truncated; download it again): {exc}") from exc
    out: dict[str, torch.Tensor] = {}
    _flatten_script_object(root, "", out)
    if not out:
        raise WeightsFileError(f"{path}: TorchScript archive holds no tensors")
    return out


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Find the state dict inside common checkpoint wrappers and strip ``module.``."""
    for key in ("state_dict", "model", "module", "teacher"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsFileError(f"{path}: no tensor state dict found in the checkpoint")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Read any supported weights file or Hugging Face folder.

    Returns:
        ``(state_dict, hf_config)``; ``hf_config`` is the parsed ``config.json`` for a
        Hugging Face folder and ``None`` otherwise.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsFileError(f"weights not found: {path} (give a file or a Hugging Face folder)")
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.exists():
            raise WeightsFileError(f"{path} is a folder without config.json; a Hugging Face "
                                   "model folder needs config.json and model.safetensors")
        config = json.loads(config_file.read_text())
        index = path / "model.safetensors.index.json"
        if index.exists():  # sharded: {"weight_map": {tensor name: shard file}}
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
            if not shards:
                raise WeightsFileError(f"{index} lists no shards")
            merged: dict[str, torch.Tensor] = {}
            for shard in shards:
                merged.update(read_weights(path / shard)[0])
            return merged, config
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).exists():
                sd, _ = read_weights(path / name)
                return sd, config
        raise WeightsFileError(f"{path}: no model.safetensors or pytorch_model.bin inside")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), None
        except Exception as exc:  # safetensors raises its own error types
            raise WeightsFileError(f"{path}: not a readable safetensors file ({exc})") from exc
    if is_torchscript_archive(path):
        return read_torchscript_state_dict(path), None
    with path.open("rb") as fh:
        magic = fh.read(2)
    if not (zipfile.is_zipfile(path) or magic[:1] == b"\x80"):
        raise WeightsFileError(f"{path}: not a readable torch checkpoint (neither a zip "
                               "archive nor a pickle stream); expected .pt/.pth/.bin/.safetensors")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsFileError(
            f"{path}: refused to unpickle (weights_only=True): {exc}. Re-save the weights as a "
            "plain state dict or safetensors."
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile) as exc:
        raise WeightsFileError(f"{path}: not a readable torch checkpoint ({exc})") from exc
    return _unwrap(obj, path), None


def check_keys(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], path: Path,
               arch: str, looks_like: str | None) -> None:
    """Raise a :class:`WeightsFileError` naming missing/unexpected/mis-shaped keys."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(k for k in set(expected) & set(got)
                    if tuple(expected[k].shape) != tuple(got[k].shape))
    if not (missing or unexpected or shapes):
        return

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:6]) + (f" ... ({len(keys)} in all)" if len(keys) > 6 else "")

    parts = [f"{path} does not fit architecture {arch}:"]
    if missing:
        parts.append(f"missing keys: {few(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {few(unexpected)}")
    if shapes:
        parts.append("shape mismatches: " + few(
            [f"{k} file {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}" for k in shapes]))
    parts.append(f"the file looks like {looks_like}" if looks_like
                 else "the file does not look like any supported architecture")
    raise WeightsFileError("\n  ".join(parts))
