"""Tests of the token ledger: rewards, replays, balances, queries and concurrency."""

import logging
import multiprocessing
import sqlite3
import time

import pytest

from hydraai.errors import InsufficientBalance, LedgerBusy, LedgerError, UnknownUser
from hydraai.ledger import NO_USER_REASON, Ledger, TaskOutcome

RUN = "demo"


def raw_sql(path, *statements):
    """Run SQL on the ledger file directly, bypassing every Ledger check."""
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        for statement in statements:
            connection.execute(statement)
    finally:
        connection.close()


def settle_one(ledger, node_id, user_id, assigned_steps, reported_steps, **kwargs):
    """Assign one task in round 1 and settle it as completed; return tokens paid."""
    ledger.assign_tasks(RUN, 1, [node_id], assigned_steps, assigned_examples=8)
    outcome = TaskOutcome(
        node_id, "completed", user_id, reported_steps=reported_steps, **kwargs
    )
    return ledger.settle_round(RUN, 1, [outcome])


# Opening


def test_new_ledger_creates_its_directory_in_wal_mode(ledger, ledger_path):
    assert ledger_path.is_file()
    connection = sqlite3.connect(ledger_path)
    try:
        mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
        tables = {
            row[0]
            for row in connection.execute("SELECT name FROM sqlite_master")
            if not row[0].startswith("sqlite_")
        }
    finally:
        connection.close()
    assert mode == "wal"
    assert {"users", "tasks", "journal", "queries"} <= tables


def test_foreign_keys_are_enforced(ledger):
    with pytest.raises(sqlite3.IntegrityError):
        ledger._db.execute(
            "INSERT INTO journal (user_id, amount, kind, created_at) "
            "VALUES ('nobody', 1, 'adjustment', 'now')"
        )


def test_reopening_keeps_the_data(funded_ledger, ledger_path):
    funded_ledger.close()
    with Ledger(ledger_path) as reopened:
        assert reopened.balance("alice") == 2.0


def test_a_file_that_is_not_a_database_is_refused(tmp_path):
    path = tmp_path / "notes.db"
    path.write_text("not a database, just some notes\n" * 100)
    with pytest.raises(LedgerError, match="notes.db"):
        Ledger(path)


def test_a_database_of_another_schema_is_refused(tmp_path):
    path = tmp_path / "other.db"
    raw_sql(path, "CREATE TABLE birds (name TEXT)")
    with pytest.raises(LedgerError, match="birds"):
        Ledger(path)


# Reward rule


@pytest.mark.parametrize(
    ("assigned_steps", "reported_steps", "reward"),
    [
        (5, 5, 2.0),  # all the work: the full reward
        (5, 3, 1.2),  # 2.0 * 3/5
        (8, 2, 0.5),  # 2.0 * 2/8
        (5, 9, 2.0),  # over-reporting is capped at the full reward
        (5, 0, 0.0),
        (0, 4, 0.0),  # no steps assigned: nothing to pay for
    ],
)
def test_reward_is_the_share_of_assigned_steps(
    ledger, assigned_steps, reported_steps, reward
):
    paid = settle_one(ledger, 7, "alice", assigned_steps, reported_steps)

    assert paid == reward
    assert ledger.balance("alice") == reward
    [task] = ledger.tasks()
    assert task["reward"] == reward
    assert task["status"] == "completed"


def test_reward_per_task_scales_the_reward(ledger_path):
    with Ledger(ledger_path, reward_per_task=3.0) as ledger:
        assert settle_one(ledger, 7, "alice", 8, 3) == 1.125  # 3.0 * 3/8


def test_rewards_are_rounded_to_six_decimals(ledger):
    assert settle_one(ledger, 7, "alice", 3, 1) == 0.666667  # 2.0 * 1/3


