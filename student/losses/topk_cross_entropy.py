"""Vocab-parallel cross-entropy against the teacher's top-k (plus an optional hard label), in one pass.

One ``torch.autograd.Function`` computes, per token and over logits sharded along the vocabulary:

- the soft CE of docs/losses.md "Soft cross-entropy" (tails ``none`` / ``renormalize`` / ``tail_bucket`` /
  ``actual_bin``, and the sampled targets of "Sampled targets"; temperature τ, loss scaled by τ²), with the
  exact gradient of "Gradients";
- the hard CE on the actual next token at τ = 1 (the ``(1 - α)`` mix and the no-teacher fallback);
- the metrics of "Metrics" (KL over k+1 bins, teacher entropy, top-1 agreement, hard CE), at τ = 1.

Memory follows megatron-core's ``vocab_parallel_cross_entropy``: one ``[N, V/TP]`` float buffer is the working
copy, the saved state and finally the gradient. For float32/float64 logits with ``inplace=True`` that buffer IS
the input: the logits are overwritten (as megatron-core does). Collectives: one MAX and one SUM all-reduce of
``[N, 2]`` and ``[N, 9]`` in the forward, none in the backward ("Tensor-parallel decomposition").
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.distributed as dist

from student.losses.parallel import vocab_shard
from student.losses.targets import (
    Tail,
    actual_bin_entries,
    masked_logprobs,
    teacher_bins,
    tempered_targets,
    valid_entries,
)

CHUNK_ELEMENTS = 1 << 22
"""Rows are processed in blocks of about this many logits where a temporary is needed (τ != 1 only)."""


class TopKOutputs(NamedTuple):
    """Per-token results ``[N]``; only ``loss`` carries a gradient."""

    loss: torch.Tensor
    hard_ce: torch.Tensor
    kl: torch.Tensor
    teacher_entropy: torch.Tensor
    top1_agree: torch.Tensor


def _row_blocks(rows: int, cols: int) -> Iterator[slice]:
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def _pow_sum(buf: torch.Tensor, tau: float) -> torch.Tensor:
    """``Σ_v buf_v^τ`` per row, in row blocks (one block-sized temporary; zero rows give an empty result)."""
    out = buf.new_empty(buf.shape[0])
    for rows in _row_blocks(*buf.shape):
        out[rows] = buf[rows].pow(tau).sum(dim=-1)
    return out


def _working_buffer(logits: torch.Tensor, inplace: bool) -> torch.Tensor:
    """The float buffer the loss works in: the input itself when allowed, else a float32 (float64) copy."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if inplace and logits.dtype == dtype and logits.is_contiguous():
        return logits
    return logits.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)


