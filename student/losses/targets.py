"""Teacher side of the soft losses: top-k log-probabilities to k+1-bin weights (docs/losses.md, "Teacher bins").

Pure functions over ``[N, K]`` tensors; nothing here touches the vocabulary dimension.
"""

from __future__ import annotations

from typing import Literal

import torch

Tail = Literal["none", "renormalize", "tail_bucket"]
TAILS: tuple[str, ...] = ("none", "renormalize", "tail_bucket")


def valid_entries(topk_ids: torch.Tensor, topk_logprobs: torch.Tensor) -> torch.Tensor:
    """Entries that carry a teacher token: id >= 0 and a finite log-probability (-1 / -inf pad a varying k)."""
    return (topk_ids >= 0) & torch.isfinite(topk_logprobs)


def masked_logprobs(topk_logprobs: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Log-probabilities in ``dtype`` with every invalid entry set to -inf."""
    return torch.where(valid, topk_logprobs.to(dtype), torch.tensor(float("-inf"), dtype=dtype))


def teacher_bins(logp: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher weights ``p_j = exp(l_j)`` [N,K] (0 where invalid) and tail mass ``r = 1 - W`` [N].

    ``r = -expm1(logsumexp(l))`` keeps the residual accurate when W is close to 1. A top-k mass above 1 (rounded
    log-probabilities) gives r = 0.
    """
    p = torch.where(valid, logp.exp(), torch.zeros_like(logp))
    r = (-torch.expm1(torch.logsumexp(logp, dim=-1))).clamp(min=0.0)
    return p, r


def tempered_targets(
    logp: torch.Tensor, valid: torch.Tensor, tail: Tail, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-CE target weights ``w~`` [N,K] and tail weight ``r~`` [N] (0 unless ``tail_bucket``).

    The teacher's k+1 bins ``(p_1..p_k, r)`` are tempered as a distribution: ``p~ ∝ p^(1/τ)``, ``r~ ∝ r^(1/τ)``,
    normalised over the k+1 bins (``none``, ``tail_bucket``) or over the k top-k bins only (``renormalize``).
    At τ = 1 this is ``w_j = p_j`` (``none``/``tail_bucket``, W <= 1) and ``w_j = p_j / W`` (``renormalize``).
    Rows without any valid entry get weight 0 everywhere (and r~ = 1 for ``tail_bucket``).
    """
    if tail not in TAILS:
        raise ValueError(f"loss tail must be one of {TAILS}, got {tail!r}")
    _, r = teacher_bins(logp, valid)
    scaled = logp / temperature
    neg_inf = torch.tensor(float("-inf"), dtype=logp.dtype, device=logp.device)
    if tail == "renormalize":
        log_norm = torch.logsumexp(scaled, dim=-1, keepdim=True)
        log_norm = torch.where(torch.isfinite(log_norm), log_norm, torch.zeros_like(log_norm))
        return torch.where(valid, (scaled - log_norm).exp(), torch.zeros_like(logp)), torch.zeros_like(r)
    log_r = torch.where(r > 0, r.log(), neg_inf) / temperature
    log_norm = torch.logsumexp(torch.cat([scaled, log_r.unsqueeze(-1)], dim=-1), dim=-1)
    weights = torch.where(valid, (scaled - log_norm.unsqueeze(-1)).exp(), torch.zeros_like(logp))
    if tail == "none":
        return weights, torch.zeros_like(r)
    return weights, (log_r - log_norm).exp()
