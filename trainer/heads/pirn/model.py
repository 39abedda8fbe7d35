"""PIRN: prototypical intra-modal reconstruction with normality communication (RGB + 3D).

``../shared/seeds/PIRN.txt`` (ICLR 2026 submission; the authors' code is not public, so
everything below follows the paper's text, and every number it does not give is a choice
named here and exposed in :class:`PirnConfig`).

Encoders (Sec. 3.1, Implementation Details): two frozen DINOv2 ViT-B/14, one for RGB and
one for the surface-normal image (separate instances of the same checkpoint by default;
``share_encoder`` uses one), at 224 px; the patch tokens of blocks 2-10 (1-indexed) are
averaged into one map per modality, ``E`` ``(B, N, C)``. The normals image is computed in
the graph from the raw 3D plane (:class:`trainer.geometry.SurfaceNormals`, ``(n + 1) / 2``)
and normalized like an RGB image.

Decoder: ``layers`` prototype-aware layers (2 few-shot, 8 all-shot). A codebook of ``K``
prototypes per modality (``prototypes``; our choice 16, init ``N(0, 1)`` as INP-Former's
INPs). Layer ``l`` takes tokens ``Z`` (``E`` for the first layer, the previous layer's
``Z_rec`` after) and the prototypes ``P`` (the codebook for the first layer, the previous
layer's refined ones after), per modality:

1. **APR** (Sec. 3.3): an OT plan ``Gamma`` between tokens and prototypes (cost
   ``1 - cos``), context ``c_k = sum_n Gamma_nk z_n / sum_n Gamma_nk`` (Eq. 3), then
   ``p'_k = GRUCell(c_k, hidden=p_k)``. ``apr: mean`` (Table 4's global averaging) uses the
   mean token as every context; ``apr: none`` keeps ``P``.
2. **BPA** (Sec. 3.2): balanced OT between tokens and ``P'`` (Eq. 1: rows sum to ``1/N``,
   columns to ``1/K``) by ``sinkhorn_iters`` log-domain Sinkhorn iterations at entropy
   ``sinkhorn_eps`` (our choices 0.05, SwAV's, and 50; the last iteration fixes the column
   sums exactly). Iterations matter because the rows are renormalized below: on clustered
   tokens (8 clusters, 16 prototypes) SwAV's 3 iterations left row sums of 0.5-1.5 / N and,
   after renormalizing, prototype shares of 0.67-2.0x the fair one; 50 iterations give
   0.99-1.02x (``tests/trainer/test_pirn_model.py``), at ``N K`` cost each. Reconstruction
   ``z_bpa_n = sum_k T_nk p'_k`` (Eq. 2) with the plan's rows renormalized to sum to 1: as
   printed, rows of ``1/N`` would shrink ``Z_bpa`` ``N`` times against ``Z_mnc`` in
   ``Z_rec = Z_bpa + Z_mnc``; a barycentric projection is what "projects the tokens onto the
   prototype space" means. ``assignment: softmax`` (Table 3's softmax attention, the "no
   BPA" ablation) uses ``softmax(cos / sinkhorn_eps)`` over prototypes instead.
3. **MNC** (Sec. 3.4), with both modalities: stage 1, a graph over the ``2K`` refined
   prototypes, each joined to its ``knn`` nearest (cosine) prototypes of the other
   modality and to itself, and one multi-head GAT layer (``gat_heads``; our choices 4
   and 4): ``alpha_ij = softmax_j LeakyReLU_0.2(a_h . [W_h p_i || W_h p_j])`` over the
   edges, ``P'' = P' + W_o concat_h(sum_j alpha_ij W_h p_j)`` (residual and output
   projection, so the aligned prototypes stay in the token space; GAT's ELU dropped for
   the same reason). Stage 2, purified queries ``Z' = z * sigmoid(z_bpa)`` attend to the
   other modality's ``P''`` (Eq. 4: one head, ``softmax(Z' W_Q (P'' W_K)^T / sqrt(C)) P''
   W_V``) through a tanh gate, ``Z_mnc = Z' + tanh(gamma) CA`` (Eq. 5; ``gamma`` starts at
   0, our choice, so cross-modal flow is learned from nothing). ``Z_rec = Z_bpa + Z_mnc``.
   ``mnc: false`` (the ablation) or a single modality gives ``Z_rec = Z_bpa``.

Score: per modality ``d_n = 1 - cos(E_n, Z_rec_n)`` after the last layer, upsampled
bilinearly to the input size, summed over modalities, smoothed with a Gaussian
(``smoothing_sigma``; the paper gives none: our choice sigma 4 with scipy's 4-sigma
truncation, as AF-CLIP's maps; INP-Former uses a 5x5 kernel at sigma 4, a weaker blur); the
image score is the map's maximum.

APR runs at inference too: each input refines the codebook from its own tokens (stateless,
as the paper trains and tests). The carried mode (opt-in, ``edge-inspect export
--carry-state``; not in the paper) makes the last layer's refined prototypes of a frame the
next frame's starting prototypes (the first layer's ``P``, in place of the codebook), per
camera: :meth:`PirnHead.forward_carried` with the state ``(B, modalities, K, C)``, the
codebook being its initial value. The runtime carries it only from frames scored normal
(bundle state ``gate: normal``), so a defect cannot become part of the normality the next
frames are reconstructed from, and resets it on reload, a sequence restart and a command.
A decoder trained from its codebook alone does not work from carried prototypes, and one
trained for it (``carried_training: true``: each training step also reconstructs the batch
from prototypes carried through 1-3 other shots, without gradient, and averages the two
losses) scores normal frames low again but no longer tells defects apart. Measured on a
stream of 90 generated scenes (``benchmarks/pirn_carried_state.py``, tiny config):

============================  ==========  ============  ==========  ===========
trained / scored              mean normal false alarms  AUROC dent  AUROC stain
============================  ==========  ============  ==========  ===========
codebook only / stateless     0.0068      7 %           0.872       1.000
codebook only / carried       0.380       97 %          0.640       0.584
carried starts / stateless    0.0079      3 %           0.887       1.000
carried starts / carried      0.0109      27 %          0.482       0.540
============================  ==========  ============  ==========  ===========

So the carried mode exists for the state contract and for lines that want to measure it on
their own data; stateless (the paper's) is the default, and export refuses
``--carry-state`` for a head trained without ``carried_training``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edge_inspect.trainer.backbones.base import Backbone
from edge_inspect.trainer.geometry import SurfaceNormals
from edge_inspect.trainer.heads.base import AnomalyHead
from edge_inspect.trainer.smoothing import GaussianSmoothing

ASSIGNMENTS = ("ot", "softmax")
APR_MODES = ("ot", "mean", "none")
MODALITIES = ("rgb", "normals")


@dataclass
class PirnConfig:
    """The paper's settings; ``prototypes``, Sinkhorn, GAT, smoothing and the normals fill
    are our choices (module docstring)."""

    modalities: tuple[str, ...] = MODALITIES
    taps: tuple[int, ...] = tuple(range(2, 11))
    layers: int = 2
    prototypes: int = 16
    sinkhorn_eps: float = 0.05
    sinkhorn_iters: int = 50
    gat_heads: int = 4
    knn: int = 4
    assignment: str = "ot"
    apr: str = "ot"
    mnc: bool = True
    smoothing_sigma: float = 4.0
    share_encoder: bool = False
    geometry: str = "xyz"  # the raw 3D plane: xyz or depth (with intrinsics)
    intrinsics: tuple[float, float, float, float] | None = None
    background_plane: bool = False
    fill_invalid: int = 0  # passes filling invalid normals from valid neighbours (geometry.py)
    carried_training: bool = False  # also train from carried prototypes (the carried mode)

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        bad = set(self.modalities) - set(MODALITIES)
        if not self.modalities or bad or "rgb" not in self.modalities:
            raise ValueError(f"head.modalities {list(self.modalities)}: rgb and optionally normals "
                             f"({list(MODALITIES)})")
        if self.assignment not in ASSIGNMENTS:
            raise ValueError(f"head.assignment {self.assignment!r} unknown; choose one of {ASSIGNMENTS}")
        if self.apr not in APR_MODES:
            raise ValueError(f"head.apr {self.apr!r} unknown; choose one of {APR_MODES}")
        if self.layers < 1 or self.prototypes < 2 or self.sinkhorn_iters < 1 or self.sinkhorn_eps <= 0:
            raise ValueError("head.layers >= 1, head.prototypes >= 2, head.sinkhorn_iters >= 1 and "
                             f"head.sinkhorn_eps > 0 needed, got {self.layers}, {self.prototypes}, "
                             f"{self.sinkhorn_iters}, {self.sinkhorn_eps}")
        if not 1 <= self.knn <= self.prototypes:
            raise ValueError(f"head.knn must be in 1..head.prototypes ({self.prototypes}), got {self.knn}")


def cosine_cost(tokens: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``(B, N, C)``, ``(B, K, C)`` -> ``(B, N, K)`` cosine distance ``1 - cos``."""
    return 1.0 - F.normalize(tokens, dim=-1) @ F.normalize(prototypes, dim=-1).transpose(1, 2)