def test_rejected_and_failed_tasks_are_not_paid(ledger):
    ledger.assign_tasks(RUN, 1, [1, 2, 3], assigned_steps=5, assigned_examples=8)
    paid = ledger.settle_round(
        RUN,
        1,
        [
            TaskOutcome(1, "completed", "alice", reported_steps=5),
            TaskOutcome(
                2, "rejected", "alice", reason="loss too high", reported_steps=5
            ),
            TaskOutcome(3, "failed", "bob", reason="node disconnected"),
        ],
    )

    assert paid == 2.0
    assert ledger.balance("alice") == 2.0
    assert ledger.balance("bob") == 0.0
    by_node = {task["node_id"]: task for task in ledger.tasks()}
    assert by_node[2]["status"] == "rejected"
    assert by_node[2]["reason"] == "loss too high"
    assert by_node[2]["reward"] == 0.0
    assert by_node[3]["status"] == "failed"
    rewards = [entry["task_id"] for entry in ledger.history("alice")["journal"]]
    assert rewards == [by_node[1]["task_id"]]
    assert ledger.history("bob")["journal"] == []


def test_total_work_done_counts_completed_tasks_only(funded_ledger):
    work = {row["user_id"]: row["total_work_done"] for row in funded_ledger.balances()}
    assert work == {"alice": 1, "bob": 1, "carol": 0}


def test_settle_round_records_the_reported_work(funded_ledger):
    task = funded_ledger.tasks(run_name=RUN, server_round=1, status="completed")[0]
    assert task["user_id"] == "alice"
    assert task["assigned_steps"] == 5
    assert task["assigned_examples"] == 40
    assert task["reported_steps"] == 5
    assert task["reported_examples"] == 40
    assert task["reported_tokens"] == 5120
    assert task["train_loss"] == 3.25
    assert task["finished_at"] is not None


# Settling twice


def test_settling_a_round_again_pays_nothing_twice(funded_ledger):
    outcomes = [
        TaskOutcome(11, "completed", "alice", reported_steps=5),
        TaskOutcome(12, "completed", "bob", reported_steps=3),
    ]

    assert funded_ledger.settle_round(RUN, 1, outcomes) == 0.0
    assert funded_ledger.balance("alice") == 2.0
    assert funded_ledger.balance("bob") == 1.2
    assert funded_ledger.verify() == []


def test_a_replayed_round_pays_each_task_once(funded_ledger):
    # A resumed coordinator assigns round 1 again, to one new node as well
    funded_ledger.assign_tasks(RUN, 1, [11, 12, 13, 14], 5, 40)
    statuses = {task["node_id"]: task["status"] for task in funded_ledger.tasks()}
    assert statuses == {
        11: "completed",
        12: "completed",
        13: "rejected",
        14: "assigned",
    }

    paid = funded_ledger.settle_round(
        RUN,
        1,
        [
            TaskOutcome(11, "completed", "alice", reported_steps=5),
            TaskOutcome(13, "completed", "carol", reported_steps=5),
            TaskOutcome(14, "completed", "dave", reported_steps=4),
        ],
    )

    assert paid == 1.6  # only dave's new task: 2.0 * 4/5
    assert funded_ledger.balance("alice") == 2.0
    assert funded_ledger.balance("carol") == 0.0
    assert funded_ledger.verify() == []


def test_a_failed_task_assigned_again_is_paid_once(ledger):
    ledger.assign_tasks(RUN, 1, [5], 4, 8)
    ledger.settle_round(RUN, 1, [TaskOutcome(5, "failed", "alice", reason="timeout")])
    ledger.assign_tasks(RUN, 1, [5], 4, 8)
    [task] = ledger.tasks()
    assert (task["status"], task["reason"], task["user_id"]) == ("assigned", "", None)

    outcome = TaskOutcome(5, "completed", "alice", reported_steps=4)
    assert ledger.settle_round(RUN, 1, [outcome]) == 2.0
    assert ledger.settle_round(RUN, 1, [outcome]) == 0.0
    assert ledger.balance("alice") == 2.0


def test_an_outcome_for_an_unassigned_node_is_skipped(ledger, caplog):
    ledger.assign_tasks(RUN, 1, [1], 5, 8)
    with caplog.at_level(logging.WARNING, logger="hydraai.ledger"):
        paid = ledger.settle_round(
            RUN, 1, [TaskOutcome(99, "completed", "mallory", reported_steps=5)]
        )

    assert paid == 0.0
    assert "node 99" in caplog.text
    assert [task["node_id"] for task in ledger.tasks()] == [1]
    with pytest.raises(UnknownUser):
        ledger.balance("mallory")


