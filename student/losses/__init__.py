"""Vocab-parallel distillation losses over megatron-core tensor-parallel logits; the math is docs/losses.md.

- ``soft_cross_entropy``: soft CE over the teacher's top-k (tails none / renormalize / tail_bucket / actual_bin,
  temperature);
- ``sampled_cross_entropy``, ``sampled_targets``: soft CE against unbiased sampled targets, and those targets;
- ``hard_cross_entropy``: megatron-core's ``vocab_parallel_cross_entropy`` (the hard baseline);
- ``logit_mse``: MSE against the teacher's raw top-k logits;
- ``distillation_loss``: what the training loop calls: the configured loss, masks, α mix, and metrics;
- ``student.losses.fused`` (import it from there: it reads the model's ``PAD_LOGIT``): the output layer and the
  loss in one Function that never holds the logits, ``fused_distillation_loss(OutputHead(hidden, weight,
  vocab_size), batch, settings)``, the training default.
"""

from student.losses.distill import METRIC_SUMS, distillation_loss
from student.losses.hard import hard_cross_entropy
from student.losses.mse import logit_mse
from student.losses.targets import sampled_targets
from student.losses.topk_cross_entropy import (
    TopKOutputs,
    sampled_cross_entropy,
    soft_cross_entropy,
    topk_cross_entropy,
)

__all__ = [
    "METRIC_SUMS",
    "TopKOutputs",
    "distillation_loss",
    "hard_cross_entropy",
    "logit_mse",
    "sampled_cross_entropy",
    "sampled_targets",
    "soft_cross_entropy",
    "topk_cross_entropy",
]
