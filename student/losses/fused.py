"""The output layer and the loss in one Function: the ``[N, V/TP]`` logits are never held (docs/losses.md
"Fused output layer").

From the final hidden states ``[N, h]`` and this rank's vocab-parallel output weight ``[V/TP, h]`` (the output
layer's, or the tied embedding's), ``fused_topk_cross_entropy`` computes what ``topk_cross_entropy`` computes
from the logits ``hidden @ weight.T`` (every tail, τ, the α mix, the hard CE, the sampled targets, the metrics),
one block of token rows at a time:

1. the block's logits ``[n, V/TP]`` (one matmul; the vocabulary's padding columns set to ``PAD_LOGIT`` as
   ``student.model.forward_logits`` does);
2. the tested one-pass kernel ``topk_cross_entropy`` on that block (its collectives are per block: a MAX of
   ``[n, 2]``, a SUM of ``[n, 9]``) and, when a gradient is wanted, its backward at once with upstream 1 per
   contributing row: the block's logit gradient, in place in the same buffer;
3. that gradient into ``grad_hidden += G @ W`` and ``grad_weight += Gᵀ @ h`` in vocabulary tiles; a tile whose
   gradient is negligible for every row of the block (below ``eps·scale/tile`` for each row, as Cut
   Cross-Entropy skips softmax blocks below its precision) is skipped.

Why the gradient in the forward (as Liger-Kernel's fused linear cross-entropy) rather than a backward that
recomputes each block (as Cut Cross-Entropy): the loss is a sum over rows whose upstream gradient is one scalar,
so the block's logits serve the loss and the gradient in one visit: three matmuls per block (the output layer's
own forward and backward), not four. The backward scales the saved gradients by that scalar. Memory: one
``[n, V/TP]`` block, the ``[V/TP, h]`` weight gradient and the ``[N, h]`` hidden gradient (both of which the
unfused path also makes), plus ``[N]``-sized row values.

The hidden-state gradient is all-reduced over the tensor-parallel group by megatron-core's
``copy_to_tensor_model_parallel_region``, exactly as its ``ColumnParallelLinear`` does for its input.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

from student.losses.distill import _flat_batch, distillation_loss, kernel_targets, loss_rows, summarize
from student.losses.parallel import vocab_shard
from student.losses.topk_cross_entropy import TopKOutputs, topk_cross_entropy
from student.model import PAD_LOGIT
from student.settings import LossSettings

MAX_BLOCK_ELEMENTS = 1 << 26
"""At most this many logits per block (256 MiB in float32)."""


def block_rows_for(hidden_size: int, vocab_part: int) -> int:
    """Token rows per block: ``hidden/2``, at least 256, fewer where the block would pass ``MAX_BLOCK_ELEMENTS``.

    The block's logits are then about half the size of the weight gradient (which exists anyway), and each block
    streams the weight three times (forward, hidden gradient, weight-gradient read and write) for ``6·rows·V·h``
    flops: ``3·rows/8`` flop per byte, compute-bound from about 256 rows on a CPU. Measured in CPU time (1024
    tokens, V = 128k, h = 1024, one thread): 64-row blocks 1.15x megatron-core's, 512-row blocks 1.0x; (V = 49152,
    h = 256, two threads) 128 rows 1.4x the unfused soft CE, 256 rows 1.1x. The floor also bounds the number of
    blocks, each of which runs the loss kernel's few dozen small ops.
    """
    rows = max(256, hidden_size // 2)
    return max(16, min(rows, MAX_BLOCK_ELEMENTS // max(vocab_part, 1)))


TILE_COLUMNS = 4096
"""Vocabulary columns per tile of the gradient matmuls (the unit of skipping)."""


class FusedStats(NamedTuple):
    """How many vocabulary tiles the gradient matmuls visited and skipped (for tests and benchmarks)."""

    tiles: int
    skipped: int


def _pad_columns(vocab_part: int, vocab_size: int) -> slice | None:
    """This rank's columns of vocabulary padding rows (global id >= ``vocab_size``), or None."""
    start = vocab_shard(vocab_part).start
    first_pad = max(vocab_size - start, 0)
    return slice(first_pad, vocab_part) if first_pad < vocab_part else None


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The output layer's compute dtype: autocast's on CUDA when enabled, else the promoted input dtypes."""
    if hidden.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return torch.promote_types(hidden.dtype, weight.dtype)


def _accumulate(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out += a @ b`` with ``a @ b`` in ``b``'s dtype (the matmul dtype), in place when the dtypes agree."""
    if out.dtype == b.dtype:
        out.addmm_(a.to(b.dtype), b)
    else:
        out += (a.to(b.dtype) @ b).to(out.dtype)


