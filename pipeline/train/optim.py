"""AdamW and the learning-rate schedule of the trainer: linear warmup, then cosine, linear or constant."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from pipeline.train.settings import SCHEDULES


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases and norm weights (1-D tensors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def lr_factor(
    warmup_steps: int, decay_steps: int, schedule: str = "cosine", min_ratio: float = 0.1
) -> Callable[[int], float]:
    """Multiplier of the base LR at step s (0-based): (s + 1) / warmup during warmup, then decay.

    The decay runs from the end of warmup to `decay_steps` (total steps), down to `min_ratio`, and stays
    there; with `decay_steps` <= warmup (e.g. an open-ended run) the LR stays at its base after warmup.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"lr schedule: expected one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min lr ratio: expected a value in [0, 1], got {min_ratio}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = decay_steps - warmup_steps
        if schedule == "constant" or span <= 0:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / span)
        if schedule == "linear":
            return 1.0 - (1.0 - min_ratio) * progress
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    decay_steps: int,
    schedule: str = "cosine",
    min_ratio: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimizer step (its state_dict goes into checkpoints)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(warmup_steps, decay_steps, schedule, min_ratio)
    )
