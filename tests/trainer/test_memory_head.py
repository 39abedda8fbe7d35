"""The few-shot memory head on real textile images: K = 4 nominal shots (and held-out
normals for the shift reference and the thresholds), no defect seen."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from edge_inspect.trainer.backbones.texture import TextureBackbone
from edge_inspect.trainer.data import TextileImages
from edge_inspect.trainer.data.transforms import to_batch
from edge_inspect.trainer.heads.memory import TEXTURE_MEMORY, MemoryHead, MemoryHeadConfig
from edge_inspect.trainer.metrics import auroc


def _batch(kind, idx, bb):
    ds = TextileImages([kind])
    return to_batch([ds[i].image for i in idx], bb.input_size, bb.normalization, "center_crop")


def test_memory_head_separates_both_defect_kinds():
    torch.manual_seed(0)
    bb = TextureBackbone(248).eval()
    head = MemoryHead.fit(bb, TEXTURE_MEMORY, _batch("nominal", range(4), bb),
                          _batch("nominal", range(500, 600), bb))
    with torch.no_grad():
        normal, maps = head(_batch("nominal", range(600, 640), bb))
        local, _ = head(_batch("local", range(40), bb))
        glob, _ = head(_batch("global", range(40), bb))
    assert maps.shape == (40, 248, 248) and normal.shape == (40,)
    y = np.r_[np.zeros(40), np.ones(40)]
    assert auroc(y, np.r_[normal.numpy(), local.numpy()]) >= 0.97
    assert auroc(y, np.r_[normal.numpy(), glob.numpy()]) >= 0.97
    assert 0.5 < float(normal.median()) < 2.0  # both detectors are scaled so normal ~ 1


def test_memory_head_needs_its_reference_normals_and_refuses_an_old_memory(tmp_path):
    from edge_inspect.trainer.config import RunConfig
    from edge_inspect.trainer.evaluate import evaluate_run
    from tests.conftest import ROOT

    cfg = RunConfig.from_yaml(ROOT / "configs/memory/textile-texture.yaml",
                              ["calibration.normals=50"])
    with pytest.raises(ValueError, match=r"calibration.normals = 50, .* at least 130 \(30 more"):
        evaluate_run(cfg, None, tmp_path / "eval")
    assert not list(tmp_path.iterdir())  # refused before anything was written

    bb = TextureBackbone(248).eval()
    head = MemoryHead.fit(bb, TEXTURE_MEMORY, _batch("nominal", range(4), bb),
                          _batch("nominal", range(500, 530), bb))
    old = {k: v for k, v in head.memory_state().items() if k != "detector_threshold"}
    with pytest.raises(ValueError, match="must be enrolled again"):
        head.load_memory_state(old)
    before_border = {k: v for k, v in head.memory_state().items() if k != "local.position_scale"}
    with pytest.raises(ValueError, match="must be enrolled again"):
        head.load_memory_state(before_border)
    with pytest.raises(ValueError, match="needs reference normal images for its shift detector"):
        MemoryHead.fit(bb, TEXTURE_MEMORY, _batch("nominal", range(4), bb))
    # the border scales need the reference too, even beside the window detector
    window = MemoryHead(bb, replace(TEXTURE_MEMORY, global_detector="window", shift_reference=30))
    window.enroll(_batch("nominal", range(4), bb))
    with pytest.raises(RuntimeError, match="no reference yet: fit_reference with 30"):
        window(_batch("nominal", [600], bb))
    with pytest.raises(ValueError, match="border_rings = 16 leaves no interior"):
        MemoryHead(bb, replace(TEXTURE_MEMORY, border_rings=16))
    with pytest.raises(ValueError, match="head.global_tail 'normal' unknown"):
        MemoryHeadConfig(global_tail="normal")
    with pytest.raises(ValueError, match="head.local_share must be in"):
        MemoryHeadConfig(local_share=1.0)


def test_shot_turns_put_each_shots_turned_patches_in_the_memory():
    from edge_inspect.runtime.enrollment import quarter_turns as numpy_turns
    from edge_inspect.trainer.heads.memory.model import quarter_turns

    bb = TextureBackbone(248).eval()
    shots = _batch("nominal", range(2), bb)
    turned = quarter_turns(shots, 4)
    assert turned.shape == (8, *shots.shape[1:])
    # the torch-free enrollment turns (H, W, 3) frames the same way and in the same order
    frames = shots.permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(numpy_turns(frames, 4), turned.permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(numpy_turns(frames, 2)[2:], frames[:, ::-1, ::-1])

    plain = MemoryHead(bb, replace(TEXTURE_MEMORY, use_global=False, border_rings=0))
    turns = MemoryHead(bb, replace(TEXTURE_MEMORY, use_global=False, border_rings=0, shot_turns=4))
    plain.enroll(shots)
    turns.enroll(shots)
    assert turns.local.bank.shape[0] == 4 * plain.local.bank.shape[0]
    # a shot turned by 90 degrees is in the turned memory, patch for patch; not in the plain one
    quarter = shots.rot90(1, (-2, -1))
    with torch.no_grad():
        in_turns = turns.score_taps(bb.forward_taps(quarter, turns.taps))[1]
        in_plain = plain.score_taps(bb.forward_taps(quarter, plain.taps))[1]
    assert float(in_turns.abs().max()) < 1e-3 < float(in_plain[:, 2:-2, 2:-2].mean())
    # the fold reference is the unturned shots': the same cosine memory gives the same scale
    cos_plain = MemoryHead(bb, replace(TEXTURE_MEMORY, use_global=False, border_rings=0, metric="cosine"))
    cos_turns = MemoryHead(bb, replace(TEXTURE_MEMORY, use_global=False, border_rings=0, metric="cosine",
                                       shot_turns=4))
    cos_plain.enroll(shots)
    cos_turns.enroll(shots)
    assert float(cos_turns.local_reference) == pytest.approx(float(cos_plain.local_reference), rel=1e-6)

    with pytest.raises(ValueError, match="head.shot_turns must be one of"):
        MemoryHeadConfig(shot_turns=3)
    with pytest.raises(ValueError, match="needs a square input"):
        MemoryHead(TextureBackbone((248, 128)), replace(TEXTURE_MEMORY, shot_turns=4))
    with pytest.raises(ValueError, match="4 shot turns need square frames"):
        numpy_turns(np.zeros((1, 8, 6, 3)), 4)


def test_local_top_averages_the_largest_patch_scores_into_the_local_detector():
    bb = TextureBackbone(248).eval()
    shots, images = _batch("nominal", range(4), bb), _batch("local", range(6), bb)
    heads = {k: MemoryHead(bb, replace(TEXTURE_MEMORY, use_global=False, border_rings=0, local_top=k))
             for k in (1, 3)}
    with torch.no_grad():
        for head in heads.values():
            head.enroll(shots)
        maps = heads[1].score_taps(bb.forward_taps(images, heads[1].taps))[1].flatten(1)
        detectors = {k: h.detector_scores(images)[:, 0] for k, h in heads.items()}
    torch.testing.assert_close(detectors[1], maps.max(dim=1).values)
    top3 = torch.sort(maps, dim=1).values[:, -3:].mean(dim=1)  # the same patch scores, direct
    torch.testing.assert_close(detectors[3], top3)
    assert bool((detectors[3] < detectors[1]).all())
    with pytest.raises(ValueError, match="head.local_top must be >= 1"):
        MemoryHeadConfig(local_top=0)
    with pytest.raises(ValueError, match="exceeds the 31x31 patch grid"):
        MemoryHead(bb, replace(TEXTURE_MEMORY, local_top=31 * 31 + 1))
