"""AF-CLIP and AF-CLIP+ (Fang et al., ACM MM 2025; seeds/AF-CLIP.txt): the model.

The training phases and losses are in ``train.py``, the registration in ``spec.py``.

Zero-shot path, per the paper (section numbers of seeds/AF-CLIP.txt):

1. Taps: residual stream after blocks 6/12/18/24 of the frozen CLIP ViT-L/14@336 at 518
   (CLS + 37x37 patches, before ``ln_post``).
2. Spatial aggregation (Eq. 5-6): patch grid averaged under an r x r Gaussian window,
   r in {1, 3, 5}, sigma 4, weights normalized over the window, zero padding (official
   code: ``unfold`` with padding r // 2; here a depthwise convolution, numerically the
   same). CLS passes unchanged. 4 taps x 3 scales = 12 token sets.
3. One shared attention adapter (Eq. 3-4): LayerNorm, 8-head attention with q/k/v
   ``width -> width/2`` (no bias), output ``width/2 -> width``. No residual: the paper's
   Eq. 4 and the official code agree that the adapter output replaces the tokens. The
   LayerNorm is from the official code (the paper does not mention it).
4. ``ln_post`` and ``proj`` of CLIP (Eq. 7), cosine with the text features / 0.07 (Eq. 9),
   logits summed over the 12 sets, softmax (Eq. 10): p_CLS is the image score, the patch
   probabilities the map.
5. Text: one learnable 12 x width context shared by both prompts, placed before SOT of
   "without defect." / "with defect." (Eq. 8, official layout).
6. Map: bilinear upsampling to the input size, Gaussian sigma 4 (scipy border rule).

Training (Eq. 11-15): focal (gamma 4, no alpha) on p_CLS + lambda1 * (focal + L1) on the
patch map against the mask downsampled to the grid (bilinear, > 0.5) + lambda2 * patch
alignment (Eq. 14) on the projected features of each set, normal and anomalous patches
paired within each image only (Eq. 14 and the official per-image mask), pair sums pooled
over the batch, averaged over sets; lambda1 = lambda2 = 1; Adam lr 1e-4, betas (0.5,
0.999), batch 8, 2 epochs.

Where the official code differs and what we do:
* segmentation-loss gradient: the code's alignment loss writes -1 into normal pixels of a
  tensor that shares storage with the segmentation target after the focal term saved it,
  so backward sees target -1 on normal pixels (2.1x-22x the paper's gradient there;
  confirmed by running it, research/official_code.md 1e). Default: the paper's formula.
  ``seg_gradient: official`` reproduces the code's gradient with the same loss value
  (``losses.binary_focal_loss_official_gradient``); the paper configs use it, since the
  published numbers come from that code.
* resize: the code resizes with PIL bicubic, which antialiases when downscaling; the
  paper configs set ``interpolation: bicubic_antialias`` (runtime.preprocess), which
  training, export and the runtime share.
* the residual: none in both, so nothing to choose.

AF-CLIP+ (Eq. 16-18): memory banks of the frozen aggregated features (no adapter, no
projection) of K normal shots, one bank per set; a patch scores ``min_b (1 - cos) / 2``
averaged over the 12 sets; image = max patch + alpha * p_CLS, map = A + beta * P~
(alpha = beta = 0.1), then the same upsampling and smoothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edge_inspect.trainer.backbones.clip import ClipModel
from edge_inspect.trainer.backbones.clip_tokenizer import tokenize
from edge_inspect.trainer.heads.base import AnomalyHead, BankMemory
from edge_inspect.trainer.memory import nearest_cosine_distance
from edge_inspect.trainer.smoothing import GaussianSmoothing

SEG_GRADIENTS = ("paper", "official")


@dataclass
class AfClipConfig:
    """AF-CLIP hyperparameters; defaults are the paper's (ViT-L/14@336 at 518)."""

    taps: tuple[int, ...] = (6, 12, 18, 24)
    scales: tuple[int, ...] = (1, 3, 5)
    aggregation_sigma: float = 4.0
    n_ctx: int = 12
    prompts: tuple[str, str] = ("without defect.", "with defect.")
    adapter_heads: int = 8
    adapter_dim: int | None = None  # None: width // 2 (512 for ViT-L)
    temperature: float = 0.07
    focal_gamma: float = 4.0
    lambda_seg: float = 1.0
    lambda_align: float = 1.0
    map_sigma: float = 4.0
    alpha: float = 0.1
    beta: float = 0.1
    seg_gradient: str = "paper"  # "official": the official code's segmentation-loss gradient

    def __post_init__(self) -> None:
        if self.seg_gradient not in SEG_GRADIENTS:
            raise ValueError(f"seg_gradient {self.seg_gradient!r} unknown; choose one of "
                             f"{SEG_GRADIENTS}")


