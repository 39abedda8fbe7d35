"""IIPAD's guidance losses (seeds/IIPAD.txt section 3.2, Eq. 6-12), batched over images.

``<a, b>`` is cosine similarity divided by a temperature ``tau``; the head trains with
``tau = 1`` (``head.loss_temperature``): the formulas as printed, and the official code's
losses use plain cosines too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarities of ``(B, n, D)`` and ``(B, k, D)``: ``(B, n, k)``."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(1, 2)


def semantic_alignment(patches: torch.Tensor, toward: torch.Tensor, away: torch.Tensor,
                       tau: float) -> torch.Tensor:
    """Eq. 6 / 9: ``-log softmax`` of each patch over (toward, away), averaged over patches.

    ``patches (B, R, D)``; ``toward, away (B, D)``: e^n, e^a for normal patches (Eq. 6, whose
    denominator prints e^n twice, a typo for e^n + e^a), e^a, e^n for synthetic ones (Eq. 9).
    Returns ``(B,)``.
    """
    logits = _cos(patches, torch.stack([toward, away], dim=1)) / tau  # (B, R, 2)
    return -logits.log_softmax(dim=-1)[..., 0].mean(dim=1)


def token_alignment(tokens: torch.Tensor, patches: torch.Tensor, sparsity: float,
                    tau: float) -> torch.Tensor:
    """Eq. 7 / 10: each prompt token against the patches it is most similar to.

    ``M = <p_t, v_r>`` (T' x R) is min-max normalised over patches, entries below
    ``sparsity`` (1/256) are zeroed, and the kept weights, normalised to sum 1 per token,
    pool the patches into ``v~_t``. (The paper prints the sum of the raw M as the divisor,
    which can be near zero or negative for cosines; the official code divides by the sum of
    the kept weights, as here.)
    The loss is the symmetric InfoNCE of ``p_t`` and ``v~_t`` over the T' tokens.
    ``tokens (B, T', D)``, ``patches (B, R, D)``; returns ``(B,)``.
    """
    m = _cos(tokens, patches)
    lo, hi = m.amin(dim=-1, keepdim=True), m.amax(dim=-1, keepdim=True)
    m_hat = (m - lo) / (hi - lo).clamp_min(1e-8)
    kept = torch.where(m_hat >= sparsity, m_hat, torch.zeros_like(m_hat))
    weights = kept / kept.sum(dim=-1, keepdim=True).clamp_min(1e-8)
    pooled = weights @ patches  # (B, T', D)
    s = _cos(tokens, pooled) / tau  # s[t, k] = <p_t, v~_k>
    target = torch.arange(s.shape[1], device=s.device).expand(s.shape[0], -1)
    forward = F.cross_entropy(s.transpose(1, 2), target, reduction="none").mean(dim=1)
    backward = F.cross_entropy(s, target, reduction="none").mean(dim=1)  # rows of s^T
    return forward + backward


def synthetic_anomalous(patches: list[torch.Tensor], noise_std: float = 1.0,
                        generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Eq. 8: ``F^a_j = Normalize(F_j + F_j' + eps)``, ``j'`` the tap before ``j``.

    The first tap has no tap before it; it pairs with the last (the cyclic choice, as the
    code's ``[l - 1]`` indexing would). ``eps ~ N(0, noise_std^2)`` (the paper: 1).
    """
    out = []
    for j, f in enumerate(patches):
        eps = torch.randn(f.shape, generator=generator, device=f.device, dtype=f.dtype) * noise_std
        out.append(F.normalize(f + patches[j - 1] + eps, dim=-1))
    return out


def textual_guidance(e_normal: torch.Tensor, e_abnormal: torch.Tensor, t_normal: torch.Tensor,
                     t_abnormal: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 11: each manual prompt prefers its own state's generated prompt.

    ``e_* (B, D)``; ``t_normal (P_n, D)``, ``t_abnormal (P_a, D)`` (the manual prompts'
    text features). Returns ``(B,)``: the two expectations summed.
    """
    e = torch.stack([e_normal, e_abnormal], dim=1)  # (B, 2, D)
    loss = 0.0
    for t, own in ((t_normal, 0), (t_abnormal, 1)):
        logits = _cos(t.expand(e.shape[0], -1, -1), e) / tau  # (B, P, 2)
        loss = loss - logits.log_softmax(dim=-1)[..., own].mean(dim=1)
    return loss