def test_settle_round_is_all_or_nothing(ledger, ledger_path):
    ledger.assign_tasks(RUN, 1, [1, 2], 5, 8)
    # Pay task 2 behind the ledger's back, so settling it again must fail
    raw_sql(
        ledger_path,
        "INSERT INTO users (user_id, created_at) VALUES ('bob', 'now')",
        "INSERT INTO journal (user_id, amount, kind, task_id, created_at) "
        "VALUES ('bob', 2.0, 'reward', 2, 'now')",
    )

    with pytest.raises(sqlite3.IntegrityError):
        ledger.settle_round(
            RUN,
            1,
            [
                TaskOutcome(1, "completed", "alice", reported_steps=5),
                TaskOutcome(2, "completed", "bob", reported_steps=5),
            ],
        )

    # Node 1's reward was rolled back with the rest of the round
    assert {task["status"] for task in ledger.tasks()} == {"assigned"}
    with pytest.raises(UnknownUser):
        ledger.balance("alice")


@pytest.mark.parametrize("user_id", [None, ""])
def test_a_completion_without_a_user_id_is_recorded_as_rejected(
    ledger, caplog, user_id
):
    ledger.assign_tasks(RUN, 1, [1, 2], 5, 8)
    with caplog.at_level(logging.WARNING, logger="hydraai.ledger"):
        paid = ledger.settle_round(
            RUN,
            1,
            [
                TaskOutcome(1, "completed", user_id, reported_steps=5),
                TaskOutcome(2, "completed", "alice", reported_steps=5),
            ],
        )

    assert paid == 2.0
    first, second = ledger.tasks()
    assert (first["status"], first["user_id"], first["reward"]) == ("rejected", None, 0)
    assert first["reason"] == NO_USER_REASON
    assert "Node 1" in caplog.text
    assert second["status"] == "completed"
    assert [row["user_id"] for row in ledger.balances()] == ["alice"]


@pytest.mark.parametrize("node_id", [-1, 2**64, "7", 1.5, True])
def test_node_ids_outside_unsigned_64_bit_are_refused(ledger, node_id):
    with pytest.raises(ValueError, match="node id"):
        ledger.assign_tasks(RUN, 1, [node_id], 5, 8)


def test_node_ids_beyond_signed_64_bit_round_trip(ledger):
    largest = 2**64 - 1
    assert settle_one(ledger, largest, "alice", 5, 5) == 2.0
    [task] = ledger.tasks()
    assert task["node_id"] == largest
    assert ledger.history("alice")["tasks"][0]["node_id"] == largest
    assert ledger.export()["tasks"][0]["node_id"] == largest


def test_fail_unfinished_fails_only_assigned_tasks_of_the_run(funded_ledger):
    funded_ledger.assign_tasks(RUN, 2, [11, 12], 5, 40)
    funded_ledger.assign_tasks("other", 1, [11], 5, 40)

    assert funded_ledger.fail_unfinished(RUN, "coordinator restarted") == 2

    round_2 = funded_ledger.tasks(run_name=RUN, server_round=2)
    assert {task["status"] for task in round_2} == {"failed"}
    assert {task["reason"] for task in round_2} == {"coordinator restarted"}
    assert len(funded_ledger.tasks(run_name=RUN, status="completed")) == 2
    assert funded_ledger.tasks(run_name="other")[0]["status"] == "assigned"
    assert funded_ledger.fail_unfinished(RUN, "again") == 0


# Reading


def test_balances_equal_journal_sums(funded_ledger):
    funded_ledger.debit("alice", 0.25, note="test")
    funded_ledger.credit("bob", 1.0, note="bonus")

    rows = funded_ledger.balances()

    assert [row["user_id"] for row in rows] == ["bob", "alice", "carol"]
    for row in rows:
        journal = funded_ledger.history(row["user_id"])["journal"]
        assert row["balance"] == pytest.approx(sum(e["amount"] for e in journal))
    assert [row["balance"] for row in rows] == [2.2, 1.75, 0.0]
    assert all(row["last_activity"] for row in rows)


def test_history_lists_a_users_journal_and_tasks(funded_ledger):
    history = funded_ledger.history("bob")
    [entry] = history["journal"]
    [task] = history["tasks"]
    assert (entry["kind"], entry["amount"], entry["task_id"]) == (
        "reward",
        1.2,
        task["task_id"],
    )
    assert (task["node_id"], task["reported_steps"]) == (12, 3)