def sinkhorn(cost: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """Balanced entropic OT plan ``(B, N, K)`` with rows summing to ``1/N`` and columns to
    ``1/K`` (Eq. 1), by ``iters`` log-domain Sinkhorn iterations; the last one fixes the
    columns exactly. Fixed iterations of plain ops, so it exports to ONNX."""
    _, n, k = cost.shape
    log_kernel = -cost / eps
    log_a, log_b = -math.log(n), -math.log(k)
    g = torch.zeros_like(cost[:, :1, :])
    for _ in range(iters):
        f = log_a - torch.logsumexp(log_kernel + g, dim=2, keepdim=True)
        g = log_b - torch.logsumexp(log_kernel + f, dim=1, keepdim=True)
    return torch.exp(log_kernel + f + g)


class GraphAttention(nn.Module):
    """One multi-head GAT layer over a masked, dense graph, residual (MNC stage 1)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"head.gat_heads = {heads} must divide the feature width {dim}")
        self.heads, self.head_dim = heads, dim // heads
        self.w = nn.Linear(dim, dim, bias=False)
        self.a_src = nn.Parameter(torch.randn(heads, self.head_dim) * self.head_dim ** -0.5)
        self.a_dst = nn.Parameter(torch.randn(heads, self.head_dim) * self.head_dim ** -0.5)
        self.out = nn.Linear(dim, dim)

    def forward(self, nodes: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        """``nodes (B, M, C)``, ``edges (B, M, M)`` bool (i attends to j) -> ``(B, M, C)``."""
        b, m, _ = nodes.shape
        h = self.w(nodes).reshape(b, m, self.heads, self.head_dim).transpose(1, 2)  # (B, H, M, d)
        src = (h * self.a_src[None, :, None]).sum(-1)  # (B, H, M)
        dst = (h * self.a_dst[None, :, None]).sum(-1)
        logits = F.leaky_relu(src[..., :, None] + dst[..., None, :], 0.2)
        logits = logits.masked_fill(~edges[:, None], float("-inf"))
        agg = torch.softmax(logits, dim=-1) @ h  # (B, H, M, d)
        return nodes + self.out(agg.transpose(1, 2).reshape(b, m, -1))


def cross_modal_edges(rgb: torch.Tensor, other: torch.Tensor, knn: int) -> torch.Tensor:
    """``(B, 2K, 2K)`` edges: self-loops, and each prototype to its ``knn`` most similar
    prototypes of the other modality (cosine of L2-normalized prototypes)."""
    b, k, _ = rgb.shape
    sim = F.normalize(rgb, dim=-1) @ F.normalize(other, dim=-1).transpose(1, 2)  # (B, K, K)
    # at least the knn-th largest similarity (a comparison, not a scatter: it exports)
    rows = sim >= sim.topk(knn, dim=2).values[..., -1:]
    simt = sim.transpose(1, 2)
    cols = simt >= simt.topk(knn, dim=2).values[..., -1:]
    idx = torch.arange(k, device=rgb.device)
    eye = (idx[:, None] == idx[None, :]).expand(b, k, k)  # (ONNX Runtime has no bool EyeLike)
    top = torch.cat([eye, rows], dim=2)
    bottom = torch.cat([cols, eye], dim=2)
    return torch.cat([top, bottom], dim=1)


class CrossAttention(nn.Module):
    """Eq. 4-5: purified tokens attend to the other modality's prototypes, tanh-gated."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, queries: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        scale = queries.shape[-1] ** -0.5
        attn = torch.softmax(self.q(queries) @ self.k(prototypes).transpose(1, 2) * scale, dim=-1)
        return queries + torch.tanh(self.gamma) * (attn @ self.v(prototypes))


class DecoderLayer(nn.Module):
    """APR -> BPA -> MNC for every modality (see the module docstring)."""

    def __init__(self, cfg: PirnConfig, dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.gru = nn.ModuleDict({m: nn.GRUCell(dim, dim) for m in cfg.modalities})
        self.cross = len(cfg.modalities) == 2 and cfg.mnc
        if self.cross:
            self.gat = GraphAttention(dim, cfg.gat_heads)
            self.attend = nn.ModuleDict({m: CrossAttention(dim) for m in cfg.modalities})

    def refine(self, tokens: torch.Tensor, prototypes: torch.Tensor, modality: str) -> torch.Tensor:
        """APR: the GRU update of each prototype from its OT context (Eq. 3)."""
        if self.cfg.apr == "none":
            return prototypes
        b, k, c = prototypes.shape
        if self.cfg.apr == "mean":
            context = tokens.mean(dim=1, keepdim=True).expand(b, k, c)
        else:
            plan = sinkhorn(cosine_cost(tokens, prototypes), self.cfg.sinkhorn_eps, self.cfg.sinkhorn_iters)
            context = plan.transpose(1, 2) @ tokens / plan.sum(dim=1)[..., None]
        return self.gru[modality](context.reshape(b * k, c), prototypes.reshape(b * k, c)).reshape(b, k, c)

    def assign(self, tokens: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """BPA weights ``(B, N, K)``, rows summing to 1."""
        cost = cosine_cost(tokens, prototypes)
        if self.cfg.assignment == "softmax":
            return torch.softmax(-cost / self.cfg.sinkhorn_eps, dim=2)
        plan = sinkhorn(cost, self.cfg.sinkhorn_eps, self.cfg.sinkhorn_iters)
        return plan / plan.sum(dim=2, keepdim=True)

    def forward(self, tokens: dict[str, torch.Tensor], prototypes: dict[str, torch.Tensor]):
        refined = {m: self.refine(tokens[m], prototypes[m], m) for m in self.cfg.modalities}
        bpa = {m: self.assign(tokens[m], refined[m]) @ refined[m] for m in self.cfg.modalities}
        if not self.cross:
            return bpa, refined
        rgb, other = self.cfg.modalities
        k = refined[rgb].shape[1]
        nodes = torch.cat([refined[rgb], refined[other]], dim=1)
        aligned = self.gat(nodes, cross_modal_edges(refined[rgb], refined[other], self.cfg.knn))
        aligned = {rgb: aligned[:, :k], other: aligned[:, k:]}
        partner = {rgb: other, other: rgb}
        out = {}
        for m in self.cfg.modalities:
            purified = tokens[m] * torch.sigmoid(bpa[m])
            out[m] = bpa[m] + self.attend[m](purified, aligned[partner[m]])
        return out, refined


class PirnHead(AnomalyHead):
    """Two frozen encoders + the prototype decoder; ``forward(rgb, geometry)`` gives
    ``(image_score (B,), anomaly_map (B, H, W))``.

    ``rgb``: ``(B, 3, H, W)`` normalized as the RGB encoder expects; ``geometry``: the raw
    3D plane (``(B, 3, H, W)`` xyz or ``(B, 1, H, W)`` depth), the head's one further plane
    (:attr:`planes`) when ``modalities`` has normals; none for ``(rgb,)``. Few-shot: the K
    shots train the codebook and decoder (``learns_from_shots``); there is no memory.
    """

    method = "pirn"
    learns_from_shots = True
    carried_state = "prototypes"

    def __init__(self, encoders: dict[str, Backbone], cfg: PirnConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.planes = (cfg.geometry,) if "normals" in cfg.modalities else ()
        missing = set(cfg.modalities) - set(encoders)
        if missing:
            raise ValueError(f"PIRN needs an encoder per modality; missing {sorted(missing)}")
        if cfg.share_encoder and "normals" in cfg.modalities:
            encoders = {m: encoders["rgb"] for m in cfg.modalities}
        self.encoders = nn.ModuleDict({m: encoders[m] for m in cfg.modalities})
        first = self.encoders["rgb"]
        for m, enc in self.encoders.items():
            enc.check_layers(cfg.taps)
            enc.requires_grad_(False)
            if enc.grid != first.grid or enc.tap_dim(cfg.taps[0]) != first.tap_dim(cfg.taps[0]):
                raise ValueError(f"the {m} encoder's grid {enc.grid} / width differ from the rgb "
                                 f"encoder's {first.grid}; use the same architecture and input size")
        dim = first.tap_dim(cfg.taps[0])
        self.dim, self.backbone = dim, first
        self.codebook = nn.ParameterDict({m: nn.Parameter(torch.randn(cfg.prototypes, dim))
                                          for m in cfg.modalities})
        self.layers = nn.ModuleList([DecoderLayer(cfg, dim) for _ in range(cfg.layers)])
        if "normals" in cfg.modalities:
            self.normals = SurfaceNormals(cfg.geometry, cfg.intrinsics, cfg.background_plane,
                                          fill_invalid=cfg.fill_invalid)
            norm = self.encoders["normals"].normalization
            mean, std = norm.mean, norm.std
            self.register_buffer("normals_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("normals_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.smooth = GaussianSmoothing(cfg.smoothing_sigma)

    def encode(self, rgb: torch.Tensor, geometry: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``E`` per modality: the mean of the tapped blocks' patch tokens ``(B, N, C)``."""
        inputs = {"rgb": rgb}
        if "normals" in self.cfg.modalities:
            if geometry is None:
                raise ValueError("PIRN with normals needs the 3D plane (xyz or depth)")
            image = self.normals(geometry)
            inputs["normals"] = (image - self.normals_mean) / self.normals_std
        out = {}
        with torch.no_grad():
            for m in self.cfg.modalities:
                taps = self.encoders[m].forward_taps(inputs[m], self.cfg.taps)
                out[m] = torch.stack([taps[k][:, 1:] for k in self.cfg.taps]).mean(0)
        return out

    def initial_prototypes(self, batch: int) -> dict[str, torch.Tensor]:
        return {m: p[None].expand(batch, -1, -1) for m, p in self.codebook.items()}

    def decode(self, encoded: dict[str, torch.Tensor],
               prototypes: dict[str, torch.Tensor] | None = None):
        """Reconstructions ``Z_rec`` per modality and the last layer's refined prototypes."""
        batch = encoded["rgb"].shape[0]
        protos = prototypes or self.initial_prototypes(batch)
        z = dict(encoded)
        for layer in self.layers:
            z, protos = layer(z, protos)
        return z, protos

    def patch_distances(self, encoded, reconstructed) -> torch.Tensor:
        """``(B, N)`` the sum over modalities of ``1 - cos(E_n, Z_rec_n)``."""
        return sum(1.0 - F.cosine_similarity(encoded[m], reconstructed[m], dim=-1)
                   for m in self.cfg.modalities)

    def to_map(self, encoded, reconstructed, size: tuple[int, int]) -> torch.Tensor:
        """The fused map: bilinear upsampling is linear, so upsampling the summed distances
        once equals summing each modality's upsampled map."""
        rows, cols = self.backbone.grid
        d = self.patch_distances(encoded, reconstructed).reshape(-1, 1, rows, cols)
        return self.smooth(F.interpolate(d, size=size, mode="bilinear", align_corners=False).squeeze(1))

    @torch.no_grad()
    def carried_start(self, encoded: dict[str, torch.Tensor], hops: int) -> dict[str, torch.Tensor]:
        """Starting prototypes as the runtime would carry them to each image of the batch:
        the codebook refined by the ``hops`` images before it in the batch, oldest first, as
        frames of a stream would refine it (carried_training)."""
        batch = encoded["rgb"].shape[0]
        protos = self.initial_prototypes(batch)
        for hop in range(min(hops, batch - 1), 0, -1):  # never an image's own tokens
            _, protos = self.decode({m: e.roll(hop, dims=0) for m, e in encoded.items()}, protos)
        return protos

    def forward_with_state(self, rgb: torch.Tensor, geometry: torch.Tensor | None,
                           prototypes: dict[str, torch.Tensor] | None = None):
        """Score, map and the refined prototypes (the carried state)."""
        encoded = self.encode(rgb, geometry)
        reconstructed, refined = self.decode(encoded, prototypes)
        amap = self.to_map(encoded, reconstructed, tuple(rgb.shape[-2:]))
        return amap.flatten(1).amax(dim=1), amap, refined

    def _geometry(self, planes: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
        if len(planes) != len(self.planes):
            raise ValueError(f"PIRN with modalities {list(self.cfg.modalities)} takes the planes "
                             f"{list(self.planes)} after the RGB image, got {len(planes)}")
        return planes[0] if planes else None

    def forward_with_features(self, rgb: torch.Tensor, *planes: torch.Tensor):
        """Score and map; no memory features (the shots trained the head)."""
        score, amap, _ = self.forward_with_state(rgb, self._geometry(planes))
        return score, amap, {}

    def initial_state(self) -> torch.Tensor:
        """The codebook ``(modalities, K, C)``: where every camera's carried prototypes start."""
        return torch.stack([self.codebook[m] for m in self.cfg.modalities]).detach()

    def forward_carried(self, rgb: torch.Tensor, *planes: torch.Tensor, state: torch.Tensor):
        """Score, map and the refined prototypes ``(B, modalities, K, C)``, starting from
        ``state`` (the previous normal frame's refined prototypes, or :meth:`initial_state`)."""
        start = {m: state[:, i] for i, m in enumerate(self.cfg.modalities)}
        score, amap, refined = self.forward_with_state(rgb, self._geometry(planes), start)
        return score, amap, torch.stack([refined[m] for m in self.cfg.modalities], dim=1)
