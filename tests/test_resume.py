"""A coordinator killed mid-round resumes with nothing paid twice or lost."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from faulty_clients import faulty_client_app
from helpers import simulate, tiny_config

from hydraai.checkpoint import Checkpoint
from hydraai.launch import descendants
from hydraai.ledger import Ledger

TESTS = Path(__file__).parent
# The coordinator process: a tiny run whose nodes take SLOW seconds in round 2.
COORDINATOR = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from faulty_clients import faulty_client_app
from helpers import simulate, tiny_config
config = tiny_config(Path({tmp!r}), num_server_rounds=3, fraction_evaluate=0.0)
app = faulty_client_app({{0: "slow", 1: "slow"}}, Path({tmp!r}), silent_seconds=60)
simulate(config, num_supernodes=2, client_app=app)
"""


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def round_tasks(ledger_path, server_round):
    if not ledger_path.exists():
        return []
    with Ledger(ledger_path) as ledger:
        return ledger.tasks(run_name="tiny", server_round=server_round)


def kill_now(process):
    """SIGKILL a process and everything below it, as a crash or power cut would."""
    family = descendants(process.pid)
    for pid in [process.pid, *family]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)


def test_coordinator_killed_mid_round_resumes_exactly_once(tmp_path):
    run_dir = tmp_path / "outputs" / "tiny"
    ledger_path = tmp_path / "outputs" / "ledger.db"
    script = COORDINATOR.format(tests=str(TESTS), tmp=str(tmp_path))
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    # Kill the coordinator once round 1 is checkpointed and round 2 is under way.
    try:
        wait_for(lambda: len(round_tasks(ledger_path, 2)) == 2, 180, "round 2 to start")
    finally:
        kill_now(process)
    assert Checkpoint.load(run_dir).server_round == 1
    before = json.loads((run_dir / "metrics.json").read_text())
    weights = Checkpoint.load(run_dir).arrays
    assert {t["status"] for t in round_tasks(ledger_path, 2)} == {"assigned"}

    # Start it again with the same run-name: it resumes at round 2.
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    config = tiny_config(tmp_path, num_server_rounds=3, fraction_evaluate=0.0)
    records = simulate(config, client_app=faulty_client_app({}, record_dir))
    assert [r["server_round"] for r in records] == [0, 1, 2, 3]
    assert records[:2] == before
    assert Checkpoint.load(run_dir).server_round == 3

    # Round 2 started from the checkpoint's weights, exactly.
    sent = np.load(record_dir / "honest-2.npz")
    for name, value in weights.items():
        np.testing.assert_array_equal(sent[f"sent/{name}"], value)

    # One reward per completed task; the interrupted tasks failed unpaid.
    with Ledger(ledger_path) as ledger:
        tasks = ledger.tasks(run_name="tiny")
        balances = {row["user_id"]: row["balance"] for row in ledger.balances()}
        assert ledger.verify() == []
    interrupted = [t for t in tasks if t["status"] == "failed"]
    assert len(interrupted) == 2
    assert all("coordinator stopped" in t["reason"] for t in interrupted)
    assert all(t["server_round"] == 2 and t["reward"] == 0 for t in interrupted)
    completed = [
        (t["server_round"], t["user_id"]) for t in tasks if t["status"] == "completed"
    ]
    assert sorted(completed) == sorted(
        (r, f"volunteer-{p}") for r in (1, 2, 3) for p in (0, 1)
    )
    assert balances == {"volunteer-0": 6.0, "volunteer-1": 6.0}
