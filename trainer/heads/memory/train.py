"""The few-shot memory method trains nothing: its memory is built from K normal shots
(``enroll``), so it has no phases and no loss."""

from __future__ import annotations

from edge_inspect.trainer.heads.base import MethodTraining


class MemoryTraining(MethodTraining):
    defaults: dict = {}
