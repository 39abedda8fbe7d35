"""Run configs: one YAML names the method, backbone, data, shots, seed and hyperparameters.

```yaml
name: afclip-visa-to-mvtec        # run folder: runs/<name> unless --run-dir
method: afclip                    # a registered method: afclip | cmad | memory | ...
backbone: configs/backbones/clip-vit-l14-336-518.yaml   # a file or an inline mapping
seed: 0
fit: resize                       # resize | short_side_crop | center_crop (texture default)
interpolation: bicubic            # bicubic (OpenCV) | bicubic_antialias (PIL, as the papers' code)
shots: 0                          # K normal images per target class (0: zero-shot)
data:
  train: [{name: visa, kind: visa, root: data/visa, split: test}]   # auxiliary, labelled
  target: [{name: mvtec, kind: mvtec, root: data/mvtec}]            # evaluation
head: {}                          # method hyperparameters (AfClipConfig / CmadConfig / ...)
train: {}                         # epochs or steps, batch_size, lr, betas, ...
calibration: {false_alarm_rate: 0.01, normals: 20}
eval: {batch_size: 8, overlays: 6, save_enrolled: true,
       aupro: exact,                # exact | afclip (AF-CLIP's official 200-threshold AUPRO)
       shot_seeds: [122, 123, 124]} # few-shot protocol: K shots drawn once per seed, averaged
```

Every key is checked: a misspelt key is an error naming the allowed ones. The resolved
config (all defaults filled in) is what the run folder and the checkpoint record.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from edge_inspect.runtime.preprocess import FIT_MODES, RESAMPLERS
from edge_inspect.trainer.backbones import BackboneSpec
from edge_inspect.trainer.data.batches import SAMPLINGS
from edge_inspect.trainer.data.registry import DatasetSpec
from edge_inspect.trainer.device import AMP_MODES
from edge_inspect.trainer.feature_cache import CACHE_DTYPES
from edge_inspect.trainer.heads.registry import get_method
from edge_inspect.trainer.metrics import AUPRO_PROTOCOLS

TRAIN_KEYS = ("epochs", "steps", "batch_size", "lr", "betas", "checkpoint_every", "workers",
              "log_every", "device", "amp", "cache_features", "cache_gb", "cache_dtype", "sampling",
              "weight_decay", "schedule", "eta_min")
# schedule: constant, or cosine (torch's CosineAnnealingLR stepped once per epoch from lr to
# eta_min over the phase's epochs; IIPAD's official code sets eta_min above lr, so it rises).
SCHEDULES = ("constant", "cosine")
# device: auto | cpu | cuda[:N] (also used by eval); amp: off | bf16 | fp16; the frozen
# backbone's features are cached in host memory up to cache_gb, stored as cache_dtype.
TRAIN_RUNTIME_DEFAULTS = {"checkpoint_every": 100, "workers": 0, "log_every": 10, "device": "auto",
                          "amp": "off", "cache_features": True, "cache_gb": 8.0,
                          "cache_dtype": "float32", "sampling": "shuffle", "weight_decay": 0.0,
                          "schedule": "constant", "eta_min": 0.0}
CALIBRATION_DEFAULTS = {"false_alarm_rate": 0.01, "normals": 20}
EVAL_DEFAULTS = {"batch_size": 8, "overlays": 6, "save_enrolled": True, "limit": None,
                 "aupro": "exact", "shot_seeds": None}


class ConfigError(ValueError):
    """A run config that cannot be used, named with its file and the key at fault."""


def _check_keys(data: dict, allowed: tuple[str, ...] | set[str], where: str) -> None:
    unknown = set(data) - set(allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")


@dataclass
class RunConfig:
    """A parsed, resolved run config."""

    name: str
    method: str
    backbone: BackboneSpec
    train_data: list[DatasetSpec]
    target_data: list[DatasetSpec]
    head: dict
    train: dict
    seed: int = 0
    shots: int = 0
    fit: str | None = None
    interpolation: str = "bicubic"
    calibration: dict = field(default_factory=lambda: dict(CALIBRATION_DEFAULTS))
    eval: dict = field(default_factory=lambda: dict(EVAL_DEFAULTS))
    source: str = "config"

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config", base: Path | None = None) -> RunConfig:
        raw = copy.deepcopy(raw)
        _check_keys(raw, ("name", "method", "backbone", "seed", "shots", "fit", "interpolation",
                          "data", "head", "train", "calibration", "eval"), source)
        method = raw.get("method")
        spec = get_method(method, source)
        backbone = raw.get("backbone", {"kind": "texture"})
        if isinstance(backbone, str):
            path = Path(backbone)
            if not path.is_absolute() and not path.exists() and base is not None:
                path = base / path
            if not path.exists():
                raise ConfigError(f"{source}: backbone file {backbone} not found")
            backbone = BackboneSpec.from_yaml(path)
        elif isinstance(backbone, dict):
            backbone = BackboneSpec.from_dict(backbone.get("backbone", backbone), source)
        data = raw.get("data") or {}
        _check_keys(data, ("train", "target"), f"{source}: data")
        train_data = [DatasetSpec.from_dict(d, f"{source}: data.train") for d in data.get("train") or []]
        target_data = [DatasetSpec.from_dict(d, f"{source}: data.target") for d in data.get("target") or []]
        for d in target_data:
            if d.split in ("all", "train"):
                raise ConfigError(f"{source}: target dataset {d.name!r} has split {d.split}; the "
                                  "shots and calibration normals come from its train split, so a "
                                  "target is evaluated on its test split (drop split)")
        names = [d.name for d in train_data + target_data]
        if len(set(d.name for d in train_data)) != len(train_data):
            raise ConfigError(f"{source}: auxiliary dataset names must be unique, got {names}")
        head_cls, train_defaults = spec.config, spec.training.defaults
        head = raw.get("head") or {}
        _check_keys(head, {f.name for f in fields(head_cls)}, f"{source}: head ({method})")
        head = asdict(head_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in head.items()}))
        train = raw.get("train") or {}
        _check_keys(train, TRAIN_KEYS, f"{source}: train")
        train = {**TRAIN_RUNTIME_DEFAULTS, **train_defaults, **train}
        given = raw.get("train") or {}
        if "steps" in given:  # steps win over epochs (also over a method's default epochs)
            train.pop("epochs", None)
        elif "epochs" in given:
            train.pop("steps", None)
        train = _coerce(train, {"epochs": int, "steps": int, "batch_size": int, "lr": float,
                                "checkpoint_every": int, "workers": int, "log_every": int,
                                "cache_gb": float, "device": str, "weight_decay": float,
                                "eta_min": float},
                        f"{source}: train")
        if train["amp"] is False:  # YAML reads a bare `off` as false
            train["amp"] = "off"
        if train["amp"] not in AMP_MODES:
            raise ConfigError(f"{source}: train.amp {train['amp']!r} unknown; choose one of "
                              f"{list(AMP_MODES)}")
        if train["cache_dtype"] not in CACHE_DTYPES:
            raise ConfigError(f"{source}: train.cache_dtype {train['cache_dtype']!r} unknown; "
                              f"choose one of {list(CACHE_DTYPES)}")
        if train["sampling"] not in SAMPLINGS:
            raise ConfigError(f"{source}: train.sampling {train['sampling']!r} unknown; choose one "
                              f"of {SAMPLINGS}")
        if train["schedule"] not in SCHEDULES:
            raise ConfigError(f"{source}: train.schedule {train['schedule']!r} unknown; choose one "
                              f"of {SCHEDULES}")
        if not isinstance(train["cache_features"], bool):
            raise ConfigError(f"{source}: train.cache_features must be true or false")
        train["betas"] = [float(b) for b in train.get("betas", (0.9, 0.999))]
        calibration = {**CALIBRATION_DEFAULTS, **(raw.get("calibration") or {})}
        _check_keys(calibration, tuple(CALIBRATION_DEFAULTS), f"{source}: calibration")
        evaluation = {**EVAL_DEFAULTS, **(raw.get("eval") or {})}
        _check_keys(evaluation, tuple(EVAL_DEFAULTS), f"{source}: eval")
        if evaluation["aupro"] not in AUPRO_PROTOCOLS:
            raise ConfigError(f"{source}: eval.aupro {evaluation['aupro']!r} unknown; choose one "
                              f"of {AUPRO_PROTOCOLS}")
        seeds = evaluation["shot_seeds"]
        if seeds is not None:
            if not isinstance(seeds, list) or not seeds or not all(
                    isinstance(x, int) and not isinstance(x, bool) for x in seeds):
                raise ConfigError(f"{source}: eval.shot_seeds must be a list of integers (one "
                                  f"few-shot draw each), got {seeds!r}")
        fit = raw.get("fit")
        if fit is not None and fit not in FIT_MODES:
            raise ConfigError(f"{source}: fit {fit!r} unknown; choose one of {FIT_MODES}")
        interpolation = raw.get("interpolation", "bicubic")
        if interpolation not in RESAMPLERS:
            raise ConfigError(f"{source}: interpolation {interpolation!r} unknown; choose one of "
                              f"{RESAMPLERS}")
        shots = int(raw.get("shots", 0))
        if shots < 0:
            raise ConfigError(f"{source}: shots must be >= 0, got {shots}")
        if shots < spec.min_shots:
            raise ConfigError(f"{source}: method {method} needs shots >= {spec.min_shots} (it has no "
                              "zero-shot mode)")
        if spec.backbones is not None and backbone.kind not in spec.backbones:
            raise ConfigError(f"{source}: {method} needs a backbone of kind {' or '.join(spec.backbones)}, "
                              f"got {backbone.kind}")
        if spec.needs_train_data and not train_data:
            raise ConfigError(f"{source}: {method} trains on auxiliary datasets; list them under "
                              "data.train")
        return cls(raw.get("name") or Path(source).stem, method, backbone, train_data, target_data,
                   head, train, int(raw.get("seed", 0)), shots, fit, interpolation, calibration,
                   evaluation, source)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> RunConfig:
        """Read a YAML file; ``overrides`` are ``dotted.key=value`` strings (YAML values)."""
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        for item in overrides or []:
            apply_override(raw, item)
        return cls.from_dict(raw, str(path), path.parent)

    @property
    def fit_mode(self) -> str:
        """How images reach the input size: texture crops (no resampling), ViTs resize."""
        return self.fit or ("center_crop" if self.backbone.kind == "texture" else "resize")

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain YAML-able data (re-readable by :meth:`from_dict`)."""
        def plain(v: Any) -> Any:
            if isinstance(v, tuple | list):
                return [plain(x) for x in v]
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v

        return plain({
            "name": self.name, "method": self.method,
            "backbone": {k: v for k, v in asdict(self.backbone).items() if v is not None},
            "seed": self.seed, "shots": self.shots, "fit": self.fit_mode,
            "interpolation": self.interpolation,
            "data": {"train": [d.as_dict() for d in self.train_data],
                     "target": [d.as_dict() for d in self.target_data]},
            "head": self.head, "train": self.train, "calibration": self.calibration,
            "eval": self.eval,
        })

    def head_kwargs(self) -> dict[str, Any]:
        """The ``head`` section as keyword arguments of the method's config dataclass."""
        return _tuples(self.head)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def apply_override(raw: dict, item: str) -> None:
    """Set ``a.b.c=value`` in a nested mapping (value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.subkey=value")
    key, value = item.split("=", 1)
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a mapping")
    node[parts[-1]] = yaml.safe_load(value)


def build_head(cfg: RunConfig):
    """The method's head on its frozen backbone, as the config describes (via the registry)."""
    return get_method(cfg.method, cfg.source).build(cfg)


def _coerce(d: dict, types: dict, where: str) -> dict:
    """Numbers written as ``1e-3`` arrive from YAML as strings; convert or name the key."""
    out = dict(d)
    for key, typ in types.items():
        if key in out and out[key] is not None:
            try:
                out[key] = typ(out[key])
            except (TypeError, ValueError):
                raise ConfigError(f"{where}.{key} must be a {typ.__name__}, got {out[key]!r}") from None
    return out


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
