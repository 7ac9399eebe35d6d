"""Tests of the hydra-ledger command, run in-process against real ledger files."""

import csv
import io
import json
import sqlite3

import pytest
from typer.testing import CliRunner

from hydraai import ledger_cli
from hydraai.ledger_cli import app

COMMANDS = ["balances", "history", "tasks", "query", "verify", "export", "report"]


@pytest.fixture
def invoke(ledger_path):
    """Run hydra-ledger with --db pointing at ledger_path; return the result."""
    runner = CliRunner()

    def run(*args, env=None):
        return runner.invoke(app, ["--db", str(ledger_path), *args], env=env)

    return run


def assert_one_line_error(result, exit_code, *fragments):
    """Check that a command failed with one clean line on stderr, no traceback."""
    assert result.exit_code == exit_code, result.output
    assert isinstance(result.exception, SystemExit)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert result.stdout == ""


def journal_length(ledger, user_id):
    return len(ledger.history(user_id)["journal"])


# balances


def test_balances_prints_a_table_highest_first(funded_ledger, invoke):
    result = invoke("balances")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    rows = [line.split()[:3] for line in lines if line.startswith(("alice", "bob"))]
    assert rows == [["alice", "2", "1"], ["bob", "1.2", "1"]]
    assert "carol" in result.stdout


def test_balances_json_parses(funded_ledger, invoke):
    result = invoke("balances", "--json")
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    assert [(r["user_id"], r["balance"], r["total_work_done"]) for r in rows] == [
        ("alice", 2.0, 1),
        ("bob", 1.2, 1),
        ("carol", 0.0, 0),
    ]


def test_balances_of_an_empty_ledger(ledger, invoke):
    result = invoke("balances")
    assert result.exit_code == 0
    assert "No users yet" in result.stdout
    assert json.loads(invoke("balances", "--json").stdout) == []


def test_db_defaults_to_the_environment_variable(funded_ledger, ledger_path):
    result = CliRunner().invoke(
        app, ["balances", "--json"], env={"HYDRA_LEDGER_DB": str(ledger_path)}
    )
    assert result.exit_code == 0
    assert len(json.loads(result.stdout)) == 3


# history


def test_history_shows_journal_and_tasks(funded_ledger, invoke):
    result = invoke("history", "bob")
    assert result.exit_code == 0
    assert result.stdout.startswith("bob: balance 1.2 tokens, 1 completed tasks")
    assert "reward" in result.stdout
    assert "3/5" in result.stdout


def test_history_json_parses(funded_ledger, invoke):
    history = json.loads(invoke("history", "carol", "--json").stdout)
    assert (history["user_id"], history["balance"]) == ("carol", 0.0)
    assert history["journal"] == []
    [task] = history["tasks"]
    assert (task["status"], task["reason"]) == ("rejected", "train_loss is NaN")


def test_history_of_an_unknown_user_fails(funded_ledger, invoke):
    assert_one_line_error(invoke("history", "zed"), 1, "'zed'")


# tasks


def test_tasks_prints_a_table(funded_ledger, invoke):
    result = invoke("tasks", "--status", "rejected")
    assert result.exit_code == 0
    assert "rejected" in result.stdout
    assert "completed" not in result.stdout


def test_tasks_json_filters(funded_ledger, invoke):
    rows = json.loads(invoke("tasks", "--run", "demo", "--round", "1", "--json").stdout)
    assert [(r["node_id"], r["status"]) for r in rows] == [
        (11, "completed"),
        (12, "completed"),
        (13, "rejected"),
    ]
    assert json.loads(invoke("tasks", "--round", "2", "--json").stdout) == []
    assert "No tasks match" in invoke("tasks", "--run", "other").stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--round", "abc"], "'--round'"),
        (["--status", "done"], "'--status'"),
        (["--colour"], "--colour"),
    ],
)
def test_tasks_usage_errors_exit_2(funded_ledger, invoke, args, fragment):
    assert_one_line_error(invoke("tasks", *args), 2, fragment, "--help")


# verify


def test_verify_a_healthy_ledger(funded_ledger, invoke):
    result = invoke("verify")
    assert result.exit_code == 0
    assert result.stdout.startswith("OK")
    assert len(result.stdout.splitlines()) == 1


def test_verify_prints_each_violation_and_exits_1(funded_ledger, ledger_path, invoke):
    connection = sqlite3.connect(ledger_path, isolation_level=None)
    connection.execute("UPDATE users SET total_tokens = 9 WHERE user_id = 'bob'")
    connection.close()

    result = invoke("verify")

    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        "User 'bob' has a balance of 9.0 tokens but their journal sums to 1.2."
    ]


