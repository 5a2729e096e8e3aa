"""The optimiser and learning-rate schedule shared by every trained method."""

from __future__ import annotations

import math

import torch

WARMUP_STEPS = 100
COSINE_FLOOR = 0.01  # cosine decay ends at this share of the learning rate, not at zero


def lr_factor(step: int, total_steps: int, schedule: str = "constant", warmup_steps: int = WARMUP_STEPS) -> float:
    """Multiplier of the learning rate at optimisation ``step`` (0-based).

    Linear warm-up over the first ``warmup_steps``, then ``constant`` (nothing depends on the epoch
    count, so a resumed run given more epochs continues as an uninterrupted one would) or ``cosine``
    decay to ``COSINE_FLOOR`` at ``total_steps`` (quieter last epochs; the schedule follows the epoch
    count the run was started with).
    """
    warm = min(1.0, (step + 1) / warmup_steps)
    if schedule == "constant":
        return warm
    if schedule != "cosine":
        raise ValueError(f"unknown learning-rate schedule {schedule!r} (constant or cosine)")
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0, step + 1 - warmup_steps) / span)
    return warm * (COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))


def configure_adamw(module, parameters, learning_rate: float, weight_decay: float, schedule: str = "constant") -> dict:
    """AdamW with the per-step schedule of ``lr_factor``, in the form Lightning's configure_optimizers returns."""
    opt = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    total, warmup = 0, WARMUP_STEPS
    if schedule != "constant":
        total = int(module.trainer.estimated_stepping_batches)
        warmup = min(WARMUP_STEPS, max(1, total // 10))  # a short run still spends most of its steps decaying
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total, schedule, warmup))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