def _tiles_to_keep(grad: torch.Tensor, threshold: torch.Tensor, tile: int) -> list[bool]:
    """Per vocabulary tile of ``grad`` [n, V]: whether some row's gradient exceeds its ``threshold`` [n] there.

    Two reductions over the whole block (amax and amin of [n, tiles, tile]; ~10x faster than ``aminmax`` or
    ``abs().amax()`` on CPU) rather than a few small ops per tile.
    """
    rows, cols = grad.shape
    full = cols // tile
    if rows == 0:
        return [False] * -(-cols // tile)
    highs, lows = [], []
    if full:
        tiled = grad[:, : full * tile].view(rows, full, tile)
        highs.append(tiled.amax(dim=-1))
        lows.append(tiled.amin(dim=-1))
    if cols % tile:
        highs.append(grad[:, full * tile :].amax(dim=-1, keepdim=True))
        lows.append(grad[:, full * tile :].amin(dim=-1, keepdim=True))
    if not highs:
        return []
    largest = torch.maximum(torch.cat(highs, -1), -torch.cat(lows, -1))
    return (largest > threshold.unsqueeze(-1)).any(dim=0).tolist()


def _runs(keep: list[bool], tile: int, cols: int) -> list[slice]:
    """Column ranges of consecutive kept tiles: one matmul per run (one per block when nothing is skipped)."""
    runs, start = [], None
    for index, kept in enumerate([*keep, False]):
        if kept and start is None:
            start = index
        elif not kept and start is not None:
            runs.append(slice(start * tile, min(index * tile, cols)))
            start = None
    return runs


class _FusedOutputLoss(torch.autograd.Function):
    """See the module docstring. Returns ``(Σ_rows loss, per-token loss, hard CE, KL, entropy, agreement)``."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        vocab_size: int,
        rows: torch.Tensor,
        targets: dict,
        block_rows: int | None,
        tile_columns: int,
        inplace: bool,
        stats: list | None,
    ):
        n, vocab_part = hidden.shape[0], weight.shape[0]
        mm_dtype = _matmul_dtype(hidden, weight)
        loss_dtype = torch.float64 if mm_dtype == torch.float64 else torch.float32
        w_mm = weight.to(mm_dtype)
        pad = _pad_columns(vocab_part, vocab_size)
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        want_grad = need_hidden or need_weight
        grad_hidden = (
            torch.zeros(hidden.shape, dtype=loss_dtype, device=hidden.device) if need_hidden else None
        )
        grad_weight = (
            torch.zeros(weight.shape, dtype=loss_dtype, device=weight.device) if need_weight else None
        )
        # per-row L1 scale of the logit gradient: a tile is negligible below eps·scale/tile for every row
        tau = float(targets["temperature"])
        scale = tau * (targets["soft_w"].abs().sum(-1) + targets["tail_w"].abs())
        if targets["extra_w"] is not None:
            scale = scale + tau * targets["extra_w"].abs().sum(-1)
        if targets["hard_w"] is not None:
            scale = scale + targets["hard_w"].abs()
        upstream = rows.to(loss_dtype)
        step = block_rows or block_rows_for(hidden.shape[1], vocab_part)
        tiles = skipped = 0
        parts = []
        # one buffer for every block's logits (and then its gradient): no per-block allocation of [n, V/TP]
        buffer = torch.empty(min(step, n), vocab_part, dtype=loss_dtype, device=hidden.device)
        for start in range(0, max(n, 1), step):  # one (empty) block for zero rows
            block = slice(start, min(start + step, n))
            h_mm = hidden[block].to(mm_dtype)
            z = buffer[: h_mm.shape[0]]
            if mm_dtype == loss_dtype:
                torch.mm(h_mm, w_mm.t(), out=z)
            else:
                z.copy_(h_mm @ w_mm.t())
            if pad is not None:
                z[:, pad] = PAD_LOGIT
            args = {
                key: None if value is None else value[block] if torch.is_tensor(value) else value
                for key, value in targets.items()
            }
            if not want_grad:
                parts.append(topk_cross_entropy(z, **args, inplace=True))
                continue
            with torch.enable_grad():
                z.requires_grad_()
                out = topk_cross_entropy(z, **args, inplace=True)
                (grad_z,) = torch.autograd.grad(out.loss, z, grad_outputs=upstream[block])
            parts.append(TopKOutputs(*(value.detach() for value in out)))
            if pad is not None:
                grad_z[:, pad] = 0.0
            threshold = (torch.finfo(loss_dtype).eps / tile_columns) * scale[block]
            keep = _tiles_to_keep(grad_z, threshold, tile_columns)
            tiles, skipped = tiles + len(keep), skipped + keep.count(False)
            for cols in _runs(keep, tile_columns, vocab_part):
                g = grad_z[:, cols]
                if need_hidden:
                    _accumulate(grad_hidden[block], g, w_mm[cols])
                if need_weight:
                    _accumulate(grad_weight[cols], g.t(), h_mm)
        if stats is not None:
            stats.append(FusedStats(tiles, skipped))
        out = TopKOutputs(*(torch.cat(values) for values in zip(*parts, strict=True)))
        per_token = torch.where(rows, out.loss, torch.zeros_like(out.loss))
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.inplace = inplace
        ctx.dtypes = hidden.dtype, weight.dtype
        results = (per_token.sum(), *(value.detach() for value in (per_token, *out[1:])))
        ctx.mark_non_differentiable(*results[1:])
        return results

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor, *_unused):
        grads = []
        for saved, dtype in zip(ctx.saved_tensors, ctx.dtypes, strict=True):
            if saved is None:
                grads.append(None)
                continue
            go = grad_total.to(saved.dtype)
            # in place the saved gradient is consumed: the backward can run once
            grads.append((saved.mul_(go) if ctx.inplace else saved * go).to(dtype))
        return (*grads, *([None] * 7))


def fused_topk_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    vocab_size: int,
    rows: torch.Tensor,
    *,
    block_rows: int | None = None,
    tile_columns: int = TILE_COLUMNS,
    inplace: bool = True,
    stats: list | None = None,
    **targets,
) -> tuple[torch.Tensor, TopKOutputs]:
    """``topk_cross_entropy`` of the logits ``hidden @ weight.T`` without holding them; summed over ``rows``.

    ``hidden`` [N, h] (replicated over the TP ranks), ``weight`` [V/TP, h] this rank's shard; columns of
    global id >= ``vocab_size`` are vocabulary padding (logit ``PAD_LOGIT``, no gradient). ``targets`` are the
    arguments of ``topk_cross_entropy`` after the logits (``topk_ids``, ``topk_logprobs``, ``soft_w``,
    ``tail_w``, ``labels``, ``hard_w``, ``temperature``, ``extra_ids``, ``extra_w``). Returns the sum of the
    per-token loss over ``rows`` [N] bool (differentiable in ``hidden`` and ``weight``) and the per-token
    ``TopKOutputs`` (detached; ``loss`` 0 outside ``rows``). ``block_rows`` overrides the rows per block,
    ``tile_columns`` the vocabulary tile of the gradient matmuls; ``stats`` (a list) receives a ``FusedStats``.
    With ``inplace`` the backward consumes the saved gradients (it can run once); ``inplace=False`` allows
    repeated backwards (``retain_graph``, gradcheck).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"fused_topk_cross_entropy: expected hidden [N, h] and weight [V/TP, h]; got {tuple(hidden.shape)} "
            f"and {tuple(weight.shape)}"
        )
    if targets.get("extra_ids") is None:
        ids = targets["topk_ids"]
        targets["extra_ids"] = ids.new_empty(ids.shape[0], 0)
        targets["extra_w"] = targets["soft_w"].new_empty(ids.shape[0], 0)
    targets.setdefault("hard_w", None)
    targets.setdefault("temperature", 1.0)
    if vocab_shard(weight.shape[0]).group is not None:
        hidden = copy_to_tensor_model_parallel_region(hidden)
    total, *per_token = _FusedOutputLoss.apply(
        hidden, weight, vocab_size, rows.bool(), targets, block_rows, tile_columns, inplace, stats
    )
    return total, TopKOutputs(*per_token)


