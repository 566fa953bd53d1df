"""Hard cross-entropy: megatron-core's ``vocab_parallel_cross_entropy`` (docs/losses.md "Hard cross-entropy")."""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy


def hard_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position ``logsumexp(z) − z_y`` over vocab-parallel logits ``[..., V/TP]``; returns ``labels.shape``.

    This is megatron-core's function as is (label smoothing 0: its smoothing is wrong under TP). It needs
    megatron-core's model parallel state, and overwrites float32 ``logits`` (it uses them as its softmax buffer).
    """
    flat = logits.reshape(-1, logits.shape[-1])
    return vocab_parallel_cross_entropy(flat, labels.reshape(-1).long(), 0.0).view(labels.shape)
