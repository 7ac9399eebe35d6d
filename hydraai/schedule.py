"""The local learning-rate warmup, shared by training and the update defences."""

from __future__ import annotations

import torch


def warmup_factors(steps: int, warmup_steps: int) -> list[float]:
    """Each step's share of the learning rate under a linear warmup.

    Step i (from 0) trains at (i + 1) / (warmup_steps + 1) of the rate until
    it reaches the full rate, so exactly warmup_steps steps run below it.
    """
    return [min(1.0, (i + 1) / (warmup_steps + 1)) for i in range(steps)]


def warmup(
    optimizer: torch.optim.Optimizer, warmup_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """A scheduler that follows warmup_factors; call its step() after each step."""
    return torch.optim.lr_scheduler.LinearLR(
        optimizer,
        start_factor=1.0 / (warmup_steps + 1),
        total_iters=max(warmup_steps, 1),
    )
