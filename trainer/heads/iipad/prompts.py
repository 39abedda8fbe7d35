"""IIPAD's instance-induced prompt generator (seeds/IIPAD.txt section 3.1, Eq. 2-4).

For image ``x_i`` with CLIP class token ``g`` (``E_v(x_i)``) and Q-Former category tokens
``Z`` (``M x d``), the normal and abnormal prompts are

    S^n = [P_1 + C^n_1] .. [P_T + C^n_T] [O^n_1] .. [O^n_m]
    S^a = [N_1 + C^a_1] .. [N_T + C^a_T] [O^a_1] .. [O^a_m]
    C^n = f_p(g) + f_n(CA(g, Z W^n, Z W^n)),   C^a = f_p(g) + f_a(CA(g, Z W^a, Z W^a))
    O^n = f_c^n(Z),   O^a = f_c^a(Z)

with learnable prefixes ``P, N`` (``T x d``), T = 24, m = 4 (paper A.1; T' = 28). Choices
where the paper gives no form, each from the official code (research/official_code.md 3c)
unless said otherwise:

* ``f_p, f_n, f_a: R^d -> R^{T x d}``: a two-layer network (Linear, LeakyReLU, Linear; the
  paper's "two-layer neural network") whose output is spread over the T tokens by a scale
  and a bias per token (the code's ``Linear(1 -> 24)``), not a ``d x T d`` matrix;
* ``CA``: single-head scaled dot-product attention with query, key, value and output
  projections, the class token as the one query;
* ``f_c^n, f_c^a``: mix the M query slots down to m (``M -> M/2 -> m``, LeakyReLU), per
  feature (the code's ``Linear 16 -> 8 -> 4``); the Q-Former's tokens are already in the CLIP
  text-input space (BLIP-Diffusion trains them for it), so their width must be the text width;
* prefixes start as N(0, 0.02^2) (our choice; the paper gives no init, the code draws
  N(0, 1): ``prefix_init_std: 1.0``); PyTorch's default init elsewhere (the code uses
  Kaiming); the code's dropout is left out (the paper has none);
* left out of the code's generator, as the paper's Eq. 4 has no place for them: a second
  per-polarity expansion of ``g`` added into ``C`` and a slot-mixing layer inside the ``Z``
  projections. ``g`` enters L2-normalized, as the code feeds it.

Everything is batched over images; the official code's batch-1 ``.T`` logic is not copied.

``condition: class_token`` is the edge variant (no second vision tower per frame): ``Z`` is
one token, a learned projection of ``g``, and the same formulas run with M = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class PromptShape:
    """Sizes: prefix length T, category tokens m, text width d, class-token width, and the
    Q-Former's M slots of ``query_width`` (M = 1 for ``class_token`` conditioning)."""

    prefix: int = 24
    category: int = 4
    width: int = 768
    class_width: int = 768
    slots: int = 16
    query_width: int = 768
    prefix_init_std: float = 0.02

    @property
    def length(self) -> int:
        return self.prefix + self.category


class TokenSpread(nn.Module):
    """``R^d -> R^{T x d}``: a two-layer network, then a scale and bias per token."""

    def __init__(self, d_in: int, width: int, tokens: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, width), nn.LeakyReLU(), nn.Linear(width, width))
        self.scale = nn.Parameter(torch.ones(tokens))
        self.bias = nn.Parameter(torch.zeros(tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, d_in) -> (B, T, width)
        h = self.net(x)
        return h[:, None, :] * self.scale[None, :, None] + self.bias[None, :, None]


class ClassTokenAttention(nn.Module):
    """``CA(g, Z, Z)``: the class token attends over the (projected) category tokens."""

    def __init__(self, class_width: int, width: int) -> None:
        super().__init__()
        self.q = nn.Linear(class_width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.o = nn.Linear(width, width)

    def forward(self, g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # (B, E), (B, M, d) -> (B, d)
        q = self.q(g)[:, None, :]
        att = (q @ self.k(z).transpose(1, 2) * q.shape[-1] ** -0.5).softmax(dim=-1)
        return self.o((att @ self.v(z))[:, 0])


class SlotMix(nn.Module):
    """``f_c: R^{M x d} -> R^{m x d}``: the M slots mixed down to m, per feature."""

    def __init__(self, slots: int, tokens: int) -> None:
        super().__init__()
        hidden = max(1, slots // 2)
        self.net = nn.Sequential(nn.Linear(slots, hidden), nn.LeakyReLU(), nn.Linear(hidden, tokens))

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, M, d) -> (B, m, d)
        return self.net(z.transpose(1, 2)).transpose(1, 2)


class Polarity(nn.Module):
    """What differs between the normal and the abnormal prompt: prefix, W, CA, f, f_c."""

    def __init__(self, s: PromptShape) -> None:
        super().__init__()
        self.prefix = nn.Parameter(s.prefix_init_std * torch.randn(s.prefix, s.width))
        self.z_proj = nn.Linear(s.query_width, s.width)
        self.attention = ClassTokenAttention(s.class_width, s.width)
        self.spread = TokenSpread(s.width, s.width, s.prefix)
        self.category = SlotMix(s.slots, s.category)

    def forward(self, g: torch.Tensor, z: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        c = shared + self.spread(self.attention(g, self.z_proj(z)))
        return torch.cat([self.prefix + c, self.category(z)], dim=1)


class PromptGenerator(nn.Module):
    """``(g (B, E), Z (B, M, d_q)) -> (S^n, S^a)``, each ``(B, T + m, d)``."""

    def __init__(self, shape: PromptShape, condition: str = "qformer") -> None:
        super().__init__()
        if condition not in ("qformer", "class_token"):
            raise ValueError(f"condition must be qformer or class_token, got {condition!r}")
        if condition == "qformer" and shape.query_width != shape.width:
            raise ValueError(f"the Q-Former's tokens ({shape.query_width} wide) must be as wide as "
                             f"the CLIP text input ({shape.width}): IIPAD feeds them to the text encoder")
        self.condition = condition
        if condition == "class_token":
            shape = PromptShape(**{**shape.__dict__, "slots": 1, "query_width": shape.width})
            self.class_to_slot = nn.Linear(shape.class_width, shape.width)
        self.shape = shape
        self.shared = TokenSpread(shape.class_width, shape.width, shape.prefix)  # f_p
        self.normal = Polarity(shape)
        self.abnormal = Polarity(shape)

    def category_tokens(self, g: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """The ``Z`` the prompts are built from (the Q-Former's, or one from ``g``)."""
        if self.condition == "class_token":
            return self.class_to_slot(g)[:, None, :]
        if z is None or z.ndim != 3 or z.shape[1:] != (self.shape.slots, self.shape.query_width):
            raise ValueError(f"category tokens must be (B, {self.shape.slots}, {self.shape.query_width}), "
                             f"got {None if z is None else tuple(z.shape)}")
        return z

    def forward(self, g: torch.Tensor, z: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        g = F.normalize(g, dim=-1)
        z = self.category_tokens(g, z)
        shared = self.shared(g)
        return self.normal(g, z, shared), self.abnormal(g, z, shared)
