"""CMAD: ``model.py`` (the module), ``train.py`` (losses, prototype init), ``spec.py`` (registration)."""

from edge_inspect.trainer.heads.cmad.model import CmadConfig, CmadHead, prototype_score, topk_mean

__all__ = ["CmadConfig", "CmadHead", "prototype_score", "topk_mean"]