def test_unknown_users_raise(ledger):
    with pytest.raises(UnknownUser, match="'zed'"):
        ledger.balance("zed")
    with pytest.raises(UnknownUser):
        ledger.history("zed")
    with pytest.raises(UnknownUser):
        ledger.credit("zed", 1.0)


def test_tasks_filters_combine(funded_ledger):
    funded_ledger.assign_tasks(RUN, 2, [11], 5, 40)
    assert len(funded_ledger.tasks()) == 4
    assert [t["node_id"] for t in funded_ledger.tasks(server_round=2)] == [11]
    assert [t["node_id"] for t in funded_ledger.tasks(status="rejected")] == [13]
    assert funded_ledger.tasks(run_name="other") == []
    with pytest.raises(ValueError, match="status"):
        funded_ledger.tasks(status="done")


def test_export_holds_every_table(funded_ledger):
    tables = funded_ledger.export()
    assert {name: len(rows) for name, rows in tables.items()} == {
        "users": 3,
        "tasks": 3,
        "journal": 2,
        "queries": 0,
    }


# Manual credits and debits


def test_debit_never_takes_a_balance_below_zero(funded_ledger):
    with pytest.raises(InsufficientBalance, match="1.2 tokens"):
        funded_ledger.debit("bob", 1.3)
    assert funded_ledger.balance("bob") == 1.2

    funded_ledger.debit("bob", 1.2)
    assert funded_ledger.balance("bob") == 0.0


@pytest.mark.parametrize("amount", [0, -1.0, float("nan"), float("inf")])
def test_amounts_must_be_positive(funded_ledger, amount):
    with pytest.raises(ValueError, match="amount"):
        funded_ledger.credit("alice", amount)
    with pytest.raises(ValueError, match="amount"):
        funded_ledger.debit("alice", amount)


def test_rewards_cannot_be_credited_by_hand(funded_ledger):
    with pytest.raises(ValueError, match="settle_round"):
        funded_ledger.credit("alice", 1.0, kind="reward")


def test_the_journal_is_append_only(funded_ledger, ledger_path):
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        raw_sql(ledger_path, "UPDATE journal SET amount = 100")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        raw_sql(ledger_path, "DELETE FROM journal")


def test_a_task_can_hold_only_one_reward_entry(funded_ledger, ledger_path):
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        raw_sql(
            ledger_path,
            "INSERT INTO journal (user_id, amount, kind, task_id, created_at) "
            "VALUES ('alice', 2.0, 'reward', 1, 'now')",
        )


# Verify


def test_verify_passes_a_healthy_ledger(funded_ledger):
    funded_ledger.charge_query("alice", "hi", str.upper)
    assert funded_ledger.verify() == []


def test_verify_finds_a_corrupted_balance(funded_ledger, ledger_path):
    raw_sql(ledger_path, "UPDATE users SET total_tokens = 50 WHERE user_id = 'bob'")
    assert funded_ledger.verify() == [
        "User 'bob' has a balance of 50.0 tokens but their journal sums to 1.2."
    ]


def test_verify_finds_a_negative_balance(funded_ledger, ledger_path):
    raw_sql(
        ledger_path,
        "UPDATE users SET total_tokens = -1 WHERE user_id = 'carol'",
        "INSERT INTO journal (user_id, amount, kind, created_at) "
        "VALUES ('carol', -1, 'adjustment', 'now')",
    )
    assert funded_ledger.verify() == [
        "User 'carol' has a negative balance of -1.0 tokens."
    ]


def test_verify_finds_a_reward_on_a_task_not_completed(funded_ledger, ledger_path):
    raw_sql(ledger_path, "UPDATE tasks SET status = 'rejected' WHERE node_id = '11'")
    problems = funded_ledger.verify()
    assert (
        "Journal entry 1 pays a reward for task 1, which is rejected, not completed."
        in problems
    )
    assert "User 'alice' has total_work_done 1 but 0 completed tasks." in problems


def test_verify_finds_a_task_paid_twice(funded_ledger, ledger_path):
    raw_sql(
        ledger_path,
        "DROP INDEX journal_one_reward_per_task",
        "INSERT INTO journal (user_id, amount, kind, task_id, created_at) "
        "VALUES ('alice', 2.0, 'reward', 1, 'now')",
        "UPDATE users SET total_tokens = 4 WHERE user_id = 'alice'",
    )
    assert funded_ledger.verify() == [
        "Task 1 has 2 reward entries; expected one.",
        "Task 1 records a reward of 2.0 but the journal paid 4.0 for it.",
    ]


