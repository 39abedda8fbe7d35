"""The few-shot memory head on real textile images: K = 4 nominal shots, no defect seen."""

import numpy as np
import torch

from edge_inspect.trainer.backbones.texture import TextureBackbone
from edge_inspect.trainer.data import TextileImages
from edge_inspect.trainer.data.transforms import to_batch
from edge_inspect.trainer.heads.memory import TEXTURE_MEMORY, MemoryHead
from edge_inspect.trainer.metrics import auroc


def _batch(kind, idx, bb):
    ds = TextileImages([kind])
    return to_batch([ds[i].image for i in idx], bb.input_size, bb.normalization, "center_crop")


def test_memory_head_separates_both_defect_kinds():
    torch.manual_seed(0)
    bb = TextureBackbone(248).eval()
    head = MemoryHead.fit(bb, TEXTURE_MEMORY, _batch("nominal", range(4), bb))
    with torch.no_grad():
        normal, maps = head(_batch("nominal", range(600, 640), bb))
        local, _ = head(_batch("local", range(40), bb))
        glob, _ = head(_batch("global", range(40), bb))
    assert maps.shape == (40, 248, 248) and normal.shape == (40,)
    y = np.r_[np.zeros(40), np.ones(40)]
    assert auroc(y, np.r_[normal.numpy(), local.numpy()]) >= 0.97
    assert auroc(y, np.r_[normal.numpy(), glob.numpy()]) >= 0.97
    assert 0.5 < float(normal.median()) < 2.0  # both detectors are scaled so normal ~ 1
