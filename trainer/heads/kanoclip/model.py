"""KAnoCLIP (Li et al., ICASSP 2025; seeds/KAnoCLIP.txt): the model.

No official code is public; where the paper is silent the choice is a config value named
below (research/official_code.md section 6 proposes AnomalyCLIP's settings as defaults).

* CLIP-VV (2.3, Eq. 4-8): the frozen CLIP's V-V dual path from block ``vv_from``; the V-V
  patch tokens of the four ``taps`` after ``ln_post @ proj`` are ``F_patch`` (the paper
  gives no tap indices: 6/12/18/24 of ViT-L/14@336 at 518, as AnomalyCLIP). The global
  feature ``I`` (``global_token``): ``vv``, the V-V path's CLS at the deepest tap (Eq. 8's
  ``S_l[0]``, the paper), ``original`` (CLIP's image embedding) or ``original_no_ln_post``
  (AnomalyCLIP's). ``vv: false`` uses the original path (Table 3's ablation).
* KnPL (2.2.2): ``P_n = [SOT][N_1..N_K][normal][class].`` and ``P_a`` likewise, ``K =
  n_ctx`` (12), separate normal/abnormal contexts after SOT, init N(0, ``ctx_std``^2)
  (0.02, AnomalyCLIP's). ``[Normal]`` / ``[Abnormal]`` range over ``normal_words`` /
  ``abnormal_words`` (the paper's examples: normal, perfect / abnormal, defective);
  ``W^n``, ``W^a`` are the means of the L2-normalized prompt features over the words,
  L2-normalized again; ``F_text = [W^n, W^a]`` (2, E); ``n_ctx: 0``: fixed prompts. The
  anchors and L_KD are in ``train.py``; the knowledge file (``knowledge.py``) also gives
  each class's words.
* Bi-CMCI (Eq. 9-10, ``blocks.py``): per tap ``bicmci_layers`` (1) stages of BiCA between
  the patches and the two text tokens, self-attention on the text and ``visual_sa`` on the
  patches, each with a residual and no feed-forward layer (the paper names none); the tap's
  map is ``softmax(<P, T> / temperature)`` over {normal, abnormal} on the refined,
  normalized tokens (``temperature`` 0.07, CLIP's). ``Norm`` (``map_norm``): ``mean``, the
  mean of the taps' probabilities (in [0, 1], as the paper asks, and each tap stays a
  probability for the loss), or ``softmax_of_sum``, the softmax of the summed logits.
  ``M = G_sigma((1 - M^n + M^a) / 2)`` on the grid, bilinear to the input, then the
  Gaussian (``map_sigma`` 4, AnomalyCLIP's). ``bicmci: false`` scores the projected
  patches against ``F_text`` directly (Table 3's ablation).
* Conv-Adapter (Eq. 11): on ``I``; ``adapter_dim`` (None: E / 4). ``adapter: false``
  uses ``I`` (Table 3).
* Eq. 12: ``S_global = softmax(<I_c, F_text> / temperature)_abnormal + max M``.

The class in the prompts: evaluation sets each target class with :meth:`begin_class`; an
export bakes the text features of ``export_class`` (the text tower is not in the graph;
Bi-CMCI runs on the two constant text tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edge_inspect.trainer.backbones.clip import ClipModel
from edge_inspect.trainer.backbones.clip_tokenizer import tokenize
from edge_inspect.trainer.heads.base import AnomalyHead
from edge_inspect.trainer.heads.kanoclip.blocks import VISUAL_SA, BiCmciStage, ConvAdapter
from edge_inspect.trainer.heads.kanoclip.knowledge import Knowledge
from edge_inspect.trainer.smoothing import GaussianSmoothing

GLOBAL_TOKENS = ("vv", "original", "original_no_ln_post")
MAP_NORMS = ("mean", "softmax_of_sum")
LOCAL_LOSSES = ("per_tap", "fused")


@dataclass
class KanoClipConfig:
    """KAnoCLIP hyperparameters; defaults are the paper's where it gives them (see module doc)."""

    knowledge: tuple[str, ...] = ()  # knowledge files (training needs the classes it sees)
    export_class: str = "object"  # the class whose prompts an export bakes
    taps: tuple[int, ...] = (6, 12, 18, 24)
    vv_from: int = 6
    vv: bool = True
    global_token: str = "vv"
    n_ctx: int = 12
    ctx_std: float = 0.02
    normal_words: tuple[str, ...] = ("normal", "perfect")
    abnormal_words: tuple[str, ...] = ("abnormal", "defective")
    bicmci: bool = True
    bicmci_heads: int = 8
    bicmci_layers: int = 1
    deform_points: int = 4
    visual_sa: str = "deformable"
    adapter: bool = True
    adapter_dim: int | None = None
    temperature: float = 0.07
    map_norm: str = "mean"
    map_sigma: float = 4.0
    # training (train.py): L = kd_weight L_KD + global_weight L_global + local_weight L_local
    kd_weight: float = 1.0
    global_weight: float = 1.0
    local_weight: float = 1.0
    local_loss: str = "per_tap"
    focal_gamma: float = 2.0

    def __post_init__(self) -> None:
        for key, value, allowed in (("global_token", self.global_token, GLOBAL_TOKENS),
                                    ("map_norm", self.map_norm, MAP_NORMS),
                                    ("visual_sa", self.visual_sa, VISUAL_SA),
                                    ("local_loss", self.local_loss, LOCAL_LOSSES)):
            if value not in allowed:
                raise ValueError(f"head.{key} {value!r} unknown; choose one of {allowed}")
        if isinstance(self.knowledge, str):
            self.knowledge = (self.knowledge,)
        if not self.normal_words or not self.abnormal_words:
            raise ValueError("head.normal_words and head.abnormal_words need at least one word each")
        if self.global_token == "vv" and not self.vv:
            raise ValueError("head.global_token vv needs head.vv: true; choose original without V-V")
        if self.global_token == "vv" and self.vv_from > max(self.taps):
            raise ValueError(f"head.global_token vv reads the V-V path at tap {max(self.taps)}, before "
                             f"it starts (vv_from {self.vv_from}); lower vv_from or choose original")
        if self.n_ctx < 0 or self.bicmci_layers < 1:
            raise ValueError("head.n_ctx must be >= 0 and head.bicmci_layers >= 1")


