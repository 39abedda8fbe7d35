"""IIPAD: one-for-all few-shot inspection (Lv et al., ICLR 2025; seeds/IIPAD.txt): the model.

Frozen parts: CLIP ViT-L/14 at 224 with the V-V dual path from block ``vv_from`` (6, as
AnomalyCLIP's DPAM(20) the code reuses) and BLIP-Diffusion's Q-Former
(:mod:`trainer.backbones.qformer`). Learned: the prompt generator
(:mod:`.prompts`), one for all categories.

Per image (sections 3.1, 3.3-3.4; A.1 for the numbers):

* ``g``: CLIP's class token ``E_v(x)`` (``ln_post`` then ``proj``; ``class_token:
  no_ln_post`` is the code's, which takes the original path's CLS ``@ proj`` without
  ``ln_post``, as AnomalyCLIP does), ``Z``: the Q-Former's 16 tokens;
* prompts ``S^n, S^a`` from the generator, encoded by CLIP's text tower into ``e^n, e^a``
  (EOT) and token embeddings (Eq. 5);
* ``F_j``: V-V-path patch tokens of taps 6/12/18/24 after ``ln_post @ proj`` (the prompt map
  and the training losses); memory features: original-path patch tokens of taps 6 and 18
  (raw width, no ``ln_post``; A.1 "of the original visual encoder").

The category-aware memory (Eq. 13-14): per enrolled image its keys (the Q-Former tokens,
each L2-normalized), its memory features (normalized) and its prompt embeddings
``e^n, e^a`` (normalized). At test time (the code's retrieval, 3f) ``sim_i`` is the mean over
the M key tokens of the dot product with entry ``i``'s token in the same slot; the top
``retrieve`` entries (the shots per category, as the code's k = K) are kept. Then

* Eq. 15: ``e_bar = normalize((mean of retrieved e + own e) / 2)`` per state;
* Eq. 16: ``A^p = mean_j softmax(<F_j, e_bar^a>, <F_j, e_bar^n>)`` (cosines / ``temperature``
  0.07 as the code scores at test time; the paper prints plain cosines, ``temperature: 1``);
* Eq. 17: ``A^v = sum over the 2 memory taps of min over the retrieved entries' patches of
  (1 - cos) / 2``;
* Eq. 18: map ``A^p + A^v`` (bilinear to the input, Gaussian sigma 4 as the code), image
  score ``max A^p + max A^v`` on the patch grid. ``image_score: official`` is the code's:
  that minus the mean over the retrieved entries of ``p_normal`` (``g`` against each
  entry's two prompts, softmax at 0.07) minus their mean ``sim``.

Without a memory (before enrollment) the map is ``A^p`` from the image's own prompts.

The memory has a fixed ``capacity`` (entries) and a validity mask, so the exported graph
takes it as inputs of fixed shape (``memory.keys``, ``memory.bank``, ``memory.prompts``,
``memory.valid``) and retrieves with TopK + Gather exactly as here; its feature outputs are
one memory entry per frame, from which ``edge-inspect enroll`` (recipe ``category_aware``,
``--append`` for a new category) rebuilds the memory without torch. A category is added by
enrolling its images, not by training. ``condition: class_token``
(the edge variant, :mod:`.prompts`) needs no Q-Former: the key is the normalized ``g``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edge_inspect.trainer.backbones.clip import ClipModel
from edge_inspect.trainer.backbones.clip_tokenizer import tokenize
from edge_inspect.trainer.backbones.qformer import QFormer
from edge_inspect.trainer.heads.base import AnomalyHead
from edge_inspect.trainer.heads.iipad.prompts import PromptGenerator, PromptShape
from edge_inspect.trainer.smoothing import GaussianSmoothing

# Manual prompts of the paper's appendix A.2 (duplicates kept as printed: they weight Eq. 11).
NORMAL_STATES = ("normal", "flawless", "perfect", "unblemished", "object without flaw",
                 "object without defect", "object without damage")
_GENERAL_ABNORMAL = ("damaged", "abnormal", "imperfect", "blemished", "object with flaw",
                     "object with defect", "object with damage")
_MVTEC = ("large breakage", "small breakage", "contamination", "defect", "anomaly", "hole",
          "color stain", "metal contamination", "thread residue", "thread", "cut", "crack", "cut",
          "hole", "print", "color stain", "cut", "fold", "glue", "poke", "bent wire", "missing part",
          "missing wire", "cut", "poke", "crack", "faulty imprint", "poke", "scratch")
_MVTEC_TAIL = ("object squeezed with compression", "object with breakage", "object with thread residue",
               "object with thread", "object with metal contamination")
_VISA = ("melded wax", "foreign particals", "extra wax", "chunk of wax missing", "weird candle wick",
         "damaged corner of packaging", "different colour spot", "scratch", "discolor", "misshape",
         "leak", "bubble", "breakage", "small scratches", "burnt", "stuck together", "spot",
         "corner missing", "scratches", "chunk of gum missing", "colour spot", "cracks", "color spot",
         "fryum stuck together", "small chip around edge", "bent", "missing", "melt", "extra",
         "wrong place", "damage", "dirt")


def manual_prompts(kind: str) -> tuple[list[str], list[str]]:
    """The normal and abnormal manual prompts (A.2): ``mvtec``, ``visa`` or ``general``
    (the seven dataset-free abnormal states both lists start with)."""
    def phrase(state: str) -> str:
        return f"a image of the {state if state.startswith('object') else state + ' object'}"

    normal = [phrase(s) for s in NORMAL_STATES]
    abnormal = [phrase(s) for s in _GENERAL_ABNORMAL]
    if kind == "mvtec":
        abnormal += [f"a image of the object with {s}" for s in _MVTEC]
        abnormal += [f"a image of the {s}" for s in _MVTEC_TAIL]
    elif kind == "visa":
        abnormal += [f"a image of the object with {s}" for s in _VISA]
    elif kind != "general":
        raise ValueError(f"head.manual_prompts must be mvtec, visa or general, got {kind!r}")
    return normal, abnormal


@dataclass
class IipadConfig:
    """IIPAD hyperparameters; defaults are the paper's (A.1) except: ``temperature`` (the
    map's, the code's 0.07; the paper prints plain cosines), ``manual_prompts`` (``general``
    so any dataset works; the paper uses its dataset's list, ``mvtec`` / ``visa``, and its
    Table 10 shows the general list does worse: paper configs set it) and
    ``prefix_init_std`` (our choice). ``synthetic_noise``: the paper's 1; the code's is 2."""

    taps: tuple[int, ...] = (6, 12, 18, 24)
    memory_taps: tuple[int, ...] = (6, 18)
    vv_from: int = 6
    prefix: int = 24  # T
    category: int = 4  # m
    condition: str = "qformer"  # "class_token": the edge variant
    qformer: str | None = None  # a diffusers BlipDiffusionPipeline folder (condition qformer)
    class_token: str = "ln_post"  # "no_ln_post": the official code's global feature
    temperature: float = 0.07  # the maps (Eq. 16) and the official score
    loss_temperature: float = 1.0  # Eq. 6-11 as printed (and as the code trains)
    alpha: float = 8.0  # textual guidance
    beta: float = 8.0  # token-level alignment
    sparsity: float = 1 / 256
    synthetic_noise: float = 1.0
    prefix_init_std: float = 0.02
    manual_prompts: str = "general"  # mvtec / visa: the paper's dataset lists
    image_score: str = "paper"  # "official": the code's image score
    retrieve: int | None = None  # entries retrieved per image; None: the run's shots
    capacity: int = 64  # memory entries (the exported graph's fixed bank size)
    map_sigma: float = 4.0

    def __post_init__(self) -> None:
        self.taps, self.memory_taps = tuple(self.taps), tuple(self.memory_taps)
        for name, value, allowed in (("condition", self.condition, ("qformer", "class_token")),
                                     ("class_token", self.class_token, ("ln_post", "no_ln_post")),
                                     ("image_score", self.image_score, ("paper", "official"))):
            if value not in allowed:
                raise ValueError(f"head.{name} must be one of {allowed}, got {value!r}")
        manual_prompts(self.manual_prompts)
        if self.retrieve is not None and not 1 <= self.retrieve <= self.capacity:
            raise ValueError(f"head.retrieve must be in 1..{self.capacity} (head.capacity), "
                             f"got {self.retrieve}")


class IipadHead(AnomalyHead):
    """IIPAD on a frozen CLIP (and Q-Former): prompt map, category-aware memory."""

    method = "iipad"
    learns_from_shots = True  # the generator trains on the K shots of every category
    memory_spans_classes = True  # one memory holds every category's shots (one-for-all)
    memory_capacity_fixed = True  # capacity entries and a validity mask: fixed graph inputs

    def __init__(self, clip: ClipModel, qformer: QFormer | None, cfg: IipadConfig) -> None:
        super().__init__()
        if (cfg.condition == "qformer") != (qformer is not None):
            raise ValueError("head.condition: qformer needs the Q-Former (head.qformer: a "
                             "BlipDiffusionPipeline folder); class_token takes none")
        self.cfg = cfg
        self.clip = clip.eval().requires_grad_(False)
        self.backbone = clip.visual
        self.backbone.check_layers(tuple(sorted(set(cfg.taps) | set(cfg.memory_taps))))
        self.qformer = qformer.eval().requires_grad_(False) if qformer is not None else None
        if qformer is not None and qformer.input_size != tuple(self.backbone.input_size):
            raise ValueError(f"the Q-Former takes {qformer.input_size} images, the CLIP tower "
                             f"{tuple(self.backbone.input_size)}: set the backbone's input size "
                             "to match")
        q = qformer.cfg if qformer is not None else None
        slots, qwidth = (q.queries, q.width) if q else (1, clip.cfg.text_width)
        self.generator = PromptGenerator(PromptShape(
            cfg.prefix, cfg.category, clip.cfg.text_width, clip.cfg.embed_dim, slots, qwidth,
            cfg.prefix_init_std), cfg.condition)
        self.smooth = GaussianSmoothing(cfg.map_sigma)
        normal, abnormal = manual_prompts(cfg.manual_prompts)
        ctx = clip.cfg.context_length
        self.register_buffer("normal_tokens", tokenize(normal, ctx), persistent=False)
        self.register_buffer("abnormal_tokens", tokenize(abnormal, ctx), persistent=False)
        self._manual: tuple[torch.Tensor, torch.Tensor] | None = None
        self.memory: dict[str, torch.Tensor] | None = None

    def check_exportable(self) -> None:
        if self.memory is None:
            raise ValueError("an IIPAD bundle needs its memory: export an enrolled checkpoint "
                             "(eval writes <run>/eval-<K>shot/enrolled/<dataset>-<class>.safetensors, "
                             "every category's shots) with --checkpoint")

    def train(self, mode: bool = True) -> IipadHead:
        super().train(mode)
        self.clip.eval()
        if self.qformer is not None:
            self.qformer.eval()
        return self

    # -- frozen features ------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the frozen towers give one image batch: ``g (B, E)``, ``z (B, M, d)`` (the
        Q-Former's tokens; absent for ``class_token``), ``patches (B, taps, R, E)`` (V-V,
        projected) and ``memory (B, memory_taps, R, C)`` (original path, raw)."""
        cfg = self.cfg
        ori, vv, last = self.backbone.forward_dual_taps(
            images, tuple(sorted(set(cfg.taps) | set(cfg.memory_taps))), cfg.vv_from)
        cls = last[:, 0]
        g = (self.backbone.project(cls) if cfg.class_token == "ln_post" else cls @ self.backbone.proj)
        out = {"g": g,
               "patches": torch.stack([self.backbone.project(vv[t][:, 1:]) for t in cfg.taps], dim=1),
               "memory": torch.stack([ori[t][:, 1:] for t in cfg.memory_taps], dim=1)}
        if self.qformer is not None:
            out["z"] = self.qformer(images)
        return out

    def prompt_embeddings(self, g: torch.Tensor, z: torch.Tensor | None):
        """``e^n, e^a (B, E)`` and the token embeddings ``(B, T', E)`` of both prompts."""
        normal, abnormal = self.generator(g, z)
        b = g.shape[0]
        eot, tokens = self.clip.encode_prompt_tokens(torch.cat([normal, abnormal]))
        return eot[:b], eot[b:], tokens[:b], tokens[b:]

    def manual_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Text features of the manual prompts (frozen; computed once)."""
        if self._manual is None or self._manual[0].device != self.normal_tokens.device:
            with torch.no_grad():
                self._manual = (self.clip.encode_text(self.normal_tokens),
                                self.clip.encode_text(self.abnormal_tokens))
        return self._manual

    def keys(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Retrieval keys ``(B, M, D)``: each Q-Former token normalized (or the class token)."""
        key = feats["z"] if self.qformer is not None else feats["g"][:, None, :]
        return F.normalize(key, dim=-1)

    # -- inference ------------------------------------------------------------------------
    def forward_with_features(self, images: torch.Tensor):
        """Scores, maps, and ``keys``, ``memory`` (normalized) and ``prompts (B, 2, E)``: one
        memory entry per image, which :meth:`enroll` (and torch-free enrollment) stores."""
        feats = self.encode(images)
        e_n, e_a, _, _ = self.prompt_embeddings(feats["g"], feats.get("z"))
        own = F.normalize(torch.stack([e_n, e_a], dim=1), dim=-1)
        entry = {"keys": self.keys(feats), "memory": F.normalize(feats["memory"], dim=-1), "prompts": own}
        score, grid_map = self.score(feats, entry)
        return score, self._to_image(grid_map), entry

    def score(self, feats: dict[str, torch.Tensor], entry: dict[str, torch.Tensor]):
        """Eq. 15-18 on the patch grid: image scores ``(B,)`` and maps ``(B, R)``."""
        if self.memory is None:
            prompts, visual, extra = entry["prompts"], None, 0.0
        else:
            idx, sim = self.retrieve(entry["keys"])
            bank_prompts = self.memory["prompts"][idx].mean(dim=1)  # (B, 2, E)
            prompts = F.normalize((bank_prompts + entry["prompts"]) / 2, dim=-1)
            visual = self.visual_map(entry["memory"], idx)
            extra = 0.0
            if self.cfg.image_score == "official":  # p_normal per retrieved entry, then the mean
                g = F.normalize(feats["g"], dim=-1)
                entries = self.memory["prompts"][idx]  # (B, k, 2, E), normalized
                logits = torch.einsum("bkse,be->bks", entries, g) / self.cfg.temperature
                extra = -logits.softmax(dim=-1)[..., 0].mean(dim=1) - sim.mean(dim=1)
        patches = F.normalize(feats["patches"], dim=-1)  # (B, J, R, E)
        logits = torch.einsum("bjre,bse->bjrs", patches, prompts) / self.cfg.temperature
        prompt_map = logits.softmax(dim=-1)[..., 1].mean(dim=1)  # (B, R)
        if visual is None:
            return prompt_map.amax(dim=1), prompt_map
        return prompt_map.amax(dim=1) + visual.amax(dim=1) + extra, prompt_map + visual

    def retrieve(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``retrieve`` valid entries by key similarity: indices and similarities ``(B, k)``."""
        sim = torch.einsum("bmd,nmd->bn", keys, self.memory["keys"]) / keys.shape[1]
        sim = sim + (self.memory["valid"] - 1.0) * 1e4  # invalid (padding) entries never win
        top = torch.topk(sim, self.retrieve_count, dim=1)
        return top.indices, top.values

    @property
    def retrieve_count(self) -> int:
        if self.cfg.retrieve is None:
            raise RuntimeError("head.retrieve is unset (the build sets it to the run's shots)")
        return self.cfg.retrieve

    def visual_map(self, memory: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Eq. 17: ``(B, R)`` summed over the memory taps, against the retrieved entries only."""
        total = 0.0
        retrieved = self.memory["bank"][idx]  # (B, k, L, R, C)
        for layer in range(memory.shape[1]):
            bank = retrieved[:, :, layer].reshape(retrieved.shape[0], -1, retrieved.shape[-1])
            cos = memory[:, layer] @ bank.transpose(1, 2)  # (B, R, k R)
            total = total + ((1.0 - cos) / 2.0).amin(dim=-1)
        return total

    def _to_image(self, grid_map: torch.Tensor) -> torch.Tensor:
        rows, cols = self.backbone.grid
        up = F.interpolate(grid_map.reshape(-1, 1, rows, cols), size=self.backbone.input_size,
                           mode="bilinear", align_corners=False)
        return self.smooth(up.squeeze(1))

    # -- the category-aware memory --------------------------------------------------------
    def enroll(self, shots: torch.Tensor) -> None:
        """One memory entry per normal image (all categories at once); replaces the memory."""
        self.memory = None
        self.append(shots)

    @torch.no_grad()
    def append(self, images: torch.Tensor, batch: int = 8) -> None:
        """Add one entry per image to the memory (a new category: its K shots)."""
        if self.memory is not None and len(images) < self.retrieve_count:
            raise ValueError(f"a new category needs at least head.retrieve = {self.retrieve_count} "
                             f"images (each frame retrieves that many entries), got {len(images)}")
        entries = [self.forward_with_features(images[s:s + batch])[2] for s in range(0, len(images), batch)]
        new = {k: torch.cat([e[k] for e in entries]) for k in entries[0]}
        self.load_memory_state(self.padded_memory(new))

    @property
    def capacity(self) -> int:
        """Memory rows: the loaded memory's (an enrolled checkpoint fixes them), else the config's."""
        return int(self.memory["valid"].shape[0]) if self.memory is not None else self.cfg.capacity

    def padded_memory(self, new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The current valid entries (wherever their rows are) plus ``new``, first, padded
        with zeros to :attr:`capacity` rows."""
        cap = self.capacity
        new = {"keys": new["keys"], "bank": new["memory"], "prompts": new["prompts"]}
        old = {}
        if self.memory is not None:
            keep = self.memory["valid"] > 0.5
            old = {k: self.memory[k][keep] for k in new}
        n_old = old["keys"].shape[0] if old else 0
        n = n_old + new["keys"].shape[0]
        if n > cap:
            raise ValueError(f"{n} memory entries exceed the memory's {cap} rows: evaluate the run with "
                             "--set head.capacity=<more> (the exported graph's memory size) and "
                             "export that enrolled checkpoint")
        out = {k: v.new_zeros(cap, *v.shape[1:]) for k, v in new.items()}
        out["valid"] = new["keys"].new_zeros(cap)
        for k, v in new.items():
            if n_old:
                out[k][:n_old] = old[k]
            out[k][n_old:n] = v
        out["valid"][:n] = 1.0
        return out

    def clear_memory(self) -> None:
        self.memory = None

    def memory_state(self) -> dict[str, torch.Tensor]:
        return {} if self.memory is None else dict(self.memory)

    def load_memory_state(self, state: dict[str, torch.Tensor]) -> None:
        if not state:
            self.clear_memory()
            return
        if set(state) != {"keys", "bank", "prompts", "valid"}:
            raise ValueError(f"IIPAD memory needs keys, bank, prompts and valid, got {sorted(state)}")
        rows = {k: int(v.shape[0]) for k, v in state.items()}
        if len(set(rows.values())) != 1:
            raise ValueError(f"IIPAD memory arrays disagree on their rows: {rows}")
        valid = int(state["valid"].sum())
        if valid < self.retrieve_count:
            raise ValueError(f"the memory holds {valid} entries, fewer than head.retrieve = "
                             f"{self.retrieve_count}: enroll at least that many normal images")
        self.memory = {k: v.float() for k, v in state.items()}