def _xlogy0(x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:
    """``x * log_y`` with ``0 * log 0 = 0``."""
    return torch.where(x > 0, x * log_y, torch.zeros_like(x))


def _row_max(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per-row max of ``values`` [N, C] over ``keep``; -inf where nothing is kept (also when C = 0)."""
    if values.shape[-1] == 0:
        return values.new_full(values.shape[:1], float("-inf"))
    return values.masked_fill(~keep, float("-inf")).amax(dim=-1)


def _teacher_top1_agrees(
    z_topk: torch.Tensor, held: torch.Tensor, logp: torch.Tensor, row_max: torch.Tensor
) -> torch.Tensor:
    """Whether this rank holds the teacher's top-1 (first on ties) and it attains the global max ``row_max``."""
    if logp.shape[-1] == 0:
        return torch.zeros(logp.shape[:1], dtype=torch.bool, device=logp.device)
    top1 = logp.argmax(dim=-1, keepdim=True)
    return (held.gather(-1, top1) & (z_topk.gather(-1, top1) == row_max.unsqueeze(-1))).squeeze(-1)


class _TopKCrossEntropy(torch.autograd.Function):
    """See the module docstring; the steps are numbered as in docs/losses.md "Forward, step by step"."""

    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_logprobs: torch.Tensor,
        soft_w: torch.Tensor,
        tail_w: torch.Tensor,
        labels: torch.Tensor,
        hard_w: torch.Tensor | None,
        temperature: float,
        inplace: bool,
        extra_ids: torch.Tensor,
        extra_w: torch.Tensor,
    ):
        shard = vocab_shard(logits.shape[-1])
        buf = _working_buffer(logits, inplace)
        dtype = buf.dtype
        tau = float(temperature)
        k = topk_ids.shape[-1]
        valid_k = valid_entries(topk_ids, topk_logprobs)
        logp = masked_logprobs(topk_logprobs, valid_k, dtype)
        # the target columns: the teacher's valid top-k, then the extra soft-only columns (valid where id >= 0)
        ids = torch.cat([topk_ids, extra_ids], dim=-1)
        weights = torch.cat([soft_w, extra_w], dim=-1).to(dtype)
        tail_w = tail_w.to(dtype)
        col, held = shard.local_index(ids)
        held &= torch.cat([valid_k, extra_ids >= 0], dim=-1)
        ycol, yheld = shard.local_index(labels.unsqueeze(-1))
        yheld = yheld.squeeze(-1)

        # 1. logits at the local target columns and at the label
        z_t = buf.gather(-1, col)
        z_y = buf.gather(-1, ycol).squeeze(-1)
        # 2. target columns set to -inf (an amin scatter; padded ids pointing at column 0 scatter +inf)
        buf.scatter_reduce_(-1, col, torch.where(held, float("-inf"), float("inf")).to(dtype), reduce="amin")
        # 3. one MAX all-reduce of [N, 2]: the tail max m_T and the targets' max; m = the larger
        maxima = torch.stack([buf.amax(dim=-1), _row_max(z_t, held)], dim=-1)
        shard.all_reduce(maxima, dist.ReduceOp.MAX)
        tail_max, row_max = maxima[:, 0], maxima.amax(dim=-1)
        shift = torch.where(torch.isfinite(tail_max), tail_max, row_max)
        # 4. e = exp((z − m_T)/τ) in place: <= 1 off the targets, and 0 on them
        buf.sub_(shift.unsqueeze(-1))
        if tau != 1.0:
            buf.div_(tau)
        buf.exp_()
        # 5. tail sums T' (relative to m_T: >= 1 unless there is no tail column); targets relative to m
        tail_tau = buf.sum(dim=-1)
        tail_one = tail_tau if tau == 1.0 else _pow_sum(buf, tau)
        d_t = (z_t - row_max.unsqueeze(-1)).masked_fill_(~held, 0.0)
        d_y = (z_y - row_max).masked_fill_(~yheld, 0.0)
        e_t = (d_t / tau).exp().masked_fill_(~held, 0.0)
        e1_t = e_t if tau == 1.0 else d_t.exp().masked_fill_(~held, 0.0)
        p, r = teacher_bins(logp, valid_k)
        agree_local = _teacher_top1_agrees(z_t[:, :k], held[:, :k], logp, row_max)

        # 6. one SUM all-reduce of the [N, 9] partial sums
        partial = torch.stack(
            [
                tail_tau,
                e_t.sum(-1),
                tail_one,
                e1_t.sum(-1),
                e1_t[:, k:].sum(-1),
                (weights * d_t).sum(-1),
                (p * d_t[:, :k]).sum(-1),
                d_y,
                agree_local.to(dtype),
            ],
            dim=-1,
        )
        shard.all_reduce(partial)
        tail_tau, targets_tau, tail_one, targets_one, extra_one, wd_sum, pd_sum, d_y, agree = partial.unbind(
            -1
        )

        # 7. per-token loss and metrics, in logs relative to m: log T^τ = (m_T − m)/τ + log T'^τ
        log_tail_tau = (shift - row_max) / tau + tail_tau.log()
        log_sum_tau = torch.logaddexp(log_tail_tau, targets_tau.log())
        log_tail_one = (shift - row_max) + tail_one.log()
        log_sum_one = torch.logaddexp(log_tail_one, targets_one.log())
        soft_mass = weights.sum(-1)
        soft = soft_mass * log_sum_tau - wd_sum / tau - _xlogy0(tail_w, log_tail_tau - log_sum_tau)
        hard_ce = log_sum_one - d_y
        loss = tau * tau * soft
        if hard_w is not None:
            hard_w = hard_w.to(dtype)
            loss = loss + hard_w * hard_ce
        p_logp = torch.where(valid_k, p * logp, torch.zeros_like(p)).sum(-1)
        r_logr = _xlogy0(r, r.log())
        log_bin_tail = torch.logaddexp(log_tail_one, extra_one.log())  # the k+1-bin tail holds the extras
        kl = p_logp + r_logr - (pd_sum - p.sum(-1) * log_sum_one) - _xlogy0(r, log_bin_tail - log_sum_one)
        entropy = -p_logp - r_logr

        ctx.save_for_backward(
            buf,
            col,
            held,
            ycol,
            yheld,
            e_t,
            e1_t,
            weights,
            tail_w,
            hard_w,
            tail_tau,
            log_tail_tau,
            log_sum_tau,
            tail_one,
            log_tail_one,
            log_sum_one,
            soft_mass,
        )
        ctx.tau, ctx.in_dtype, ctx.in_shape, ctx.inplace = tau, logits.dtype, logits.shape, inplace
        outputs = TopKOutputs(loss, hard_ce, kl, entropy, agree > 0)
        ctx.mark_non_differentiable(*outputs[1:])
        return tuple(outputs)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, *_unused):
        (
            buf,
            col,
            held,
            ycol,
            yheld,
            e_t,
            e1_t,
            weights,
            tail_w,
            hard_w,
            tail_tau,
            log_tail_tau,
            log_sum_tau,
            tail_one,
            log_tail_one,
            log_sum_one,
            soft_mass,
        ) = ctx.saved_tensors
        tau = ctx.tau
        if not ctx.inplace:  # keep the saved buffer intact so that backward can run again (retain_graph)
            buf = buf.clone()
        go = grad_loss.to(buf.dtype)
        # ∂L/∂z = go·τ·[(Ŵ + r̂)·q^τ − w − (r̂/R)·q^τ·1{v ∉ K}] + go·h·(q¹ − e_y)   (docs/losses.md "Gradients")
        # Off the targets q^τ_v = e_v·R^τ/T'^τ, so the dense coefficient of e is go·τ·((Ŵ + r̂)·R^τ − r̂)/T'^τ.
        has_tail = tail_tau > 0
        tail_tau = torch.where(has_tail, tail_tau, torch.ones_like(tail_tau))
        tail_coef = go * tau * ((soft_mass + tail_w) * (log_tail_tau - log_sum_tau).exp() - tail_w) / tail_tau
        tail_coef = torch.where(has_tail, tail_coef, torch.zeros_like(tail_coef))
        hard_coef = None
        if hard_w is not None:
            tail_one = torch.where(has_tail, tail_one, torch.ones_like(tail_one))
            hard_coef = go * hard_w * (log_tail_one - log_sum_one).exp() / tail_one
            hard_coef = torch.where(has_tail, hard_coef, torch.zeros_like(hard_coef))

        # dense part over the whole shard, in place (the target columns hold 0 and stay 0)
        if hard_coef is None:
            buf.mul_(tail_coef.unsqueeze(-1))
        elif tau == 1.0:
            buf.mul_((tail_coef + hard_coef).unsqueeze(-1))
        else:
            for rows in _row_blocks(*buf.shape):
                block = buf[rows]
                hard_part = block.pow(tau).mul_(hard_coef[rows].unsqueeze(-1))
                block.mul_(tail_coef[rows].unsqueeze(-1)).add_(hard_part)

        # target columns: their exact value go·τ·((Ŵ + r̂)·q^τ_t − w_t) + go·h·q¹_t, q^τ_t = e_t/S^τ
        soft_scale = go * tau * (soft_mass + tail_w) * (-log_sum_tau).exp()
        at_t = soft_scale.unsqueeze(-1) * e_t - (go * tau).unsqueeze(-1) * weights
        if hard_w is not None:
            at_t = at_t + (go * hard_w * (-log_sum_one).exp()).unsqueeze(-1) * e1_t
        buf.scatter_add_(-1, col, at_t.masked_fill_(~held, 0.0))
        if hard_w is not None:
            buf.scatter_add_(-1, ycol, (-(go * hard_w)).masked_fill_(~yheld, 0.0).unsqueeze(-1))
        grad = buf.view(ctx.in_shape)
        return grad.to(ctx.in_dtype), None, None, None, None, None, None, None, None, None, None


