"""Local training and evaluation loops, shared by the ClientApp and the server."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from hydraai.data import eval_windows, random_batch
from hydraai.model import SimpleTransformer
from hydraai.schedule import warmup

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainReport:
    """What one bout of local training did."""

    steps: int
    examples: int
    tokens: int
    loss: float
    seconds: float


def train_steps(
    model: SimpleTransformer,
    tokens: torch.Tensor,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    warmup_steps: int = 0,
) -> TrainReport:
    """Run `steps` AdamW steps on random windows of a token stream.

    The AdamW is new each call, and a new Adam's first steps move every
    parameter by about a full learning rate whatever its gradient, so the
    first warmup_steps steps ramp the rate up linearly (see warmup_factors).
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    schedule = warmup(optimizer, warmup_steps)
    block_size = model.config.block_size
    model.train()

    start = time.perf_counter()
    losses, trained_tokens = [], 0
    for step in range(steps):
        x, y = random_batch(tokens, batch_size, block_size, generator)
        x, y = x.to(device), y.to(device)
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        trained_tokens += x.numel()
        logger.debug("step %d/%d loss %.4f", step + 1, steps, losses[-1])

    return TrainReport(
        steps=steps,
        examples=steps * batch_size,
        tokens=trained_tokens,
        loss=sum(losses) / len(losses),
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def evaluate_loss(
    model: SimpleTransformer,
    tokens: torch.Tensor,
    max_windows: int = 64,
    batch_size: int = 16,
) -> tuple[float, int]:
    """Mean next-token loss over the first windows of a stream, and tokens scored."""
    device = next(model.parameters()).device
    x, y = eval_windows(tokens, model.config.block_size, max_windows)
    model.eval()

    total, count = 0.0, 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        _, loss = model(xb, yb)
        total += loss.item() * yb.numel()
        count += yb.numel()
    return total / count, count


def perplexity(loss: float) -> float:
    """exp(loss), capped so that a diverged model reports a finite number."""
    return math.exp(min(loss, 50.0))
