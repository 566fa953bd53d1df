"""Learning-rate schedule: linear warmup to the peak, then cosine decay to ``min_lr`` at the last step."""

from __future__ import annotations

import math

import torch

from student.settings import TrainSettings


def lr_at(step: int, settings: TrainSettings) -> float:
    """Learning rate of optimizer step ``step`` (0-based)."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    span = max(settings.steps - settings.warmup_steps, 1)
    progress = min((step - settings.warmup_steps) / span, 1.0)
    return settings.min_lr + 0.5 * (settings.lr - settings.min_lr) * (1 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, settings: TrainSettings
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` whose factor times the peak ``lr`` is ``lr_at``; its state dict is the step count."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, settings) / settings.lr)