class KanoClipHead(AnomalyHead):
    """KAnoCLIP (zero-shot) on a frozen CLIP with the V-V path."""

    method = "kanoclip"

    def __init__(self, clip: ClipModel, cfg: KanoClipConfig | None = None,
                 knowledge: Knowledge | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or KanoClipConfig()
        self.clip = clip.eval().requires_grad_(False)
        self.backbone = clip.visual
        self.backbone.check_layers(tuple(cfg.taps))
        if cfg.vv and not 1 <= cfg.vv_from <= self.backbone.num_layers:
            raise ValueError(f"head.vv_from must be in 1..{self.backbone.num_layers}, got {cfg.vv_from}")
        self.knowledge = knowledge
        embed, text_width = clip.cfg.embed_dim, clip.cfg.text_width
        # n_ctx 0: fixed prompts "[word] [class]." (Table 3's first row, as we read it)
        self.normal_context = (nn.Parameter(cfg.ctx_std * torch.randn(cfg.n_ctx, text_width))
                               if cfg.n_ctx else None)
        self.abnormal_context = (nn.Parameter(cfg.ctx_std * torch.randn(cfg.n_ctx, text_width))
                                 if cfg.n_ctx else None)
        self.stages = nn.ModuleList(
            nn.ModuleList(BiCmciStage(embed, cfg.bicmci_heads, cfg.deform_points, cfg.visual_sa)
                          for _ in range(cfg.bicmci_layers))
            for _ in cfg.taps) if cfg.bicmci else None
        self.conv_adapter = ConvAdapter(embed, cfg.adapter_dim or embed // 4) if cfg.adapter else None
        self.smooth = GaussianSmoothing(cfg.map_sigma)
        self.class_name = cfg.export_class
        self._text_cache: dict[str, torch.Tensor] = {}

    # -- text (KnPL) -----------------------------------------------------------------------
    def class_words(self, class_name: str) -> str:
        return self.knowledge.words(class_name) if self.knowledge else class_name.replace("_", " ")

    def prompt_tokens(self, class_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenized ``[normal word] [class].`` and ``[abnormal word] [class].`` prompts."""
        words = self.class_words(class_name)
        normal = tokenize([f"{w} {words}." for w in self.cfg.normal_words], self.clip.cfg.context_length)
        abnormal = tokenize([f"{w} {words}." for w in self.cfg.abnormal_words], self.clip.cfg.context_length)
        device = self.backbone.proj.device
        return normal.to(device), abnormal.to(device)

    def encode_prompts(self, class_name: str) -> torch.Tensor:
        """``F_text = [W^n, W^a]`` ``(2, E)`` of one class, with gradients to the contexts."""
        normal, abnormal = self.prompt_tokens(class_name)
        states = []
        for tokens, context in ((normal, self.normal_context), (abnormal, self.abnormal_context)):
            feats = (self.clip.encode_text_with_context(tokens, context, "after_sot")
                     if context is not None else self.clip.encode_text(tokens))
            states.append(F.normalize(F.normalize(feats.float(), dim=-1).mean(0), dim=-1))
        return torch.stack(states)

    def text_features(self, class_name: str | None = None) -> torch.Tensor:
        """``(2, E)`` of ``class_name`` (default: the current class); cached outside training."""
        name = class_name or self.class_name
        if self.training:
            return self.encode_prompts(name)
        if name not in self._text_cache:
            with torch.no_grad():
                self._text_cache[name] = self.encode_prompts(name).detach()
        return self._text_cache[name]

    def begin_class(self, class_name: str) -> None:
        """Score the next images as ``class_name`` (its words go into the prompts)."""
        self.class_name = class_name

    def baked_constants(self) -> dict:
        """What an export bakes: the class and the prompt texts its text features encode."""
        words = self.class_words(self.class_name)
        return {"prompt_class": self.class_name, "class_words": words,
                "in_knowledge": bool(self.knowledge and self.class_name in self.knowledge.classes),
                "normal_prompts": [f"{w} {words}." for w in self.cfg.normal_words],
                "abnormal_prompts": [f"{w} {words}." for w in self.cfg.abnormal_words],
                "context_tokens": self.cfg.n_ctx}

    def freeze_constants(self) -> None:
        """Bake ``export_class``'s two text features: the graph holds no text tower."""
        self.eval()
        self.class_name = self.cfg.export_class
        self._text_cache = {}
        self.text_features()

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_trainable_state(state)
        self._text_cache = {}

    def _apply(self, fn, *args, **kwargs):
        self._text_cache = {}  # a move to another device or dtype: encode again there
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True) -> KanoClipHead:
        super().train(mode)
        self.clip.eval()
        if mode:
            self._text_cache = {}  # training changes the prompts; eval keeps a frozen cache
        return self

    # -- vision (CLIP-VV) ------------------------------------------------------------------
    def visual_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Frozen ``patches (B, taps, N, E)`` (projected tap tokens) and ``global (B, E)``."""
        cfg, bb = self.cfg, self.backbone
        taps = tuple(cfg.taps)
        if cfg.vv:
            ori, vv, last = bb.forward_dual_taps(images, taps, cfg.vv_from)
            tokens = vv
        else:
            ori = tokens = bb.forward_taps(images, tuple(sorted(set(taps) | {bb.num_layers})))
            last = ori[bb.num_layers]
        patches = torch.stack([bb.project(tokens[k][:, 1:]) for k in taps], dim=1)
        if cfg.global_token == "vv":
            glob = bb.project(tokens[max(taps)][:, 0])
        elif cfg.global_token == "original":
            glob = bb.project(last[:, 0])
        else:
            glob = last[:, 0] @ bb.proj
        return {"patches": patches, "global": glob}

    # -- head ------------------------------------------------------------------------------
    def tap_logits(self, patches: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Eq. 9 inside the sum: ``(B, taps, N, 2)`` logits of each tap's (Bi-CMCI) map.

        ``text``: ``(2, E)`` for the whole batch or ``(B, 2, E)`` per image."""
        b, n_taps = patches.shape[:2]
        text = text.expand(b, -1, -1) if text.ndim == 2 else text
        out = []
        for i in range(n_taps):
            p, t = patches[:, i], text
            for stage in self.stages[i] if self.stages is not None else ():
                p, t = stage(p, t, self.backbone.grid)
            sim = F.normalize(p, dim=-1) @ F.normalize(t, dim=-1).transpose(-2, -1)
            out.append(sim / self.cfg.temperature)
        return torch.stack(out, dim=1)

    def fuse(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 9's ``Norm``: ``(M^n, M^a)``, each ``(B, N)`` in [0, 1]."""
        if self.cfg.map_norm == "mean":
            probs = logits.float().softmax(dim=-1).mean(dim=1)
        else:
            probs = logits.float().sum(dim=1).softmax(dim=-1)
        return probs[..., 0], probs[..., 1]

    def to_image(self, grid_map: torch.Tensor, smooth: bool = True) -> torch.Tensor:
        """``(B, N)`` on the patch grid -> ``(B, H, W)``: bilinear, then Eq. 10's Gaussian."""
        rows, cols = self.backbone.grid
        up = F.interpolate(grid_map.reshape(-1, 1, rows, cols), size=self.backbone.input_size,
                           mode="bilinear", align_corners=False).squeeze(1)
        return self.smooth(up) if smooth else up

    def global_probability(self, glob: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Eq. 12's first term: ``softmax(<I_c, F_text> / temperature)_abnormal`` ``(B,)``."""
        feat = self.conv_adapter(glob) if self.conv_adapter is not None else glob
        text = text.expand(glob.shape[0], -1, -1) if text.ndim == 2 else text
        logits = (F.normalize(feat.float(), dim=-1).unsqueeze(1)
                  @ F.normalize(text.float(), dim=-1).transpose(-2, -1)).squeeze(1)
        return (logits / self.cfg.temperature).softmax(dim=-1)[:, 1]

    def score_and_map(self, feats: dict[str, torch.Tensor], text: torch.Tensor):
        """Eq. 9-12 from the frozen features: ``(S_global (B,), M (B, H, W), tap logits)``."""
        logits = self.tap_logits(feats["patches"], text)
        m_n, m_a = self.fuse(logits)
        amap = self.to_image((1 - m_n + m_a) / 2)
        score = self.global_probability(feats["global"], text) + amap.flatten(1).amax(dim=1)
        return score, amap, logits

    def forward_with_features(self, images: torch.Tensor):
        score, amap, _ = self.score_and_map(self.visual_features(images), self.text_features())
        return score, amap, {}