def topk_cross_entropy(
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    soft_w: torch.Tensor,
    tail_w: torch.Tensor,
    labels: torch.Tensor,
    hard_w: torch.Tensor | None = None,
    temperature: float = 1.0,
    inplace: bool = True,
    *,
    extra_ids: torch.Tensor | None = None,
    extra_w: torch.Tensor | None = None,
) -> TopKOutputs:
    """The fused Function on flat ``[N, V/TP]`` logits with ``[N, K]`` targets and ``[N]`` row weights.

    ``soft_w``/``tail_w`` are the (already row-weighted) target weights w and r̂; ``hard_w`` the weight h of the
    hard CE (None: no hard term). Per-token ``loss = τ²·soft + h·CE``. ``extra_ids`` [N, E] (-1 pad) with
    weights ``extra_w`` [N, E] are further soft-target columns (the actual-token bin, sampled targets): they
    enter the soft CE like top-k entries and stay out of its tail bucket, while the metrics keep the teacher's
    k+1 bins (their tail includes them). Ids must be unique within a row across both. With ``inplace``
    float32/float64 ``logits`` are overwritten and the backward consumes the saved buffer (it can run once);
    ``inplace=False`` leaves ``logits`` intact and allows repeated backwards (``retain_graph``, gradcheck) at two
    extra buffers.
    """
    if logits.dim() != 2 or topk_ids.shape != topk_logprobs.shape or topk_ids.shape[0] != logits.shape[0]:
        raise ValueError(
            f"topk_cross_entropy: expected logits [N, V/TP] and top-k [N, K]; got logits {tuple(logits.shape)}, "
            f"topk_ids {tuple(topk_ids.shape)}, topk_logprobs {tuple(topk_logprobs.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if extra_ids is None:
        extra_ids = topk_ids.new_empty(topk_ids.shape[0], 0)
        extra_w = soft_w.new_empty(extra_ids.shape)
    if extra_w is None or extra_w.shape != extra_ids.shape or extra_ids.shape[0] != logits.shape[0]:
        raise ValueError(
            "topk_cross_entropy: extra_ids and extra_w must both be given, [N, E] each; got "
            f"{None if extra_ids is None else tuple(extra_ids.shape)} and "
            f"{None if extra_w is None else tuple(extra_w.shape)}"
        )
    return TopKOutputs(
        *_TopKCrossEntropy.apply(
            logits,
            topk_ids.long(),
            topk_logprobs,
            soft_w,
            tail_w,
            labels.long(),
            hard_w,
            temperature,
            inplace,
            extra_ids.long(),
            extra_w,
        )
    )


def soft_cross_entropy(
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    *,
    tail: Tail = "tail_bucket",
    temperature: float = 1.0,
    inplace: bool = True,
    labels: torch.Tensor | None = None,
    actual_logprob: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-position soft CE (docs/losses.md "Soft cross-entropy") over vocab-parallel logits ``[..., V/TP]``.

    ``topk_ids`` [..., K] are student vocabulary ids (-1 pads), ``topk_logprobs`` [..., K] the teacher's
    log-probabilities at τ = 1 (-inf pads). Ids must be unique within a row. Returns ``τ²·L`` with shape ``[...]``,
    no masking or reduction. float32/float64 ``logits`` are overwritten when ``inplace`` (megatron-core style).
    ``tail="actual_bin"`` needs ``labels`` [...] and the teacher's log-probability of each label
    ``actual_logprob`` [...] (NaN where unknown).
    """
    flat_ids = topk_ids.reshape(topk_ids.shape[:-1].numel(), topk_ids.shape[-1])
    flat_logp = topk_logprobs.reshape(flat_ids.shape)
    valid = valid_entries(flat_ids, flat_logp)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = masked_logprobs(flat_logp, valid, dtype)
    no_labels = torch.full(flat_ids.shape[:1], -1, dtype=torch.long, device=flat_ids.device)
    extra_ids = extra_w = None
    if tail == "actual_bin":
        if labels is None or actual_logprob is None:
            raise ValueError("soft_cross_entropy: tail='actual_bin' needs labels and actual_logprob")
        extra, logp, valid = actual_bin_entries(
            flat_ids, logp, valid, labels.reshape(-1).long(), actual_logprob.reshape(-1)
        )
        soft_w, tail_w = tempered_targets(logp, valid, "tail_bucket", temperature)
        soft_w, extra_w, extra_ids = soft_w[:, :-1], soft_w[:, -1:], extra.unsqueeze(-1)
    else:
        soft_w, tail_w = tempered_targets(logp, valid, tail, temperature)
    out = topk_cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        flat_ids,
        flat_logp,
        soft_w,
        tail_w,
        no_labels,
        None,
        temperature,
        inplace,
        extra_ids=extra_ids,
        extra_w=extra_w,
    )
    return out.loss.view(topk_ids.shape[:-1])


def sampled_cross_entropy(
    logits: torch.Tensor,
    sample_ids: torch.Tensor,
    sample_weights: torch.Tensor,
    *,
    temperature: float = 1.0,
    inplace: bool = True,
) -> torch.Tensor:
    """Per-position soft CE against sparse sampled targets (docs/losses.md "Sampled targets"): ``τ²·L`` with
    ``L = (Σ_j w_j)·logsumexp(z/τ) − Σ_j w_j z_{s_j}/τ``, over vocab-parallel logits ``[..., V/TP]``.

    ``sample_ids`` [..., M] (-1 pad, unique within a row) and ``sample_weights`` [..., M] come from
    ``student.losses.targets.sampled_targets`` (or the reader); the weights are used as given (drawn at the
    teacher's temperature, which must be ``temperature``). Returns shape ``[...]``, no masking or reduction.
    """
    flat_ids = sample_ids.reshape(sample_ids.shape[:-1].numel(), sample_ids.shape[-1]).long()
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    weights = sample_weights.reshape(flat_ids.shape).to(dtype)
    weights = torch.where(flat_ids >= 0, weights, torch.zeros_like(weights))
    no_topk = flat_ids.new_empty(flat_ids.shape[0], 0)
    out = topk_cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        no_topk,
        weights.new_empty(no_topk.shape),
        weights.new_empty(no_topk.shape),
        weights.new_zeros(flat_ids.shape[:1]),
        torch.full(flat_ids.shape[:1], -1, dtype=torch.long, device=flat_ids.device),
        None,
        temperature,
        inplace,
        extra_ids=torch.where(weights > 0, flat_ids, -1),
        extra_w=weights,
    )
    return out.loss.view(sample_ids.shape[:-1])
