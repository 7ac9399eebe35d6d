"""Fixtures for the ledger tests: a fresh ledger file, and one with paid users."""

import pytest

from hydraai.ledger import Ledger, TaskOutcome


@pytest.fixture
def ledger_path(tmp_path):
    """Where a fresh ledger goes, in a directory that does not exist yet."""
    return tmp_path / "outputs" / "ledger.db"


@pytest.fixture
def ledger(ledger_path):
    """A new, empty ledger at ledger_path, paying the default 2.0 per task."""
    with Ledger(ledger_path) as ledger:
        yield ledger


@pytest.fixture
def funded_ledger(ledger):
    """The ledger after round 1 of run 'demo', with 5 steps assigned per node.

    Node 11 (alice) reported all 5 steps and earned 2.0; node 12 (bob) reported
    3 and earned 2.0 * 3/5 = 1.2; node 13 (carol) was rejected and earned 0.
    """
    ledger.assign_tasks("demo", 1, [11, 12, 13], assigned_steps=5, assigned_examples=40)
    ledger.settle_round(
        "demo",
        1,
        [
            TaskOutcome(
                11,
                "completed",
                "alice",
                reported_steps=5,
                reported_examples=40,
                reported_tokens=5120,
                train_loss=3.25,
            ),
            TaskOutcome(12, "completed", "bob", reported_steps=3, train_loss=3.5),
            TaskOutcome(13, "rejected", "carol", reason="train_loss is NaN"),
        ],
    )
    return ledger
