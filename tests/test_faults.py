"""Fault injection: misbehaving volunteers beside an honest one, in real simulations.

Each scenario runs the real ServerApp against the ClientApp of faulty_clients,
in which partition 0 is honest and every other partition has one fault. Every
fault must leave the run completed, its task recorded with the right status
and reason and unpaid, the honest volunteer paid, and the global model exactly
what the honest reply alone produces.
"""

import math

import numpy as np
import pytest
from faulty_clients import faulty_client_app, honest_expectation
from helpers import simulate, tiny_config

from hydraai.checkpoint import Checkpoint
from hydraai.ledger import Ledger

# partition-id -> (fault, expected status, words of the expected reason)
MALFORMED = {
    1: ("nan", "rejected", "NaN or infinite"),
    2: ("inf", "rejected", "NaN or infinite"),
    3: ("missing-array", "rejected", "array names differ: missing"),
    4: ("extra-array", "rejected", "unexpected ['backdoor.weight']"),
    5: ("renamed-array", "rejected", "array names differ"),
    6: ("wrong-shape", "rejected", "expected float32"),
    7: ("wrong-dtype", "rejected", "is float64"),
    8: ("missing-metrics", "rejected", "metric 'num-examples' is missing"),
    9: ("non-numeric-metrics", "rejected", "no 'metrics' record"),
    10: ("inflated-examples", "rejected", "claims 1000000000 examples"),
}
POISONED = {
    1: ("scaled-1e3", "rejected", "update too large"),
    2: ("scaled-1e6", "rejected", "update too large"),
    3: ("sign-flip", "rejected", "does not point downhill"),
    4: ("free-rider", "rejected", "free rider"),
    5: ("error", "failed", "injected failure"),
    6: ("noise", "rejected", "does not point downhill"),
}
# Two rounds: in round 2 the stale node replays its round-1 reply and the
# silent node sleeps past the round timeout. The timeout leaves round 1, which
# pays for starting Ray, time to finish.
LATE = {
    1: ("stale", "rejected", "stale or replayed"),
    2: ("silent", "failed", "no reply before the round timeout"),
}
ROUND_TIMEOUT = 45.0


def run_scenario(tmp_path_factory, name, cases, rounds=1, **changes):
    tmp_path = tmp_path_factory.mktemp(name)
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    config = tiny_config(
        tmp_path, num_server_rounds=rounds, fraction_evaluate=0.0, **changes
    )
    app = faulty_client_app(
        {pid: fault for pid, (fault, _, _) in cases.items()},
        record_dir,
        silent_seconds=ROUND_TIMEOUT + 5,
    )
    records = simulate(config, num_supernodes=len(cases) + 1, client_app=app)
    with Ledger(tmp_path / "outputs" / "ledger.db") as ledger:
        tasks = ledger.tasks(run_name="tiny")
        balances = {row["user_id"]: row["balance"] for row in ledger.balances()}
        problems = ledger.verify()
    return {
        "config": config,
        "records": records,
        "tasks": tasks,
        "balances": balances,
        "problems": problems,
        "checkpoint": Checkpoint.load(tmp_path / "outputs" / "tiny"),
        "record_dir": record_dir,
    }


@pytest.fixture(scope="module")
def malformed(tmp_path_factory):
    return run_scenario(tmp_path_factory, "malformed", MALFORMED)


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    return run_scenario(tmp_path_factory, "poisoned", POISONED)


@pytest.fixture(scope="module")
def late(tmp_path_factory):
    return run_scenario(
        tmp_path_factory, "late", LATE, rounds=2, round_timeout=ROUND_TIMEOUT
    )


def task_of(result, partition_id, server_round):
    """The task of the node with this partition-id; error replies carry no user."""
    user = f"volunteer-{partition_id}"
    rows = [t for t in result["tasks"] if t["server_round"] == server_round]
    mine = [t for t in rows if t["user_id"] == user]
    if not mine:
        mine = [t for t in rows if t["user_id"] is None]
    assert len(mine) == 1, rows
    return mine[0]


def check_fault(result, partition_id, cases, server_round):
    fault, status, reason = cases[partition_id]
    rounds = result["config"].num_server_rounds

    # The run completed every round.
    assert [r["server_round"] for r in result["records"]] == list(range(rounds + 1))

    # The faulty task is recorded with its status and reason, and unpaid.
    task = task_of(result, partition_id, server_round)
    assert task["status"] == status, (fault, task)
    assert reason in task["reason"], (fault, task["reason"])
    assert task["reward"] == 0
    assert result["balances"].get(f"volunteer-{partition_id}", 0.0) <= 2.0 * (
        server_round - 1
    )

    # The honest volunteer is paid for every round, and the ledger is sound.
    assert result["balances"]["volunteer-0"] == pytest.approx(2.0 * rounds)
    assert result["problems"] == []

    # The global model is finite and is what the honest reply alone gives.
    expected = honest_expectation(result["record_dir"], rounds, blend_rate=0.1)
    arrays = result["checkpoint"].arrays
    for name, value in expected.items():
        assert np.isfinite(arrays[name]).all()
        np.testing.assert_allclose(arrays[name], value, rtol=0, atol=1e-6)
    assert math.isfinite(result["records"][-1]["val_loss"])


@pytest.mark.parametrize(
    "partition_id", sorted(MALFORMED), ids=lambda p: MALFORMED[p][0]
)
def test_malformed_reply(malformed, partition_id):
    check_fault(malformed, partition_id, MALFORMED, server_round=1)


@pytest.mark.parametrize("partition_id", sorted(POISONED), ids=lambda p: POISONED[p][0])
def test_poisoned_or_failed_reply(poisoned, partition_id):
    check_fault(poisoned, partition_id, POISONED, server_round=1)


@pytest.mark.parametrize("partition_id", sorted(LATE), ids=lambda p: LATE[p][0])
def test_stale_or_missing_reply(late, partition_id):
    check_fault(late, partition_id, LATE, server_round=2)


def test_stale_node_was_paid_for_its_fresh_round(late):
    assert task_of(late, 1, server_round=1)["status"] == "completed"
    assert late["balances"]["volunteer-1"] == pytest.approx(2.0)
