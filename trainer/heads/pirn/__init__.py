"""PIRN (RGB + surface normals, prototype reconstruction); see :mod:`.model`."""

from edge_inspect.trainer.heads.pirn.model import PirnConfig, PirnHead, sinkhorn

__all__ = ["PirnConfig", "PirnHead", "sinkhorn"]