# export


def test_export_json_holds_every_table(funded_ledger, invoke):
    tables = json.loads(invoke("export", "--format", "json").stdout)
    assert sorted(tables) == ["journal", "queries", "tasks", "users"]
    assert len(tables["tasks"]) == 3


def test_export_csv_of_one_table(funded_ledger, invoke):
    result = invoke("export", "--format", "csv", "--table", "journal")
    assert result.exit_code == 0
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(r["user_id"], r["kind"], r["amount"]) for r in rows] == [
        ("alice", "reward", "2.0"),
        ("bob", "reward", "1.2"),
    ]


def test_export_csv_of_an_empty_table_has_its_header(funded_ledger, invoke):
    result = invoke("export", "--format", "csv", "--table", "queries")
    assert result.stdout.splitlines() == [
        "query_id,user_id,prompt,cost,status,created_at,finished_at"
    ]


def test_export_writes_a_file(funded_ledger, invoke, tmp_path):
    out = tmp_path / "exports" / "users.json"
    result = invoke("export", "--format", "json", "--table", "users", "--out", str(out))
    assert result.exit_code == 0
    assert result.stdout == ""
    assert [row["user_id"] for row in json.loads(out.read_text())] == [
        "alice",
        "bob",
        "carol",
    ]


def test_export_csv_needs_a_table(funded_ledger, invoke):
    assert_one_line_error(invoke("export", "--format", "csv"), 2, "--table")


def test_export_to_an_unwritable_path_fails(funded_ledger, invoke, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = invoke("export", "--format", "json", "--out", str(blocker / "x.json"))
    assert_one_line_error(result, 1, "Cannot write")


# query: only the paths that stop before the model runs


def test_query_by_an_unknown_user_fails(funded_ledger, invoke):
    assert_one_line_error(invoke("query", "zed", "hello"), 1, "'zed'")


def test_query_without_the_balance_charges_nothing(funded_ledger, invoke):
    result = invoke("query", "bob", "hello", "--query-cost", "1.5")
    assert_one_line_error(result, 1, "balance of 1.2 tokens", "costs 1.5")
    assert funded_ledger.balance("bob") == 1.2
    assert journal_length(funded_ledger, "bob") == 1


@pytest.mark.parametrize(
    "args",
    [
        ["--query-cost", "0"],
        ["--query-cost", "-1"],
        ["--query-cost", "inf"],
        ["--query-cost", "0.0000001"],
        ["--max-new-tokens", "0"],
    ],
)
def test_query_bad_arguments_exit_2(funded_ledger, invoke, args):
    assert_one_line_error(invoke("query", "alice", "hello", *args), 2)
    assert funded_ledger.balance("alice") == 2.0


def test_query_while_the_ledger_stays_locked_fails(
    funded_ledger, ledger_path, invoke, monkeypatch
):
    monkeypatch.setattr(ledger_cli, "BUSY_TIMEOUT_S", 0.1)
    holder = sqlite3.connect(ledger_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        result = invoke("query", "alice", "hello")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert_one_line_error(result, 1, "locked")
    assert journal_length(funded_ledger, "alice") == 1


# Every command


@pytest.mark.parametrize(
    "args",
    [
        ["balances"],
        ["history", "alice"],
        ["tasks"],
        ["query", "alice", "hello"],
        ["verify"],
        ["export", "--format", "json"],
    ],
)
def test_a_missing_database_is_reported_not_created(ledger_path, invoke, args):
    assert_one_line_error(invoke(*args), 1, "No ledger database", str(ledger_path))
    assert not ledger_path.exists()


def test_a_file_that_is_not_a_ledger_is_reported(ledger_path, invoke):
    ledger_path.parent.mkdir()
    ledger_path.write_text("hello\n" * 1000)
    assert_one_line_error(invoke("balances"), 1, "Cannot open the ledger")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_shows_an_example(command):
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert f"Example: hydra-ledger {command}" in result.stdout


def test_top_level_help_lists_every_command():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "HYDRA_LEDGER_DB" in result.stdout
    for command in COMMANDS:
        assert command in result.stdout


def test_no_command_shows_the_help():
    result = CliRunner().invoke(app, [])
    assert result.exit_code == 2
    assert "Usage: hydra-ledger" in result.output
    assert "balances" in result.output
    assert "Traceback" not in result.output


def test_an_unknown_command_is_a_usage_error():
    result = CliRunner().invoke(app, ["balance"])
    assert_one_line_error(result, 2, "Did you mean 'balances'?")
    assert result.stderr.count("Did you mean") == 1
