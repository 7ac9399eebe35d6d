"""The local warmup: its factors by hand, and torch's scheduler following them."""

import pytest
import torch

from hydraai.schedule import warmup, warmup_factors


def test_warmup_factors_by_hand():
    assert warmup_factors(4, 0) == [1.0, 1.0, 1.0, 1.0]
    assert warmup_factors(5, 3) == [0.25, 0.5, 0.75, 1.0, 1.0]
    # A warmup longer than the task never reaches the full rate.
    assert warmup_factors(2, 3) == [0.25, 0.5]


@pytest.mark.parametrize("warmup_steps", [0, 1, 5, 12])
def test_scheduler_trains_each_step_at_its_factor(warmup_steps):
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([weight], lr=0.003)
    schedule = warmup(optimizer, warmup_steps)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        weight.grad = torch.ones(1)
        optimizer.step()
        schedule.step()
    expected = [0.003 * f for f in warmup_factors(10, warmup_steps)]
    assert rates == pytest.approx(expected)
