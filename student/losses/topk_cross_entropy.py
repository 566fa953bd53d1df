"""Vocab-parallel cross-entropy against the teacher's top-k (plus an optional hard label), in one pass.

One ``torch.autograd.Function`` computes, per token and over logits sharded along the vocabulary:

- the soft CE of docs/losses.md "Soft cross-entropy" (tails ``none`` / ``renormalize`` / ``tail_bucket``,
  temperature τ, loss scaled by τ²), with the exact gradient of "Gradients";
- the hard CE on the actual next token at τ = 1 (the ``(1 - α)`` mix and the no-teacher fallback);
- the metrics of "Metrics" (KL over k+1 bins, teacher entropy, top-1 agreement, hard CE), at τ = 1.

Memory follows megatron-core's ``vocab_parallel_cross_entropy``: one ``[N, V/TP]`` float buffer is the working
copy, the saved state and finally the gradient. For float32/float64 logits with ``inplace=True`` that buffer IS
the input: the logits are overwritten (as megatron-core does). Collectives: one MAX and one SUM all-reduce of
``[N]`` and ``[N, 8]`` in the forward, none in the backward ("Tensor-parallel decomposition").
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.distributed as dist

from student.losses.parallel import vocab_shard
from student.losses.targets import Tail, masked_logprobs, teacher_bins, tempered_targets, valid_entries

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


def _working_buffer(logits: torch.Tensor, inplace: bool) -> torch.Tensor:
    """The float buffer the loss works in: the input itself when allowed, else a float32 (float64) copy."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if inplace and logits.dtype == dtype and logits.is_contiguous():
        return logits
    return logits.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)


