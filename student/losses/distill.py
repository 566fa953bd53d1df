"""The training loss: ``distillation_loss(logits, batch, settings)`` (docs/losses.md "The distillation loss")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from student.losses.hard import hard_cross_entropy
from student.losses.mse import logit_mse
from student.losses.targets import (
    actual_bin_entries,
    check_unique_ids,
    masked_logprobs,
    tempered_targets,
    valid_entries,
)
from student.losses.topk_cross_entropy import CHUNK_ELEMENTS, TopKOutputs, topk_cross_entropy
from student.settings import LossSettings

METRIC_SUMS = ("tokens", "soft_tokens", "hard_ce_sum", "kl_sum", "teacher_entropy_sum", "top1_agree_sum")
"""Summed numerators and counts in the metrics dict: add them over data-parallel ranks, then divide."""

_REQUIRED = ("labels", "loss_mask", "soft_mask", "topk_ids", "topk_logprobs")


def _flat_batch(
    batch: Mapping[str, torch.Tensor], rows: int, settings: LossSettings
) -> dict[str, torch.Tensor]:
    """The batch keys the loss reads (docs/architecture.md), flattened to ``[N]`` / ``[N, K]`` and checked."""
    missing = [key for key in _REQUIRED if key not in batch]
    if settings.kind == "mse" and "topk_logits" not in batch:
        missing.append("topk_logits (kind='mse' needs a teacher that returns raw logits)")
    if settings.kind == "sampled":
        missing += [f"{key} (kind='sampled')" for key in ("sample_ids", "sample_weights") if key not in batch]
    actual_bin = settings.kind == "soft" and settings.tail == "actual_bin"
    if actual_bin and "actual_logprob" not in batch:
        missing.append("actual_logprob (tail='actual_bin'; NaN where the teacher's logprob is unknown)")
    if missing:
        raise KeyError(f"distillation_loss: batch lacks {', '.join(missing)}")
    per_position = ("labels", "loss_mask", "soft_mask") + (("actual_logprob",) if actual_bin else ())
    flat = {key: batch[key].reshape(-1) for key in per_position}
    widths = {"topk_ids": batch["topk_ids"].shape[-1]}
    widths["topk_logprobs"] = widths["topk_logits"] = widths["topk_ids"]
    if settings.kind == "sampled":
        widths["sample_ids"] = widths["sample_weights"] = batch["sample_ids"].shape[-1]
    for key, width in widths.items():
        if key in batch:
            flat[key] = batch[key].reshape(batch[key].shape[:-1].numel(), width)
    for key, value in flat.items():
        width = widths.get(key)
        if value.shape[0] != rows or value.shape[1:] not in ((), (width,)):
            raise ValueError(
                f"distillation_loss: batch[{key!r}] has shape {tuple(batch[key].shape)}; expected the logits' "
                f"leading dims ({rows} positions) {'' if width is None else f'x {width} '}"
            )
    if settings.kind == "sampled":
        weights = flat["sample_weights"]
        if not bool(((weights >= 0) & torch.isfinite(weights)).all()):
            raise ValueError("distillation_loss: batch['sample_weights'] must be finite and >= 0")
    return flat


def _sampled_columns(
    flat: dict[str, torch.Tensor], valid: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sampled targets as kernel columns: weights at the top-k columns [N, K] (samples that are a top-k id
    move there) and the other samples' ids and weights [N, M] (-1 / 0 where moved or padded)."""
    ids, weights = flat["sample_ids"].long(), flat["sample_weights"].to(dtype)
    weights = torch.where(ids >= 0, weights, torch.zeros_like(weights))
    same = (
        (ids.unsqueeze(-1) == flat["topk_ids"].unsqueeze(-2)) & valid.unsqueeze(-2) & (ids >= 0).unsqueeze(-1)
    )
    at_topk = (weights.unsqueeze(-1) * same).sum(-2)
    moved = same.any(-1)
    return at_topk, torch.where(moved | (weights <= 0), -1, ids), torch.where(moved, 0.0, weights)


