"""Teacher side of the soft losses: top-k log-probabilities to target weights (docs/losses.md, "Teacher bins").

Pure functions over ``[N, K]`` tensors; nothing here touches the vocabulary dimension.
"""

from __future__ import annotations

from typing import Literal

import torch

Tail = Literal["none", "renormalize", "tail_bucket", "actual_bin"]
TAILS: tuple[str, ...] = ("none", "renormalize", "tail_bucket", "actual_bin")

SENTINEL_LOGPROB = -9999.0
"""OpenAI's "not returned" log-probability; an entry at or below it carries no teacher token."""


def valid_entries(topk_ids: torch.Tensor, topk_logprobs: torch.Tensor) -> torch.Tensor:
    """Entries that carry a teacher token: id >= 0 and a finite log-probability above ``SENTINEL_LOGPROB``.

    -1 / -inf pad a varying k; an entry with a real id and the -9999 sentinel (as OpenAI sends) is padding too.
    """
    return (topk_ids >= 0) & torch.isfinite(topk_logprobs) & (topk_logprobs > SENTINEL_LOGPROB)


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


def check_unique_ids(ids: torch.Tensor, what: str) -> None:
    """Raise if a row of ``ids`` [N, K] repeats an id >= 0 (one host synchronisation)."""
    ordered = ids.sort(dim=-1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if bool(repeated.any()):
        row = int(repeated.any(-1).nonzero()[0, 0])
        raise ValueError(
            f"{what} repeats an id within position {row} ({ids[row].tolist()}); teacher ids mapping to one "
            "student id must be merged upstream (log-sum-exp of their log-probs, sum of their weights)"
        )


def tempered_targets(
    logp: torch.Tensor, valid: torch.Tensor, tail: Tail, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-CE target weights ``w~`` [N,K] and tail weight ``r~`` [N] (0 unless ``tail_bucket``).

    The teacher's k+1 bins ``(p_1..p_k, r)`` are tempered as a distribution: ``p~ ∝ p^(1/τ)``, ``r~ ∝ r^(1/τ)``,
    normalised over the k+1 bins (``none``, ``tail_bucket``) or over the k top-k bins only (``renormalize``).
    At τ = 1 this is ``w_j = p_j`` (``none``/``tail_bucket``, W <= 1) and ``w_j = p_j / W`` (``renormalize``).
    Rows without any valid entry get weight 0 everywhere (and r~ = 1 for ``tail_bucket``). ``actual_bin``
    tempers like ``tail_bucket``: call it on the bins of ``actual_bin_entries``.
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


def actual_bin_entries(
    topk_ids: torch.Tensor,
    logp: torch.Tensor,
    valid: torch.Tensor,
    labels: torch.Tensor,
    actual: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The actual token's bin for ``tail = "actual_bin"``: id [N] (-1 where none), log-probability [N] and the
    extended bins ``logp`` [N, K+1] / ``valid`` [N, K+1] to temper (docs/losses.md "Actual-token bin").

    A row gets the bin when its label is not among its valid top-k ids and the teacher's log-probability
    ``actual`` [N] of the label is known (finite, above the sentinel). The bin's mass is ``min(exp(l_y), r)``:
    in exact arithmetic a token outside the top-k has ``p_y <= r``; the cap keeps rounding from giving the
    rest a negative mass. The rest of the tail, ``r − p_y``, is what ``tempered_targets`` computes as the
    residual of the k+1 entries.
    """
    in_topk = ((topk_ids == labels.unsqueeze(-1)) & valid).any(-1)
    known = torch.isfinite(actual) & (actual > SENTINEL_LOGPROB)
    active = known & ~in_topk & (labels >= 0)
    _, r = teacher_bins(logp, valid)
    log_r = torch.where(r > 0, r.log(), torch.full_like(r, float("-inf")))
    log_y = torch.minimum(actual.to(logp.dtype), log_r)
    active = active & torch.isfinite(log_y)
    log_y = torch.where(active, log_y, torch.full_like(log_y, float("-inf")))
    ids = torch.where(active, labels, torch.full_like(labels, -1))
    return ids, torch.cat([logp, log_y.unsqueeze(-1)], -1), torch.cat([valid, active.unsqueeze(-1)], -1)


def sampled_targets(
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_ids: torch.Tensor,
    tail_counts: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbiased sparse targets for ``kind = "sampled"`` (docs/losses.md "Sampled targets"): ids and weights.

    ``topk_ids``/``topk_logprobs`` [..., K]: the teacher's exact head (K may be 0); ``tail_ids``/``tail_counts``
    [..., M]: the distinct ids drawn, with replacement, ``S = Σ counts`` times from the teacher's distribution
    restricted to outside the head, and how often each was drawn (-1 / 0 padding). Returns ``ids`` int64
    [..., K+M] (-1 pad) and ``weights`` [..., K+M] (computed in float64, returned in ``dtype``): ``p_j`` at the head, ``r·count/S`` at the samples
    (``r = 1 − Σ_j p_j``). For every token v, E[weight of v] = p_v, so the soft CE against the weights is an
    unbiased estimate of the full-distribution CE. With K = 0 these are plain i.i.d. samples, weight count/S.

    The weights are divided by their sum, which is 1 except for rounding (a decoded head mass above 1) and for a
    position with a head but no draws (S = 0): its head is renormalised (``p_j / W``, biased: the only choice
    without samples). A position with neither gets no targets (all -1 / 0), as does any entry of weight 0. A
    sampled id inside the head is an error (the draws exclude the head), as is a negative count. The reader's
    compiled ``storage.kernels.sample_targets`` computes the same (tested against this).
    """
    lead = topk_ids.shape[:-1]
    if (
        tail_ids.shape != tail_counts.shape
        or tail_ids.shape[:-1] != lead
        or topk_logprobs.shape != topk_ids.shape
    ):
        raise ValueError(
            f"sampled_targets: expected topk_ids/topk_logprobs [..., K] and tail_ids/tail_counts [..., M] with "
            f"the same leading dims; got {tuple(topk_ids.shape)}, {tuple(topk_logprobs.shape)}, "
            f"{tuple(tail_ids.shape)}, {tuple(tail_counts.shape)}"
        )
    rows = lead.numel()
    head_ids = topk_ids.reshape(rows, topk_ids.shape[-1]).long()
    head_lp = topk_logprobs.reshape(head_ids.shape).double()
    ids = tail_ids.reshape(rows, tail_ids.shape[-1]).long()
    counts = tail_counts.reshape(ids.shape).double()
    if bool((counts < 0).any()):
        raise ValueError("sampled_targets: tail_counts must be >= 0")
    drawn = (ids >= 0) & (counts > 0)
    valid = valid_entries(head_ids, head_lp)
    inside = ((ids.unsqueeze(-1) == head_ids.unsqueeze(-2)) & valid.unsqueeze(-2)).any(-1) & drawn
    if bool(inside.any()):
        row = int(inside.any(-1).nonzero()[0, 0])
        raise ValueError(
            f"sampled_targets: position {row} has a tail sample inside its top-k ({ids[row].tolist()} vs "
            f"{head_ids[row].tolist()}); tail samples are drawn from outside the top-k"
        )
    p, r = teacher_bins(masked_logprobs(head_lp, valid, torch.float64), valid)
    draws = torch.where(drawn, counts, torch.zeros_like(counts)).sum(-1)
    tail_w = torch.where(drawn, r.unsqueeze(-1) * counts / draws.clamp(min=1.0).unsqueeze(-1), 0.0)
    out_ids = torch.cat([torch.where(valid, head_ids, -1), torch.where(drawn, ids, -1)], -1)
    weights = torch.cat([p, tail_w], -1)
    total = weights.sum(-1, keepdim=True)
    weights = weights / torch.where(total > 0, total, torch.ones_like(total))
    out_ids = torch.where(weights > 0, out_ids, -1)
    width = out_ids.shape[-1]
    return out_ids.view(*lead, width), weights.to(dtype).view(*lead, width)