class OutputHead(NamedTuple):
    """What the output layer reads: final hidden states ``[..., h]``, this rank's weight shard ``[V/TP, h]``,
    and the true vocabulary size (the shard's columns past it are padding)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    vocab_size: int


def head_logits(head: OutputHead) -> torch.Tensor:
    """The vocab-parallel logits ``[..., V/TP]`` of ``head`` as the model's output layer makes them (padding
    columns at ``PAD_LOGIT``, no gradient there; the hidden gradient all-reduced over TP)."""
    hidden = head.hidden
    if vocab_shard(head.weight.shape[0]).group is not None:
        hidden = copy_to_tensor_model_parallel_region(hidden)
    logits = hidden @ head.weight.t()
    pad = _pad_columns(head.weight.shape[0], head.vocab_size)
    if pad is None:
        return logits
    columns = torch.arange(logits.shape[-1], device=logits.device)
    return logits.masked_fill(columns >= pad.start, PAD_LOGIT)


def fused_distillation_loss(
    head: OutputHead,
    batch: Mapping[str, torch.Tensor],
    settings: LossSettings,
    *,
    inplace: bool = True,
    block_rows: int | None = None,
    tile_columns: int = TILE_COLUMNS,
    stats: list | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``distillation_loss(head_logits(head), batch, settings)`` without the logits: the same loss and metrics.

    ``kind='hard'`` runs the fused kernel with the hard CE only (megatron-core's formula, and the metrics in the
    same pass). ``kind='mse'`` needs the logits at the teacher's ids plus the softmax: it takes the unfused path.
    ``inplace``, ``block_rows``, ``tile_columns`` and ``stats`` as for ``fused_topk_cross_entropy``.
    """
    if settings.kind == "mse":
        return distillation_loss(head_logits(head), batch, settings, inplace=inplace)
    hidden = head.hidden.reshape(-1, head.hidden.shape[-1])
    flat = _flat_batch(batch, hidden.shape[0], settings)
    has_loss, soft_rows, fallback = loss_rows(flat, settings)
    dtype = torch.float64 if torch.float64 in (hidden.dtype, head.weight.dtype) else torch.float32
    if settings.kind == "hard":
        contributing = has_loss
        zeros = torch.zeros(flat["topk_ids"].shape, dtype=dtype, device=hidden.device)
        targets = {
            "topk_ids": flat["topk_ids"],
            "topk_logprobs": flat["topk_logprobs"],
            "soft_w": zeros,
            "tail_w": torch.zeros(hidden.shape[0], dtype=dtype, device=hidden.device),
            "labels": flat["labels"],
            "hard_w": has_loss.to(dtype),
        }
    else:
        contributing = soft_rows | fallback
        targets = kernel_targets(flat, settings, soft_rows, fallback, dtype)
    total, out = fused_topk_cross_entropy(
        hidden,
        head.weight,
        head.vocab_size,
        contributing,
        block_rows=block_rows,
        tile_columns=tile_columns,
        inplace=inplace,
        stats=stats,
        **targets,
    )
    return summarize(total, contributing, soft_rows, out.hard_ce, out)