class GaussianAggregation(nn.Module):
    """Eq. 5: Gaussian-weighted r x r neighbourhood mean of the patch grid, per scale."""

    def __init__(self, scales: tuple[int, ...], sigma: float) -> None:
        super().__init__()
        for r in scales:
            if r < 1 or r % 2 == 0:
                raise ValueError(f"aggregation window sizes must be odd and >= 1, got {r}")
        self.scales = tuple(scales)
        for r in self.scales:
            if r > 1:
                x = torch.arange(r, dtype=torch.float64) - r // 2
                g = torch.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma**2))
                self.register_buffer(f"kernel_{r}", (g / g.sum()).float().view(1, 1, r, r),
                                     persistent=False)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> list[torch.Tensor]:
        """``(B, 1 + N, C)`` -> one ``(B, 1 + N, C)`` per scale (CLS unchanged)."""
        b, _, c = tokens.shape
        rows, cols = grid
        cls, patches = tokens[:, :1], tokens[:, 1:]
        planes = patches.transpose(1, 2).reshape(b * c, 1, rows, cols)
        out = []
        for r in self.scales:
            if r == 1:
                out.append(tokens)
                continue
            k = getattr(self, f"kernel_{r}").to(tokens.dtype)
            agg = F.conv2d(planes, k, padding=r // 2).reshape(b, c, rows * cols).transpose(1, 2)
            out.append(torch.cat([cls, agg], dim=1))
        return out


class AttentionAdapter(nn.Module):
    """Eq. 3-4: ``Attention(aW_Q, aW_K, aW_V) W_O`` after a LayerNorm, no residual."""

    def __init__(self, width: int, inner: int, heads: int) -> None:
        super().__init__()
        if inner % heads:
            raise ValueError(f"adapter width {inner} is not divisible by {heads} heads")
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.q = nn.Linear(width, inner, bias=False)
        self.k = nn.Linear(width, inner, bias=False)
        self.v = nn.Linear(width, inner, bias=False)
        self.out = nn.Linear(inner, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        x = self.norm(x)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, n, self.heads, -1).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        attn = torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
        return self.out((attn @ v).transpose(1, 2).reshape(b, n, -1))


class AfClipHead(BankMemory, AnomalyHead):
    """AF-CLIP (zero-shot) and AF-CLIP+ (after :meth:`enroll`) on a frozen CLIP."""

    method = "afclip"
    memory_name = "AF-CLIP+"

    def __init__(self, clip: ClipModel, cfg: AfClipConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or AfClipConfig()
        self.clip = clip.eval().requires_grad_(False)
        self.backbone = clip.visual
        self.backbone.check_layers(tuple(cfg.taps))
        width = clip.cfg.width
        self.aggregate = GaussianAggregation(tuple(cfg.scales), cfg.aggregation_sigma)
        self.adapter = AttentionAdapter(width, cfg.adapter_dim or width // 2, cfg.adapter_heads)
        self.prompt_context = nn.Parameter(0.01 * torch.randn(cfg.n_ctx, clip.cfg.text_width))
        self.register_buffer("prompt_tokens", tokenize(list(cfg.prompts), clip.cfg.context_length),
                             persistent=False)
        self.smooth = GaussianSmoothing(cfg.map_sigma)
        self.bank: torch.Tensor | None = None  # (sets, K * N, C) normalized, AF-CLIP+ only
        self._text_cache: torch.Tensor | None = None

    # -- text ------------------------------------------------------------------------------
    def text_features(self) -> torch.Tensor:
        """``(2, E)`` normalized [normal, abnormal] text features (cached outside training)."""
        if self.training or self._text_cache is None:
            t = self.clip.encode_text_with_context(self.prompt_tokens, self.prompt_context,
                                                   "before_sot")
            t = F.normalize(t, dim=-1)
            if self.training:
                self._text_cache = None
                return t
            self._text_cache = t.detach()
        return self._text_cache

    def freeze_constants(self) -> None:
        """Cache the two text features: the exported graph holds a 2 x E constant, no text tower."""
        self.eval()
        with torch.no_grad():
            self.text_features()

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_trainable_state(state)
        self._text_cache = None  # the prompt changed

    def train(self, mode: bool = True) -> AfClipHead:
        super().train(mode)
        self.clip.eval()  # the backbone stays frozen (no dropout anyway; LayerNorm only)
        if mode:
            self._text_cache = None  # training changes the prompt; eval keeps a frozen cache
        return self

    # -- vision ----------------------------------------------------------------------------
    def token_sets(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The 12 aggregated frozen token sets ``(B, 1 + N, C)`` (tap-major, then scale)."""
        return self.sets_from_taps(self.backbone.forward_taps(images, tuple(self.cfg.taps)))

    def sets_from_taps(self, taps: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """The 12 token sets from the raw taps (what training caches: 3x smaller)."""
        sets = []
        for k in self.cfg.taps:
            sets += self.aggregate(taps[k], self.backbone.grid)
        return sets

    def probabilities(self, sets: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 7-10: per-token p_abnormal ``(B, 1 + N)`` and projected features ``(S, B, 1+N, E)``."""
        s, b = len(sets), sets[0].shape[0]
        stacked = torch.cat(sets, dim=0)  # sets stacked along the batch for the one adapter
        z = F.normalize(self.backbone.project(self.adapter(stacked)), dim=-1)
        logits = (z @ self.text_features().T).float() / self.cfg.temperature  # (S*B, 1+N, 2)
        logits = logits.reshape(s, b, *logits.shape[1:]).sum(0)  # fp32 under autocast
        return torch.softmax(logits, dim=-1)[..., 1], z.reshape(s, b, *z.shape[1:])

    def _to_image(self, grid_map: torch.Tensor) -> torch.Tensor:
        """``(B, rows*cols)`` -> ``(B, H, W)``: bilinear upsampling, then smoothing."""
        rows, cols = self.backbone.grid
        up = F.interpolate(grid_map.reshape(-1, 1, rows, cols), size=self.backbone.input_size,
                           mode="bilinear", align_corners=False)
        return self.smooth(up.squeeze(1))

    def forward_with_features(self, images: torch.Tensor):
        """Scores, maps, and the frozen aggregated patch sets ``features (S, B, N, C)`` that
        AF-CLIP+ enrollment stores (normalized) as its memory."""
        sets = self.token_sets(images)
        p, _ = self.probabilities(sets)
        p_cls, p_map = p[:, 0], p[:, 1:]
        features = {"features": torch.stack([s[:, 1:] for s in sets])}
        if self.bank is not None:
            a = self.memory_scores(sets)
            score, grid_map = a.amax(dim=1) + self.cfg.alpha * p_cls, a + self.cfg.beta * p_map
        else:
            score, grid_map = p_cls, p_map
        return score, self._to_image(grid_map), features

    # -- few-shot memory (AF-CLIP+) --------------------------------------------------------
    def enroll(self, shots: torch.Tensor) -> None:
        with torch.no_grad():
            sets = self.token_sets(shots)
        self.set_bank([x[:, 1:] for x in sets])

    def memory_sets(self) -> int:
        return len(self.cfg.taps) * len(self.cfg.scales)

    def memory_scores(self, sets: list[torch.Tensor]) -> torch.Tensor:
        """Eq. 17 averaged over the sets: ``(B, N)``; one matmul per set against its bank."""
        scores = [nearest_cosine_distance(s[:, 1:], self.bank[i]) for i, s in enumerate(sets)]
        return torch.stack(scores).mean(0)