def _xlogy0(x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:
    """``x * log_y`` with ``0 * log 0 = 0``."""
    return torch.where(x > 0, x * log_y, torch.zeros_like(x))


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
    ):
        shard = vocab_shard(logits.shape[-1])
        buf = _working_buffer(logits, inplace)
        dtype = buf.dtype
        tau = float(temperature)
        soft_w, tail_w = soft_w.to(dtype), tail_w.to(dtype)

        # 1. global max, 2. shift: d = z - m <= 0
        row_max = buf.amax(dim=-1)
        shard.all_reduce(row_max, dist.ReduceOp.MAX)
        buf.sub_(row_max.unsqueeze(-1))

        # 3. shifted logits at the local top-k ids and at the label
        kcol, kheld = shard.local_index(topk_ids)
        ycol, yheld = shard.local_index(labels.unsqueeze(-1))
        d_topk = buf.gather(-1, kcol).masked_fill_(~kheld, 0.0)
        d_label = buf.gather(-1, ycol).masked_fill_(~yheld, 0.0).squeeze(-1)
        valid = valid_entries(topk_ids, topk_logprobs)
        logp = masked_logprobs(topk_logprobs, valid, dtype)
        teacher_top1 = logp.argmax(dim=-1, keepdim=True)
        agree_local = (
            (kheld & valid).gather(-1, teacher_top1) & (d_topk.gather(-1, teacher_top1) == 0)
        ).squeeze(-1)

        # 4. e = exp(d / τ) in place; its values at the local top-k ids
        if tau != 1.0:
            buf.div_(tau)
        buf.exp_()
        e_topk = buf.gather(-1, kcol).masked_fill_(~kheld, 0.0)

        # 5. tail sums with the top-k columns zeroed (no cancellation as Σ_j q_tj -> 1), then restore them
        buf.scatter_reduce_(-1, kcol, (~kheld).to(dtype), reduce="prod")
        tail_tau = buf.sum(dim=-1)
        if tau == 1.0:
            tail_one, e1_topk = tail_tau, e_topk
        else:
            tail_one = torch.cat([buf[rows].pow(tau).sum(dim=-1) for rows in _row_blocks(*buf.shape)])
            e1_topk = d_topk.exp().masked_fill_(~kheld, 0.0)
        buf.scatter_reduce_(-1, kcol, e_topk, reduce="amax")

        # 6. one SUM all-reduce of the [N, 8] partial sums
        p, r = teacher_bins(logp, valid)
        partial = torch.stack(
            [
                tail_tau,
                e_topk.sum(-1),
                tail_one,
                e1_topk.sum(-1),
                (soft_w * d_topk).sum(-1),
                (p * d_topk).sum(-1),
                d_label,
                agree_local.to(dtype),
            ],
            dim=-1,
        )
        shard.all_reduce(partial)
        tail_tau, topk_tau, tail_one, topk_one, wd_sum, pd_sum, d_label, agree = partial.unbind(-1)

        # 7. per-token loss and metrics
        sum_tau, sum_one = tail_tau + topk_tau, tail_one + topk_one
        log_sum_tau, log_sum_one = sum_tau.log(), sum_one.log()
        soft_mass = soft_w.sum(-1)
        soft = soft_mass * log_sum_tau - wd_sum / tau - _xlogy0(tail_w, tail_tau.log() - log_sum_tau)
        hard_ce = log_sum_one - d_label
        loss = tau * tau * soft
        if hard_w is not None:
            hard_w = hard_w.to(dtype)
            loss = loss + hard_w * hard_ce
        p_logp = torch.where(valid, p * logp, torch.zeros_like(p)).sum(-1)
        r_logr = _xlogy0(r, r.log())
        kl = p_logp + r_logr - (pd_sum - p.sum(-1) * log_sum_one) - _xlogy0(r, tail_one.log() - log_sum_one)
        entropy = -p_logp - r_logr

        ctx.save_for_backward(
            buf,
            kcol,
            kheld,
            ycol,
            yheld,
            e_topk,
            e1_topk,
            soft_w,
            tail_w,
            hard_w,
            sum_tau,
            tail_tau,
            sum_one,
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
            kcol,
            kheld,
            ycol,
            yheld,
            e_topk,
            e1_topk,
            soft_w,
            tail_w,
            hard_w,
            sum_tau,
            tail_tau,
            sum_one,
            soft_mass,
        ) = ctx.saved_tensors
        tau = ctx.tau
        if not ctx.inplace:  # keep the saved buffer intact so that backward can run again (retain_graph)
            buf = buf.clone()
        go = grad_loss.to(buf.dtype)
        # ∂L/∂z = go·τ·[(Ŵ + r̂)·q^τ − w − (r̂/R)·q^τ·1{v ∉ K}] + go·h·(q¹ − e_y)   (docs/losses.md "Gradients")
        tail_ratio = torch.where(tail_w > 0, tail_w / tail_tau, torch.zeros_like(tail_w))
        soft_scale = go * tau * (soft_mass + tail_w) / sum_tau
        hard_scale = go * hard_w / sum_one if hard_w is not None else None
        tail_coef = soft_scale - go * tau * tail_ratio  # dense coefficient of e = exp(d/τ) off the top-k

        # dense part over the whole shard, in place
        if hard_scale is None:
            buf.mul_(tail_coef.unsqueeze(-1))
        elif tau == 1.0:
            buf.mul_((tail_coef + hard_scale).unsqueeze(-1))
        else:
            for rows in _row_blocks(*buf.shape):
                block = buf[rows]
                hard_part = block.pow(tau).mul_(hard_scale[rows].unsqueeze(-1))
                block.mul_(tail_coef[rows].unsqueeze(-1)).add_(hard_part)

        # top-k columns: overwrite with their exact value (no large dense term cancelled by a correction)
        at_topk = soft_scale.unsqueeze(-1) * e_topk - (go * tau).unsqueeze(-1) * soft_w
        if hard_scale is not None:
            at_topk = at_topk + hard_scale.unsqueeze(-1) * e1_topk
        buf.scatter_reduce_(-1, kcol, (~kheld).to(buf.dtype), reduce="prod")
        buf.scatter_add_(-1, kcol, at_topk.masked_fill_(~kheld, 0.0))
        if hard_w is not None:
            buf.scatter_add_(-1, ycol, (-(go * hard_w)).unsqueeze(-1).masked_fill_(~yheld, 0.0))
        grad = buf.view(ctx.in_shape)
        return grad.to(ctx.in_dtype), None, None, None, None, None, None, None, None


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
) -> TopKOutputs:
    """The fused Function on flat ``[N, V/TP]`` logits with ``[N, K]`` targets and ``[N]`` row weights.

    ``soft_w``/``tail_w`` are the (already row-weighted) target weights w and r̂; ``hard_w`` the weight h of the
    hard CE (None: no hard term). Per-token ``loss = τ²·soft + h·CE``. With ``inplace`` float32/float64
    ``logits`` are overwritten and the backward consumes the saved buffer (it can run once); ``inplace=False``
    leaves ``logits`` intact and allows repeated backwards (``retain_graph``, gradcheck) at two extra buffers.
    """
    if logits.dim() != 2 or topk_ids.shape != topk_logprobs.shape or topk_ids.shape[0] != logits.shape[0]:
        raise ValueError(
            f"topk_cross_entropy: expected logits [N, V/TP] and top-k [N, K]; got logits {tuple(logits.shape)}, "
            f"topk_ids {tuple(topk_ids.shape)}, topk_logprobs {tuple(topk_logprobs.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
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
) -> torch.Tensor:
    """Per-position soft CE (docs/losses.md "Soft cross-entropy") over vocab-parallel logits ``[..., V/TP]``.

    ``topk_ids`` [..., K] are student vocabulary ids (-1 pads), ``topk_logprobs`` [..., K] the teacher's
    log-probabilities at τ = 1 (-inf pads). Ids must be unique within a row. Returns ``τ²·L`` with shape ``[...]``,
    no masking or reduction. float32/float64 ``logits`` are overwritten when ``inplace`` (megatron-core style).
    """
    flat_ids = topk_ids.reshape(-1, topk_ids.shape[-1])
    flat_logp = topk_logprobs.reshape(flat_ids.shape)
    valid = valid_entries(flat_ids, flat_logp)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    soft_w, tail_w = tempered_targets(masked_logprobs(flat_logp, valid, dtype), valid, tail, temperature)
    labels = torch.full(flat_ids.shape[:1], -1, dtype=torch.long, device=flat_ids.device)
    out = topk_cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        flat_ids,
        flat_logp,
        soft_w,
        tail_w,
        labels,
        None,
        temperature,
        inplace,
    )
    return out.loss.view(topk_ids.shape[:-1])