def _teacher_metrics(
    logits: torch.Tensor, flat: dict[str, torch.Tensor], logp_dtype: torch.dtype
) -> TopKOutputs:
    """Metrics only, without gradient and without touching ``logits``: row blocks of float copies."""
    ids, logprobs, labels = flat["topk_ids"], flat["topk_logprobs"], flat["labels"]
    zeros_w = torch.zeros(ids.shape, dtype=logp_dtype, device=ids.device)
    zeros_r = torch.zeros(ids.shape[:1], dtype=logp_dtype, device=ids.device)
    step = max(1, 4 * CHUNK_ELEMENTS // max(logits.shape[-1], 1))
    blocks = []
    with torch.no_grad():
        for start in range(0, max(logits.shape[0], 1), step):  # one (empty) block for zero rows
            rows = slice(start, start + step)
            blocks.append(
                topk_cross_entropy(
                    logits[rows],
                    ids[rows],
                    logprobs[rows],
                    zeros_w[rows],
                    zeros_r[rows],
                    labels[rows],
                    inplace=False,
                )
            )
    return TopKOutputs(*(torch.cat(parts) for parts in zip(*blocks, strict=True)))


def _masked_sum(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` over ``rows``; rows outside may hold inf or NaN (padding under arbitrary logits), which
    a multiply by a 0/1 weight would turn into NaN."""
    return torch.where(rows, values, torch.zeros_like(values)).sum()


def distillation_loss(
    logits: torch.Tensor,
    batch: Mapping[str, torch.Tensor],
    settings: LossSettings,
    *,
    inplace: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean loss over contributing tokens, and metrics, from vocab-parallel logits ``[..., V/TP]``.

    ``batch`` holds the reader's keys (docs/architecture.md): ``labels``, ``loss_mask``, ``soft_mask``,
    ``topk_ids``, ``topk_logprobs`` and, for ``kind='mse'``, ``topk_logits``, for ``kind='sampled'``
    ``sample_ids``/``sample_weights`` (a position is soft only where it has a sample), for ``tail='actual_bin'``
    ``actual_logprob``, all with the logits' leading dims.
    Per token (docs/losses.md "The distillation loss"): soft positions (``soft_mask`` and ``loss_mask``) give
    ``α·τ²·L_soft + (1−α)·CE``; positions with ``loss_mask`` but no teacher give ``CE`` (``no_teacher='hard'``)
    or nothing (``'mask'``); ``kind='hard'`` gives ``CE`` on every ``loss_mask`` position. The loss is the sum
    over contributing tokens divided by their number (``metrics['tokens']``); every TP rank returns the same.

    Metrics are detached 0-dim tensors: ``tokens``/``soft_tokens`` counts and the sums of ``METRIC_SUMS``,
    plus their means ``hard_ce`` (over contributing tokens), ``kl``, ``teacher_entropy``, ``top1_agreement``
    (over soft positions), and ``loss``. float32 ``logits`` are overwritten when ``inplace`` (as
    megatron-core's cross-entropy does); pass ``inplace=False`` to keep them.
    """
    vocab_part = logits.shape[-1]
    z = logits.reshape(-1, vocab_part)
    flat = _flat_batch(batch, z.shape[0], settings)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    has_loss, soft_rows, fallback = loss_rows(flat, settings)

    if settings.kind == "hard":
        out = _teacher_metrics(z, flat, dtype)
        contributing = has_loss
        per_token = hard_cross_entropy(z if inplace else z.clone(), flat["labels"]).to(dtype)
        hard_ce = per_token.detach()
    else:
        contributing = soft_rows | fallback
        mse = None
        if settings.kind == "mse":
            mse = logit_mse(z, flat["topk_ids"], flat["topk_logits"], center=settings.mse_center)
        out = topk_cross_entropy(
            z, **kernel_targets(flat, settings, soft_rows, fallback, dtype), inplace=inplace
        )
        per_token = out.loss
        if mse is not None:
            per_token = per_token + settings.alpha * soft_rows.to(dtype) * mse
        hard_ce = out.hard_ce
    return summarize(_masked_sum(per_token, contributing), contributing, soft_rows, hard_ce, out)


def loss_rows(
    flat: dict[str, torch.Tensor], settings: LossSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions with loss, soft positions and fallback positions [N] (docs/losses.md "The distillation loss");
    checks that the target ids are unique within a row."""
    check_unique_ids(flat["topk_ids"], "distillation_loss: topk_ids")
    has_loss = flat["loss_mask"] > 0
    soft_rows = flat["soft_mask"].bool() & has_loss
    if settings.kind == "sampled":
        check_unique_ids(flat["sample_ids"], "distillation_loss: sample_ids")
        soft_rows &= ((flat["sample_ids"] >= 0) & (flat["sample_weights"] > 0)).any(-1)
    fallback = has_loss & ~soft_rows if settings.no_teacher == "hard" else torch.zeros_like(has_loss)
    return has_loss, soft_rows, fallback


def kernel_targets(
    flat: dict[str, torch.Tensor],
    settings: LossSettings,
    soft_rows: torch.Tensor,
    fallback: torch.Tensor,
    dtype: torch.dtype,
) -> dict[str, Any]:
    """The keyword arguments of ``topk_cross_entropy`` but the logits, row-weighted, for kind soft / sampled /
    mse (the MSE itself is added outside)."""
    alpha = settings.alpha if settings.kind in ("soft", "sampled") else 0.0
    hard_w = (1.0 - settings.alpha) * soft_rows.to(dtype) + fallback.to(dtype)
    valid = valid_entries(flat["topk_ids"], flat["topk_logprobs"])
    logp = masked_logprobs(flat["topk_logprobs"], valid, dtype)
    extra_ids = extra_w = None
    if settings.kind == "sampled":
        soft_w, extra_ids, extra_w = _sampled_columns(flat, valid, dtype)
        tail_w = torch.zeros(soft_rows.shape[0], dtype=dtype, device=soft_rows.device)
    elif settings.tail == "actual_bin":
        labels = flat["labels"].long()
        actual, logp, valid = actual_bin_entries(
            flat["topk_ids"], logp, valid, labels, flat["actual_logprob"]
        )
        soft_w, tail_w = tempered_targets(logp, valid, "tail_bucket", settings.temperature)
        soft_w, extra_w, extra_ids = soft_w[:, :-1], soft_w[:, -1:], actual.unsqueeze(-1)
    else:
        soft_w, tail_w = tempered_targets(logp, valid, settings.tail, settings.temperature)
    row_w = alpha * soft_rows.to(dtype)
    return {
        "topk_ids": flat["topk_ids"],
        "topk_logprobs": flat["topk_logprobs"],
        "soft_w": soft_w * row_w.unsqueeze(-1),
        "tail_w": tail_w * row_w,
        "labels": flat["labels"],
        "hard_w": hard_w if settings.alpha < 1.0 or settings.no_teacher == "hard" else None,
        "temperature": settings.temperature if settings.kind in ("soft", "sampled") else 1.0,
        "extra_ids": extra_ids,
        "extra_w": None if extra_w is None else extra_w * row_w.unsqueeze(-1),
    }


def summarize(
    loss_sum: torch.Tensor,
    contributing: torch.Tensor,
    soft_rows: torch.Tensor,
    hard_ce: torch.Tensor,
    out: TopKOutputs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean loss over contributing tokens from its sum, and the metrics dict of ``distillation_loss``."""
    dtype = loss_sum.dtype
    tokens = contributing.to(dtype).sum()
    loss = loss_sum / tokens.clamp(min=1.0)
    sums = {
        "tokens": tokens,
        "soft_tokens": soft_rows.to(dtype).sum(),
        "hard_ce_sum": _masked_sum(hard_ce, contributing),
        "kl_sum": _masked_sum(out.kl, soft_rows),
        "teacher_entropy_sum": _masked_sum(out.teacher_entropy, soft_rows),
        "top1_agree_sum": _masked_sum(out.top1_agree.to(dtype), soft_rows),
    }
    metrics = {key: value.detach() for key, value in sums.items()}
    metrics["loss"] = loss.detach()
    soft_tokens = sums["soft_tokens"].clamp(min=1.0)
    metrics["hard_ce"] = metrics["hard_ce_sum"] / tokens.clamp(min=1.0)
    metrics["kl"] = metrics["kl_sum"] / soft_tokens
    metrics["teacher_entropy"] = metrics["teacher_entropy_sum"] / soft_tokens
    metrics["top1_agreement"] = metrics["top1_agree_sum"] / soft_tokens
    return loss, metrics
