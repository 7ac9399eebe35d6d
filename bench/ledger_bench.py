"""Section 6: the ledger's write rate when settling rounds, and the CLI's speed."""

from __future__ import annotations

import shutil
import statistics
import subprocess
import time

from bench.common import (
    BIN,
    RESULTS,
    SectionResult,
    new_section,
    print_table,
    say,
)
from hydraai.ledger import Ledger, TaskOutcome

RUN = "bench"
STEPS, EXAMPLES = 10, 80


def outcomes(node_ids: range) -> list[TaskOutcome]:
    """A completed task for each node, paid to user-<node id>."""
    return [
        TaskOutcome(
            node_id,
            "completed",
            user_id=f"user-{node_id}",
            reported_steps=STEPS,
            reported_examples=EXAMPLES,
            reported_tokens=EXAMPLES * 128,
            train_loss=3.0,
        )
        for node_id in node_ids
    ]


def settle(ledger: Ledger, server_round: int, node_ids: range) -> dict[str, float]:
    """Assign and settle one round; its timings and the rows it wrote."""
    done = outcomes(node_ids)
    before = ledger._db.conn.total_changes
    start = time.perf_counter()
    ledger.assign_tasks(RUN, server_round, node_ids, STEPS, EXAMPLES)
    assigned = time.perf_counter()
    ledger.settle_round(RUN, server_round, done)
    settled = time.perf_counter()
    return {
        "tasks": len(node_ids),
        "assign s": assigned - start,
        "settle s": settled - assigned,
        "rows written": ledger._db.conn.total_changes - before,
        "total s": settled - start,
    }


def cli_seconds(*args: str, repeats: int) -> tuple[float, int]:
    """Best wall time of a hydra-ledger command, and the bytes it printed."""
    times, printed = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        result = subprocess.run(
            [str(BIN / "hydra-ledger"), *args],
            capture_output=True,
            check=True,
            env={"COLUMNS": "120", "PATH": str(BIN)},
        )
        times.append(time.perf_counter() - start)
        printed = len(result.stdout)
    return min(times), printed


def run(quick: bool) -> SectionResult:
    section = new_section("ledger", "6. Ledger", quick)
    folder = RESULTS / "ledger"
    shutil.rmtree(folder, ignore_errors=True)
    path = folder / "ledger.db"
    users = 10_000
    history_rounds = 1 if quick else 3
    repeats = 2 if quick else 3
    section.settings = {
        "rounds": "1,000 new users' tasks, then the same 1,000 again (users exist)",
        "balances": f"{users:,} users with {history_rounds} completed task(s) each; "
        f"best of {repeats} runs of the installed hydra-ledger",
    }

    # Settle rounds of 1,000 tasks: new users, then known ones.
    table = section.table(
        "Settling a round (assign_tasks + settle_round, one transaction each)",
        [
            "round",
            "tasks",
            "assign s",
            "settle s",
            "tasks/s",
            "rows written",
            "writes/s",
        ],
    )
    with Ledger(path) as ledger:
        for server_round, what in ((1, "1,000 new users"), (2, "same users")):
            figures = settle(ledger, server_round, range(1, 1001))
            table.rows.append(
                [
                    what,
                    figures["tasks"],
                    figures["assign s"],
                    figures["settle s"],
                    figures["tasks"] / figures["total s"],
                    figures["rows written"],
                    figures["rows written"] / figures["total s"],
                ]
            )
        print_table(table)

        # Grow the ledger to 10,000 users with a few tasks each.
        say(f"  filling the ledger: {users:,} users x {history_rounds} task(s)")
        start = time.perf_counter()
        for server_round in range(3, 3 + history_rounds):
            settle(ledger, server_round, range(1, users + 1))
        fill = time.perf_counter() - start
        query = statistics.median(_timed(ledger.balances) for _ in range(repeats))
        problems = ledger.verify()

    # The CLI as a user runs it, against Python's start-up alone.
    db = ["--db", str(path)]
    floor, _ = cli_seconds("--help", repeats=repeats)
    table_s, table_bytes = cli_seconds(*db, "balances", repeats=repeats)
    json_s, json_bytes = cli_seconds(*db, "balances", "--json", repeats=repeats)
    cli = section.table(
        f"hydra-ledger with {users:,} users",
        ["command", "wall s", "output KB"],
    )
    cli.rows += [
        ["hydra-ledger --help (start-up alone)", floor, None],
        ["Ledger.balances() in-process (query only)", query, None],
        ["hydra-ledger balances", table_s, table_bytes / 1e3],
        ["hydra-ledger balances --json", json_s, json_bytes / 1e3],
    ]
    print_table(cli)
    section.note(
        f"Filling {users:,} users x {history_rounds} round(s) took {fill:.1f}s "
        f"({users * history_rounds / fill:,.0f} tasks/s); verify() found "
        f"{len(problems)} problem(s)."
    )
    return section


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
