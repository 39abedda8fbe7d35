"""The method registry: config, export and enrollment look methods up here.

A method is a package ``trainer/heads/<method>/`` with ``model.py`` (the ``nn.Module``,
the export target), ``train.py`` (phases and losses) and ``spec.py``, which registers a
:class:`MethodSpec`. Adding a method means writing its package and adding its name to
:data:`BUILTIN` (the one registry line); nothing else keeps a list of methods. Tests and
plugins may also :func:`register` a spec directly.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_inspect.trainer.config import RunConfig
    from edge_inspect.trainer.heads.base import AnomalyHead, MethodTraining

# packages under trainer/heads/ with a spec.py
BUILTIN = ("afclip", "cmad", "iipad", "kanoclip", "memory", "pirn")


@dataclass(frozen=True)
class MethodSpec:
    """Everything the rest of the trainer and export need to know about a method.

    Args:
        name: the ``method:`` of run configs and manifests.
        config: the head's hyperparameter dataclass (``head:`` keys are checked against it).
        build: ``build(run_config) -> head`` on its frozen backbone.
        training: phases, losses and training defaults (``train.py``).
        backbones: accepted backbone kinds; None accepts any.
        memory_recipe: ``recipe(head) -> dict`` naming how ``enroll`` rebuilds the
            few-shot memory from the graph's ``feature.*`` outputs (a recipe kind of
            ``edge_inspect.runtime.enrollment`` and its parameters); None: no memory.
        min_shots: the fewest shots a run may ask for (1 for a method without zero-shot).
        needs_train_data: whether the method trains on auxiliary datasets (``data.train``).
        one_for_all: one model for every class of a target (IIPAD): a shot-draw sweep trains
            one run per draw over all classes, not one per class.
        summary: one line for listings.
    """

    name: str
    config: type
    build: Callable[[RunConfig], AnomalyHead]
    training: MethodTraining
    backbones: tuple[str, ...] | None = None
    memory_recipe: Callable[[Any], dict] | None = None
    min_shots: int = 0
    needs_train_data: bool = False
    one_for_all: bool = False
    summary: str = ""


_SPECS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` (a method's ``spec.py`` calls this at import); a name is taken once."""
    old = _SPECS.get(spec.name)
    if old is not None and old is not spec:
        raise ValueError(f"method {spec.name!r} is registered already")
    _SPECS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a registered method (tests that register a toy method clean up with this)."""
    _SPECS.pop(name, None)


def method_names() -> list[str]:
    """Built-in methods and anything registered, in that order."""
    return list(BUILTIN) + sorted(set(_SPECS) - set(BUILTIN))


def get_method(name: object, where: str = "config") -> MethodSpec:
    """The spec of ``name``; an unknown name is an error listing the known ones."""
    if isinstance(name, str) and name not in _SPECS and name in BUILTIN:
        importlib.import_module(f"edge_inspect.trainer.heads.{name}.spec")
    if not isinstance(name, str) or name not in _SPECS:
        from edge_inspect.trainer.config import ConfigError

        raise ConfigError(f"{where}: method {name!r} unknown; choose one of {method_names()}")
    return _SPECS[name]
