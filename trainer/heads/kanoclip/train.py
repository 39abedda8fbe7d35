"""KAnoCLIP training (section 2.5, Eq. 13-15): prompts, Bi-CMCI and Conv-Adapter together.

``L = kd_weight L_KD + global_weight L_global + local_weight L_local`` (all 1, the paper's):

* L_KD (2.2.2): the paper's Eq. 1-3 are not in its text; from the prose, per image
  ``d(W^a, W*) - d(W^n, W*)`` with ``d`` the Euclidean distance of L2-normalized features
  (bounded, so the push away from ``W^n`` cannot diverge), ``W^n, W^a`` the image's class
  prompts (``model.py``) and ``W*`` its knowledge anchor (:func:`knowledge_anchors`),
  encoded once without gradients.
* L_global (Eq. 14): ``BCE(S_global / 2, label)``; ``S_global`` (Eq. 12) lies in [0, 2],
  so it is halved to be a probability.
* L_local (Eq. 15): ``Focal(M^a, G) + Dice(M^n, 1 - G) + Dice(M^a, G)`` (focal gamma 2,
  Dice smoothing 1, AnomalyCLIP's) on maps bilinearly upsampled to the input;
  ``local_loss: per_tap`` sums it over the taps' maps ("in the intermediate layers"),
  ``fused`` takes Eq. 9's fused maps once.

The paper gives no optimizer settings; the defaults are AnomalyCLIP's (the paper follows its
protocol): Adam lr 1e-3, betas (0.5, 0.999), batch 8, 15 epochs. The frozen CLIP-VV
features are cached (``train.cache_features``); each image's class and defect type come from
its dataset record (the batch's keys), also when its features come from the cache.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from tqdm import tqdm

from edge_inspect.trainer.backbones.clip_tokenizer import tokenize
from edge_inspect.trainer.heads.base import MethodTraining, TrainPhase
from edge_inspect.trainer.heads.kanoclip.model import KanoClipHead
from edge_inspect.trainer.losses import binary_focal_loss, dice_loss

log = logging.getLogger(__name__)
KANOCLIP_TRAINING = {"epochs": 15, "batch_size": 8, "lr": 1e-3, "betas": (0.5, 0.999)}
TEXT_BATCH = 64
NO_KNOWLEDGE = ("KAnoCLIP trains toward knowledge anchors: set head.knowledge to a knowledge file "
                "(e.g. configs/kanoclip/knowledge/mvtec.yaml), or head.kd_weight: 0 to train without KnPL")


def encode_texts(head: KanoClipHead, texts: list[str]) -> torch.Tensor:
    """L2-normalized CLIP text features ``(len(texts), E)`` (frozen tower, no gradients)."""
    out = []
    device = head.normal_context.device
    with torch.no_grad():
        for i in tqdm(range(0, len(texts), TEXT_BATCH), desc="knowledge anchors", unit="batch",
                      disable=len(texts) <= TEXT_BATCH):
            tokens = tokenize(texts[i:i + TEXT_BATCH], head.clip.cfg.context_length).to(device)
            out.append(F.normalize(head.clip.encode_text(tokens).float(), dim=-1))
    return torch.cat(out)


def knowledge_anchors(head: KanoClipHead, records) -> torch.Tensor:
    """Eq. 3 per record: ``W*`` = the normalized mean of the normalized features of its
    class's N general texts (the LLM's) and its M VQA answers: each per-image text is one
    answer, and its defect type's ``fine`` texts, averaged, count as one (the paper's m = 1
    per image; the files give a few alternatives per defect type)."""
    if head.knowledge is None:
        raise ValueError(NO_KNOWLEDGE)
    k = head.knowledge
    per_record = []
    for r in records:
        entry = k.require(r.class_name)
        per_record.append((tuple(entry.general), tuple(entry.fine.get(r.defect, ())),
                           tuple(k.image_texts(r.image))))
    unique = sorted({t for groups in per_record for group in groups for t in group})
    feats = encode_texts(head, unique)
    row = {t: i for i, t in enumerate(unique)}
    cache: dict[tuple, torch.Tensor] = {}
    anchors = []
    for key in per_record:
        if key not in cache:
            general, fine, own = ([feats[row[t]] for t in group] for group in key)
            answers = [F.normalize(torch.stack(fine).mean(0), dim=-1)] if fine else []
            cache[key] = F.normalize(torch.stack(general + answers + own).mean(0), dim=-1)
        anchors.append(cache[key])
    log.info("knowledge anchors: %d texts, %d distinct anchors for %d images", len(unique),
             len(cache), len(records))
    return torch.stack(anchors)


def knowledge_loss(text: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """L_KD: mean over images of ``|W^a - W*| - |W^n - W*|``; ``text (B, 2, E)`` normalized."""
    return ((text[:, 1] - anchors).norm(dim=-1) - (text[:, 0] - anchors).norm(dim=-1)).mean()


def local_loss(p_normal: torch.Tensor, p_abnormal: torch.Tensor, gt: torch.Tensor,
               gamma: float) -> torch.Tensor:
    """Eq. 15 on one pair of maps ``(B, H, W)`` against the mask ``gt``."""
    return (binary_focal_loss(p_abnormal, gt, gamma) + dice_loss(p_normal, 1 - gt)
            + dice_loss(p_abnormal, gt))


class KanoClipTraining(MethodTraining):
    defaults = KANOCLIP_TRAINING
    caches_features = True  # frozen CLIP-VV, no augmentation
    uses_sample_records = True  # the loss needs each image's class and defect type
    init_batches = 0  # begin_phase needs the records, not images

    def check_data(self, head: KanoClipHead, datasets: dict) -> None:
        """Every training class must be in the knowledge files (its anchors come from there)."""
        if head.knowledge is not None and head.cfg.kd_weight:
            for ds in datasets.values():
                for name in ds.class_names:
                    head.knowledge.require(name)

    def frozen_features(self, head: KanoClipHead, images: torch.Tensor, *planes: torch.Tensor):
        return head.visual_features(images)

    def phases(self, head: KanoClipHead, datasets: list[str], settings: dict) -> list[TrainPhase]:
        if head.cfg.kd_weight and head.knowledge is None:
            raise ValueError(NO_KNOWLEDGE)
        params = [p for p in head.parameters() if p.requires_grad]
        if not params:  # fixed prompts and no module (n_ctx 0, Table 3's first row): no training
            return []
        return [TrainPhase("prompts+bicmci+adapter", list(datasets), params,
                           epochs=settings.get("epochs"), steps=settings.get("steps"))]

    def begin_phase(self, head: KanoClipHead, phase: TrainPhase, batches) -> None:
        self._prepare(head, phase)

    def _prepare(self, head: KanoClipHead, phase: TrainPhase) -> dict:
        """Per record: its class's index and (with KnPL) its anchor; computed once per phase
        (also when a resumed run skips :meth:`begin_phase`)."""
        ctx = phase.context
        if "class_index" not in ctx:
            if not phase.records:
                raise ValueError("KAnoCLIP needs the training records (the fit loop sets them)")
            classes = sorted({r.class_name for r in phase.records})
            if head.knowledge is not None:
                for c in classes:
                    head.knowledge.require(c)
            ctx["classes"] = classes
            ctx["class_index"] = torch.tensor([classes.index(r.class_name) for r in phase.records])
            if head.cfg.kd_weight:
                ctx["anchors"] = knowledge_anchors(head, phase.records)
        return ctx

    def batch_text(self, head: KanoClipHead, class_index: torch.Tensor, classes: list[str]) -> torch.Tensor:
        """``(B, 2, E)``: each image's ``[W^n, W^a]``, one text-tower pass per class present."""
        present = class_index.unique().tolist()
        encoded = {c: head.encode_prompts(classes[c]) for c in present}
        return torch.stack([encoded[c] for c in class_index.tolist()])

    def loss(self, head: KanoClipHead, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
             masks: torch.Tensor, phase: TrainPhase, keys: list[int] | None = None):
        cfg = head.cfg
        ctx = self._prepare(head, phase)
        if keys is None:
            raise ValueError("KAnoCLIP's loss needs the batch's sample keys")
        index = torch.as_tensor(keys)
        text = self.batch_text(head, ctx["class_index"][index], ctx["classes"])
        score, _, logits = head.score_and_map(inputs, text)
        gt = masks.float()
        parts = {}
        if cfg.kd_weight:
            parts["kd"] = knowledge_loss(text, ctx["anchors"][index].to(text.device))
        with torch.autocast(score.device.type, enabled=False):
            parts["global"] = F.binary_cross_entropy((score.float() / 2).clamp(0, 1), labels.float())
        if cfg.local_loss == "per_tap":
            probs = logits.float().softmax(dim=-1)
            parts["local"] = sum(
                local_loss(head.to_image(probs[:, i, :, 0], smooth=False),
                           head.to_image(probs[:, i, :, 1], smooth=False), gt, cfg.focal_gamma)
                for i in range(probs.shape[1]))
        else:
            m_n, m_a = head.fuse(logits)
            parts["local"] = local_loss(head.to_image(m_n, smooth=False),
                                        head.to_image(m_a, smooth=False), gt, cfg.focal_gamma)
        total = (cfg.kd_weight * parts.get("kd", 0.0) + cfg.global_weight * parts["global"]
                 + cfg.local_weight * parts["local"])
        return total, {k: float(v.detach()) for k, v in parts.items()}