def test_verify_finds_a_reward_column_that_disagrees(funded_ledger, ledger_path):
    raw_sql(ledger_path, "UPDATE tasks SET reward = 0.3 WHERE node_id = '12'")
    assert funded_ledger.verify() == [
        "Task 2 records a reward of 0.3 but the journal paid 1.2 for it."
    ]


# Queries


def test_charge_query_lowers_the_balance_by_the_cost(funded_ledger):
    prompts = []

    def generate(prompt):
        prompts.append(prompt)
        return prompt + " and the sea."

    text = funded_ledger.charge_query("alice", "The river", generate)

    assert text == "The river and the sea."
    assert prompts == ["The river"]
    assert funded_ledger.balance("alice") == 1.5
    entry = funded_ledger.history("alice")["journal"][-1]
    assert (entry["kind"], entry["amount"]) == ("query", -0.5)
    [query] = funded_ledger.export()["queries"]
    assert (query["query_id"], query["status"]) == (entry["query_id"], "answered")
    assert funded_ledger.verify() == []


def test_an_insufficient_balance_is_refused_and_nothing_charged(funded_ledger):
    def generate(prompt):
        raise AssertionError("generate must not run for a refused query")

    with pytest.raises(InsufficientBalance) as refused:
        funded_ledger.charge_query("bob", "hi", generate, cost=1.5)

    assert "balance of 1.2 tokens" in str(refused.value)
    assert "costs 1.5" in str(refused.value)
    assert funded_ledger.balance("bob") == 1.2
    assert len(funded_ledger.history("bob")["journal"]) == 1
    assert funded_ledger.export()["queries"] == []


def test_a_query_by_an_unknown_user_is_refused(funded_ledger):
    with pytest.raises(UnknownUser):
        funded_ledger.charge_query("zed", "hi", str.upper)


def test_a_failed_generation_is_refunded(funded_ledger):
    def generate(prompt):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        funded_ledger.charge_query("alice", "hi", generate)

    assert funded_ledger.balance("alice") == 2.0
    debit, refund = funded_ledger.history("alice")["journal"][-2:]
    assert (debit["kind"], debit["amount"]) == ("query", -0.5)
    assert (refund["kind"], refund["amount"]) == ("refund", 0.5)
    assert refund["query_id"] == debit["query_id"]
    assert funded_ledger.export()["queries"][0]["status"] == "refunded"
    assert funded_ledger.verify() == []


def test_a_write_waits_then_raises_busy_while_another_process_writes(
    funded_ledger, ledger_path
):
    holder = sqlite3.connect(ledger_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with Ledger(ledger_path, timeout=0.2) as waiting:
            # Reading is not blocked by the writer in WAL mode
            assert waiting.balance("alice") == 2.0
            started = time.monotonic()
            with pytest.raises(LedgerBusy, match="locked"):
                waiting.charge_query("alice", "hi", str.upper)
            assert time.monotonic() - started >= 0.2
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert funded_ledger.balance("alice") == 2.0


def charge_in_process(path, barrier, results):
    """Open the ledger, wait for every process, then charge alice 0.5 at once."""
    with Ledger(path) as ledger:
        barrier.wait(timeout=60)
        try:
            ledger.charge_query("alice", "hi", str.upper, cost=0.5)
            results.put("charged")
        except InsufficientBalance:
            results.put("refused")
        except Exception as exc:
            results.put(repr(exc))


def test_concurrent_queries_never_overdraw(funded_ledger, ledger_path):
    # alice holds 2.0: six processes charging 0.5 at once leave exactly four paid
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(6)
    results = context.Queue()
    processes = [
        context.Process(target=charge_in_process, args=(ledger_path, barrier, results))
        for _ in range(6)
    ]
    for process in processes:
        process.start()
    outcomes = sorted(results.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)

    assert outcomes == ["charged"] * 4 + ["refused"] * 2
    assert [process.exitcode for process in processes] == [0] * 6
    assert funded_ledger.balance("alice") == 0.0
    assert funded_ledger.verify() == []
