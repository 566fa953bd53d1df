"""Vocab-parallel logit MSE against the teacher's raw top-k logits (docs/losses.md "Logit MSE")."""

from __future__ import annotations

import torch

from student.losses.parallel import vocab_shard


class _TopKLogitMSE(torch.autograd.Function):
    """Per token: ``(1/n)·Σ_j (D_j − c)²`` with ``D_j = z_{t_j} − u_j`` over the n valid entries.

    ``c = mean_j D_j`` when centred (shift-invariant: logits are defined up to a per-row constant), else 0.
    Two SUM all-reduces of ``[N]``: Σ_j D_j, then Σ_j (D_j − c)² (two passes keep the variance accurate when
    the student's and teacher's offsets differ a lot). Backward: ``2·(D_j − c)/n`` at the top-k ids only.
    """

    @staticmethod
    def forward(
        ctx, logits: torch.Tensor, topk_ids: torch.Tensor, teacher_logits: torch.Tensor, center: bool
    ):
        shard = vocab_shard(logits.shape[-1])
        kcol, kheld = shard.local_index(topk_ids)
        valid = (topk_ids >= 0) & torch.isfinite(teacher_logits)
        count = valid.sum(-1).to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
        dtype = count.dtype
        here = kheld & valid
        diff = logits.gather(-1, kcol).to(dtype) - torch.where(valid, teacher_logits.to(dtype), 0.0)
        diff = diff.masked_fill_(~here, 0.0)
        n = count.clamp(min=1.0)
        if center:
            mean = shard.all_reduce(diff.sum(-1)) / n
            diff = torch.where(here, diff - mean.unsqueeze(-1), torch.zeros_like(diff))
        mse = shard.all_reduce(diff.square().sum(-1)) / n
        ctx.save_for_backward(kcol, diff, n)
        ctx.in_dtype, ctx.in_shape = logits.dtype, logits.shape
        return mse

    @staticmethod
    def backward(ctx, grad_mse: torch.Tensor):
        kcol, diff, n = ctx.saved_tensors
        grad = torch.zeros(ctx.in_shape, dtype=diff.dtype, device=diff.device)
        grad.scatter_add_(-1, kcol, diff * (2.0 * grad_mse.to(diff.dtype) / n).unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None


def logit_mse(
    logits: torch.Tensor, topk_ids: torch.Tensor, topk_logits: torch.Tensor, *, center: bool = True
) -> torch.Tensor:
    """Per-position MSE between student logits at the teacher's top-k ids and the teacher's raw logits.

    ``logits`` [..., V/TP] vocab-parallel; ``topk_ids`` [..., K] (-1 pads), ``topk_logits`` [..., K] (-inf or
    NaN pads). Returns ``[...]``; rows with no valid entry give 0. Does not modify ``logits``. Temperature does
    not enter: ``τ²·((z − u)/τ)² = (z − u)²``.
    """
    if topk_ids.shape != topk_logits.shape:
        raise ValueError(
            f"logit_mse: topk_ids {tuple(topk_ids.shape)} and topk_logits {tuple(topk_logits.shape)} differ"
        )
    flat_ids = topk_ids.reshape(-1, topk_ids.shape[-1]).long()
    mse = _TopKLogitMSE.apply(
        logits.reshape(-1, logits.shape[-1]), flat_ids, topk_logits.reshape(flat_ids.shape), center
    )
    return mse.view(topk_ids.shape[:-1])
