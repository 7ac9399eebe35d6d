"""The token ledger: which node did which task, what each user earned and spent."""

import contextlib
import dataclasses
import logging
import math
import operator
import os
import sqlite3
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlite_utils
from sqlite_utils.db import NotFoundError

from hydraai.errors import InsufficientBalance, LedgerBusy, LedgerError, UnknownUser

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
TASK_STATUSES = ("assigned", "completed", "rejected", "failed")
OUTCOME_STATUSES = ("completed", "rejected", "failed")
JOURNAL_KINDS = ("reward", "query", "refund", "adjustment")
TABLES = ("users", "tasks", "journal", "queries")

# A completed or rejected task is final: neither assign_tasks nor settle_round
# touches it again, which is what makes replaying a round harmless.
SETTLED_STATUSES = ("completed", "rejected")

NO_USER_REASON = "completed without a user_id, so no one could be paid"

# Flower node ids are unsigned 64-bit integers and overflow SQLite's signed
# INTEGER, so tasks.node_id stores the decimal text and the API speaks int.
MAX_NODE_ID = 2**64 - 1

# Token amounts are stored rounded to this many decimals and compared with
# TOLERANCE, since sums of floats drift in the last bits.
DECIMALS = 6
TOLERANCE = 1e-9

_SCHEMA = (
    """
    CREATE TABLE users (
        user_id TEXT PRIMARY KEY,
        created_at TEXT NOT NULL,
        total_tokens REAL NOT NULL DEFAULT 0,
        total_work_done INTEGER NOT NULL DEFAULT 0
    )
    """,
    """
    CREATE TABLE tasks (
        task_id INTEGER PRIMARY KEY,
        run_name TEXT NOT NULL,
        server_round INTEGER NOT NULL,
        node_id TEXT NOT NULL CHECK (node_id <> '' AND node_id NOT GLOB '*[^0-9]*'),
        user_id TEXT REFERENCES users (user_id),
        status TEXT NOT NULL
            CHECK (status IN ('assigned', 'completed', 'rejected', 'failed')),
        assigned_at TEXT NOT NULL,
        finished_at TEXT,
        assigned_steps INTEGER NOT NULL DEFAULT 0,
        assigned_examples INTEGER NOT NULL DEFAULT 0,
        reported_steps INTEGER NOT NULL DEFAULT 0,
        reported_examples INTEGER NOT NULL DEFAULT 0,
        reported_tokens INTEGER NOT NULL DEFAULT 0,
        train_loss REAL,
        reason TEXT NOT NULL DEFAULT '',
        reward REAL NOT NULL DEFAULT 0,
        UNIQUE (run_name, server_round, node_id)
    )
    """,
    "CREATE INDEX tasks_user_id ON tasks (user_id)",
    """
    CREATE TABLE queries (
        query_id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL REFERENCES users (user_id),
        prompt TEXT NOT NULL,
        cost REAL NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('pending', 'answered', 'refunded')),
        created_at TEXT NOT NULL,
        finished_at TEXT
    )
    """,
    """
    CREATE TABLE journal (
        entry_id INTEGER PRIMARY KEY,
        user_id TEXT NOT NULL REFERENCES users (user_id),
        amount REAL NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('reward', 'query', 'refund', 'adjustment')),
        task_id INTEGER REFERENCES tasks (task_id),
        query_id TEXT REFERENCES queries (query_id),
        note TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        CHECK (kind <> 'reward' OR task_id IS NOT NULL)
    )
    """,
    "CREATE INDEX journal_user_id ON journal (user_id)",
    # At most one reward per task, whatever the code above it does: a second
    # payment for the same task fails here and rolls back its transaction.
    """
    CREATE UNIQUE INDEX journal_one_reward_per_task
    ON journal (task_id) WHERE kind = 'reward'
    """,
    # The journal is append-only: a mistake is corrected by a new entry.
    """
    CREATE TRIGGER journal_no_update BEFORE UPDATE ON journal BEGIN
        SELECT RAISE(ABORT, 'journal entries are append-only; add a correcting entry');
    END
    """,
    """
    CREATE TRIGGER journal_no_delete BEFORE DELETE ON journal BEGIN
        SELECT RAISE(ABORT, 'journal entries are append-only; add a correcting entry');
    END
    """,
)

# A node's row becomes 'assigned' again on a new assignment, unless the task
# is already settled.
_ASSIGN_SQL = """
INSERT INTO tasks (run_name, server_round, node_id, status, assigned_at,
                   assigned_steps, assigned_examples)
VALUES (?, ?, ?, 'assigned', ?, ?, ?)
ON CONFLICT (run_name, server_round, node_id) DO UPDATE SET
    status = 'assigned',
    assigned_at = excluded.assigned_at,
    assigned_steps = excluded.assigned_steps,
    assigned_examples = excluded.assigned_examples,
    user_id = NULL,
    finished_at = NULL,
    reported_steps = 0,
    reported_examples = 0,
    reported_tokens = 0,
    train_loss = NULL,
    reason = '',
    reward = 0
WHERE tasks.status NOT IN ('completed', 'rejected')
"""


@dataclasses.dataclass(frozen=True)
class TaskOutcome:
    """What became of one node's task in a round, as the strategy judged its reply."""

    node_id: int
    status: str  # "completed" | "rejected" | "failed"
    user_id: str | None = None
    reason: str = ""
    reported_steps: int = 0
    reported_examples: int = 0
    reported_tokens: int = 0
    train_loss: float | None = None


class Ledger:
    """Tasks, rewards and query charges in one SQLite file, safe across processes.

    A server process writes while CLI processes read and charge queries: the
    database runs in WAL mode, and every write holds the write lock from its
    first statement, waiting up to ``timeout`` seconds for another writer.

    Parameters
    ----------
    path : str or os.PathLike
        The database file. It, its parent directory and the schema are created
        if missing.
    reward_per_task : float, default 2.0
        Tokens paid for a completed task that reports all its assigned steps.
    timeout : float, default 30.0
        Seconds to wait for another process's write lock before raising
        ``LedgerBusy``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        reward_per_task: float = 2.0,
        *,
        timeout: float = 30.0,
    ) -> None:
        if not (math.isfinite(reward_per_task) and reward_per_task >= 0):
            raise ValueError(
                f"Expected reward_per_task to be a finite number >= 0, "
                f"but got {reward_per_task!r}."
            )
        self.path = Path(path)
        self.reward_per_task = float(reward_per_task)
        self.timeout = float(timeout)

        # Open the connection in autocommit mode, so that transactions start
        # only where this class says BEGIN and sqlite3 never opens one itself
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(
                self.path, timeout=self.timeout, isolation_level=None
            )
        except (OSError, sqlite3.Error) as exc:
            raise LedgerError(
                f"Cannot open the ledger at {self.path}: {exc}. Expected a path "
                f"where a database file can be read and written."
            ) from exc
        self._db = sqlite_utils.Database(connection, execute_plugins=False)
        try:
            self._db.execute("PRAGMA foreign_keys = ON")
            self._db.enable_wal()
            self._ensure_schema()
        except sqlite3.DatabaseError as exc:
            self.close()
            raise LedgerError(
                f"Cannot open the ledger at {self.path}: {exc}. Expected a "
                f"HydraAI ledger SQLite file; check the path, or move the file "
                f"aside to start a new ledger."
            ) from exc
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the database connection."""
        self._db.close()

    def _ensure_schema(self) -> None:
        """Create the tables on first use and refuse files of another schema."""
        if self._user_version() == SCHEMA_VERSION:
            return
        with self._write():
            # Another process may have created the schema while this one waited
            version = self._user_version()
            if version == SCHEMA_VERSION:
                return
            if version > SCHEMA_VERSION or self._db.table_names():
                raise LedgerError(
                    f"The database at {self.path} is not a ledger this version "
                    f"can use: expected schema version {SCHEMA_VERSION} or an "
                    f"empty file, found version {version} with tables "
                    f"{self._db.table_names()}. Point --db or the run config at "
                    f"a HydraAI ledger file."
                )
            for statement in _SCHEMA:
                self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        log.info("Created a new ledger at %s", self.path)

    def _user_version(self) -> int:
        return self._db.execute("PRAGMA user_version").fetchone()[0]

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        """Run a block as one transaction that holds the write lock throughout."""
        # BEGIN IMMEDIATE takes the write lock before the first read, so a
        # check and the write that depends on it cannot interleave with
        # another process's write
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF not in (
                sqlite3.SQLITE_BUSY,
                sqlite3.SQLITE_LOCKED,
            ):
                raise
            raise LedgerBusy(
                f"The ledger at {self.path} stayed locked by another process "
                f"for {self.timeout:g} s; expected its write to finish sooner. "
                f"Retry, and if it persists look for a process stuck writing it."
            ) from exc
        try:
            yield
            self._db.commit()
        except BaseException:
            self._db.rollback()
            raise

    def assign_tasks(
        self,
        run_name: str,
        server_round: int,
        node_ids: Iterable[int],
        assigned_steps: int,
        assigned_examples: int,
    ) -> None:
        """Record that each node was sent a task in this round.

        A node's task becomes 'assigned' again if it was assigned or failed
        before; a completed or rejected task is left as it is.

        Parameters
        ----------
        run_name : str
            The run the round belongs to.
        server_round : int
            The Flower round number.
        node_ids : iterable of int
            The Flower node ids sent work, each from 0 to 2**64 - 1.
        assigned_steps : int
            Local training steps each node was asked for.
        assigned_examples : int
            Training examples each node was asked to use.
        """
        nodes = [_node_text(node_id) for node_id in node_ids]
        _require_count("server_round", server_round)
        _require_count("assigned_steps", assigned_steps)
        _require_count("assigned_examples", assigned_examples)
        now = _now()
        with self._write():
            for node in nodes:
                self._db.execute(
                    _ASSIGN_SQL,
                    [
                        run_name,
                        server_round,
                        node,
                        now,
                        assigned_steps,
                        assigned_examples,
                    ],
                )
        log.debug(
            "Run %s round %s: assigned %s tasks of %s steps",
            run_name,
            server_round,
            len(nodes),
            assigned_steps,
        )

    def settle_round(
        self, run_name: str, server_round: int, outcomes: Iterable[TaskOutcome]
    ) -> float:
        """Record each task's outcome and pay rewards for completed tasks.

        A completed task earns ``reward_per_task * min(1, reported_steps /
        assigned_steps)`` (0 when no steps were assigned), credited to its user
        once. Rejected and failed tasks earn nothing. Users are created on
        their first task. Tasks already settled are skipped, so settling a
        round again pays nothing twice. An outcome for a node with no assigned
        task in this round is logged as a warning and skipped.

        Parameters
        ----------
        run_name : str
            The run the round belongs to.
        server_round : int
            The Flower round number.
        outcomes : iterable of TaskOutcome
            One outcome per node that was assigned a task. A completed outcome
            without a ``user_id`` has no one to pay and is recorded as rejected.

        Returns
        -------
        float
            The tokens paid by this call.
        """
        outcomes = [_checked_outcome(outcome) for outcome in outcomes]

        # Settle every task of the round in one transaction: all or nothing
        results: Counter[str] = Counter()
        paid = 0.0
        with self._write():
            for outcome in outcomes:
                result, reward = self._settle_task(run_name, server_round, outcome)
                results[result] += 1
                paid += reward
        paid = round(paid, DECIMALS)

        log.info(
            "Run %s round %s settled: %s completed, %s rejected, %s failed, "
            "%s skipped; %s tokens paid",
            run_name,
            server_round,
            results["completed"],
            results["rejected"],
            results["failed"],
            results["skipped"],
            format_tokens(paid),
        )
        return paid

    def _settle_task(
        self, run_name: str, server_round: int, outcome: TaskOutcome
    ) -> tuple[str, float]:
        """Settle one task inside settle_round's transaction; return its result."""
        task = self._open_task(run_name, server_round, outcome)
        if task is None:
            return "skipped", 0.0

        # Create the user on their first task, rejected ones included, so
        # that their history shows why they were not paid
        now = _now()
        if outcome.user_id is not None:
            self._db.table("users").insert(
                {"user_id": outcome.user_id, "created_at": now}, ignore=True
            )

        # Record the outcome, then pay a completed task's reward
        completed = outcome.status == "completed"
        reward = self._reward(task["assigned_steps"], outcome) if completed else 0.0
        self._db.table("tasks").update(
            task["task_id"],
            {
                "status": outcome.status,
                "user_id": outcome.user_id,
                "reason": outcome.reason,
                "finished_at": now,
                "reported_steps": outcome.reported_steps,
                "reported_examples": outcome.reported_examples,
                "reported_tokens": outcome.reported_tokens,
                "train_loss": outcome.train_loss,
                "reward": reward,
            },
        )
        if completed:
            note = f"run {run_name} round {server_round}"
            self._post(
                outcome.user_id, reward, "reward", task_id=task["task_id"], note=note
            )
            self._db.execute(
                "UPDATE users SET total_work_done = total_work_done + 1 "
                "WHERE user_id = ?",
                [outcome.user_id],
            )
        return outcome.status, reward

    def _open_task(
        self, run_name: str, server_round: int, outcome: TaskOutcome
    ) -> dict[str, Any] | None:
        """Return the task an outcome settles, or None if there is none to settle."""
        rows = self._db.table("tasks").rows_where(
            "run_name = ? AND server_round = ? AND node_id = ?",
            [run_name, server_round, _node_text(outcome.node_id)],
        )
        task = next(iter(rows), None)
        if task is None:
            log.warning(
                "Run %s round %s: node %s replied but was assigned no task; "
                "its %s outcome is skipped. Expected assign_tasks() to record "
                "every node sent work before settle_round().",
                run_name,
                server_round,
                outcome.node_id,
                outcome.status,
            )
            return None
        if task["status"] in SETTLED_STATUSES:
            log.debug("Task %s is already %s", task["task_id"], task["status"])
            return None
        return task

    def _reward(self, assigned_steps: int, outcome: TaskOutcome) -> float:
        """Return the reward for a completed task, capped at reward_per_task."""
        if assigned_steps <= 0:
            return 0.0
        share = min(1.0, max(0, outcome.reported_steps) / assigned_steps)
        return round(self.reward_per_task * share, DECIMALS)

    def fail_unfinished(self, run_name: str, reason: str) -> int:
        """Mark every task of a run still awaiting a reply as failed.

        Parameters
        ----------
        run_name : str
            The run whose unfinished tasks failed, for example after its
            coordinator crashed.
        reason : str
            Why the tasks failed, stored on each.

        Returns
        -------
        int
            The number of tasks marked failed.
        """
        with self._write():
            cursor = self._db.execute(
                "UPDATE tasks SET status = 'failed', reason = ?, finished_at = ? "
                "WHERE run_name = ? AND status = 'assigned'",
                [reason, _now(), run_name],
            )
        if cursor.rowcount:
            log.info(
                "Run %s: marked %s unfinished tasks failed (%s)",
                run_name,
                cursor.rowcount,
                reason,
            )
        return cursor.rowcount

    def balance(self, user_id: str) -> float:
        """Return a user's balance in tokens.

        Parameters
        ----------
        user_id : str
            The user to look up; ``UnknownUser`` is raised if there is none.
        """
        return round(self._user(user_id)["total_tokens"], DECIMALS)

    def _user(self, user_id: str) -> dict[str, Any]:
        try:
            return self._db.table("users").get(user_id)
        except NotFoundError:
            raise UnknownUser(
                f"No user {user_id!r} in the ledger at {self.path}; expected "
                f"the user_id of a volunteer who has trained. Run "
                f"'hydra-ledger balances' to list users."
            ) from None

    def balances(self) -> list[dict[str, Any]]:
        """Return every user's balance, tasks completed and last activity.

        Each row has ``user_id``, ``balance``, ``total_work_done`` (completed
        tasks) and ``last_activity`` (an ISO 8601 UTC time), highest balance
        first.
        """
        return list(
            self._db.query(
                """
                SELECT
                    u.user_id,
                    round(u.total_tokens, 6) AS balance,
                    u.total_work_done,
                    max(
                        u.created_at,
                        coalesce((SELECT max(created_at) FROM journal AS j
                                  WHERE j.user_id = u.user_id), ''),
                        coalesce((SELECT max(finished_at) FROM tasks AS t
                                  WHERE t.user_id = u.user_id), '')
                    ) AS last_activity
                FROM users AS u
                ORDER BY u.total_tokens DESC, u.user_id
                """
            )
        )

    def history(self, user_id: str) -> dict[str, list[dict[str, Any]]]:
        """Return a user's journal entries and tasks, oldest first.

        Parameters
        ----------
        user_id : str
            The user to look up; ``UnknownUser`` is raised if there is none.

        Returns
        -------
        dict
            ``{"journal": [...], "tasks": [...]}``, one dict per row.
        """
        # Read both tables from one snapshot, so they agree with each other
        with self._db.atomic():
            self._user(user_id)
            journal = self._db.table("journal").rows_where(
                "user_id = ?", [user_id], order_by="entry_id"
            )
            tasks = self._db.table("tasks").rows_where(
                "user_id = ?", [user_id], order_by="task_id"
            )
            return {
                "journal": list(journal),
                "tasks": [_task_row(row) for row in tasks],
            }

    def tasks(
        self,
        run_name: str | None = None,
        server_round: int | None = None,
        status: str | None = None,
    ) -> list[dict[str, Any]]:
        """Return tasks in the order they were first assigned, optionally filtered.

        Parameters
        ----------
        run_name : str, optional
            Only tasks of this run.
        server_round : int, optional
            Only tasks of this round.
        status : str, optional
            Only tasks in this status: assigned, completed, rejected or failed.
        """
        if status is not None and status not in TASK_STATUSES:
            raise ValueError(
                f"Expected a task status in {TASK_STATUSES}, but got {status!r}."
            )
        filters = {
            "run_name": run_name,
            "server_round": server_round,
            "status": status,
        }
        used = {column: value for column, value in filters.items() if value is not None}
        where = " AND ".join(f"{column} = :{column}" for column in used) or None
        rows = self._db.table("tasks").rows_where(where, used, order_by="task_id")
        return [_task_row(row) for row in rows]

    def credit(
        self, user_id: str, amount: float, kind: str = "adjustment", note: str = ""
    ) -> int:
        """Add tokens to a user's balance by hand.

        Parameters
        ----------
        user_id : str
            The user to credit; ``UnknownUser`` is raised if there is none.
        amount : float
            Tokens to add, greater than 0.
        kind : str, default "adjustment"
            The journal kind: adjustment, refund or query. Rewards are paid
            only by ``settle_round``, each tied to its task.
        note : str, default ""
            Why the credit was made, kept in the journal.

        Returns
        -------
        int
            The journal entry id.
        """
        amount = _positive_amount("amount", amount)
        _check_manual_kind(kind)
        with self._write():
            self._user(user_id)
            entry_id = self._post(user_id, amount, kind, note=note)
        log.info("Credited %s tokens to %s (%s)", format_tokens(amount), user_id, kind)
        return entry_id

    def debit(
        self, user_id: str, amount: float, kind: str = "adjustment", note: str = ""
    ) -> int:
        """Take tokens from a user's balance by hand, never below zero.

        Parameters
        ----------
        user_id : str
            The user to debit; ``UnknownUser`` is raised if there is none.
        amount : float
            Tokens to take, greater than 0. ``InsufficientBalance`` is raised,
            and nothing taken, if the balance does not cover it.
        kind : str, default "adjustment"
            The journal kind: adjustment, refund or query.
        note : str, default ""
            Why the debit was made, kept in the journal.

        Returns
        -------
        int
            The journal entry id.
        """
        amount = _positive_amount("amount", amount)
        _check_manual_kind(kind)
        with self._write():
            self._require_funds(user_id, amount, "this debit")
            entry_id = self._post(user_id, -amount, kind, note=note)
        log.info("Debited %s tokens from %s (%s)", format_tokens(amount), user_id, kind)
        return entry_id

    def charge_query(
        self,
        user_id: str,
        prompt: str,
        generate: Callable[[str], str],
        cost: float = 0.5,
    ) -> str:
        """Charge a user for one prompt, generate the reply, refund if that fails.

        The balance check and the debit are one write transaction, so processes
        charging the same user at once can never overdraw. Generation runs
        outside any transaction; if it raises, the cost is refunded in a new
        transaction and the error re-raised.

        Parameters
        ----------
        user_id : str
            The paying user; ``UnknownUser`` is raised if there is none.
        prompt : str
            The text to continue.
        generate : callable
            Called as ``generate(prompt)`` after the charge; returns the reply.
        cost : float, default 0.5
            Tokens charged, greater than 0. ``InsufficientBalance`` is raised,
            and nothing charged, if the balance does not cover it.

        Returns
        -------
        str
            The generated text.
        """
        cost = _positive_amount("cost", cost)
        query_id = uuid.uuid4().hex

        # Check the balance, record the query and debit it as one write
        with self._write():
            self._require_funds(user_id, cost, "this query")
            self._db.table("queries").insert(
                {
                    "query_id": query_id,
                    "user_id": user_id,
                    "prompt": prompt,
                    "cost": cost,
                    "status": "pending",
                    "created_at": _now(),
                }
            )
            self._post(user_id, -cost, "query", query_id=query_id)
        log.info(
            "Charged %s tokens to %s for query %s",
            format_tokens(cost),
            user_id,
            query_id,
        )

        # Generate outside the transaction: it can take seconds, and the
        # server must be able to write meanwhile
        try:
            text = generate(prompt)
        except BaseException as exc:
            self._refund_query(user_id, cost, query_id, exc)
            raise
        self._finish_query(query_id)
        return text

    def _require_funds(self, user_id: str, amount: float, what: str) -> None:
        """Raise unless the user's balance covers ``amount``; call inside _write."""
        balance = self._user(user_id)["total_tokens"]
        if balance + TOLERANCE < amount:
            raise InsufficientBalance(
                f"User {user_id!r} has a balance of {format_tokens(balance)} tokens "
                f"but {what} costs {format_tokens(amount)}; nothing was charged. "
                f"Earn tokens by completing training tasks, then try again."
            )

    def _refund_query(
        self, user_id: str, cost: float, query_id: str, error: BaseException
    ) -> None:
        """Give back a query's cost after its generation failed."""
        note = f"generation failed: {type(error).__name__}"
        try:
            with self._write():
                self._post(user_id, cost, "refund", query_id=query_id, note=note)
                self._db.table("queries").update(
                    query_id, {"status": "refunded", "finished_at": _now()}
                )
        except (LedgerError, sqlite3.Error) as refund_error:
            raise LedgerError(
                f"Generation for query {query_id} failed ({error!r}) and its "
                f"refund of {format_tokens(cost)} tokens to {user_id!r} could not be "
                f"written ({refund_error}). Credit it by hand with "
                f"Ledger.credit(..., kind='refund')."
            ) from refund_error
        log.info(
            "Query %s failed (%s); refunded %s tokens to %s",
            query_id,
            note,
            format_tokens(cost),
            user_id,
        )

    def _finish_query(self, query_id: str) -> None:
        """Mark a query answered; the user has paid, so a failure only warns."""
        try:
            with self._write():
                self._db.table("queries").update(
                    query_id, {"status": "answered", "finished_at": _now()}
                )
        except (LedgerError, sqlite3.Error) as exc:
            log.warning(
                "Query %s was answered but could not be marked so (%s); it "
                "stays 'pending' in the queries table.",
                query_id,
                exc,
            )

    def _post(
        self,
        user_id: str,
        amount: float,
        kind: str,
        *,
        task_id: int | None = None,
        query_id: str | None = None,
        note: str = "",
    ) -> int:
        """Append a journal entry and move the user's balance with it.

        Call only inside _write, so that the entry and the balance change
        commit together.
        """
        journal = self._db.table("journal").insert(
            {
                "user_id": user_id,
                "amount": amount,
                "kind": kind,
                "task_id": task_id,
                "query_id": query_id,
                "note": note,
                "created_at": _now(),
            }
        )
        self._db.execute(
            "UPDATE users SET total_tokens = round(total_tokens + ?, 6) "
            "WHERE user_id = ?",
            [amount, user_id],
        )
        return journal.last_pk

    def verify(self) -> list[str]:
        """Check the ledger's invariants and describe each one violated.

        Checked: each balance equals its journal sum and is not negative;
        each task has at most one reward, and only a completed task has one;
        each completed task has its reward entry, paid to its user and equal
        to its ``reward`` column; each user's ``total_work_done`` equals their
        completed tasks.

        Returns
        -------
        list of str
            One readable line per violation; empty when the ledger is healthy.
        """
        # Read every check from one snapshot, so that a write in between
        # cannot show up as a violation
        with self._db.atomic():
            return [
                *self._check_balances(),
                *self._check_reward_entries(),
                *self._check_task_rewards(),
                *self._check_work_done(),
            ]

    def _check_balances(self) -> Iterator[str]:
        rows = self._db.query(
            """
            SELECT u.user_id, u.total_tokens, coalesce(sum(j.amount), 0) AS total
            FROM users AS u LEFT JOIN journal AS j ON j.user_id = u.user_id
            GROUP BY u.user_id ORDER BY u.user_id
            """
        )
        for row in rows:
            user, balance, total = row["user_id"], row["total_tokens"], row["total"]
            if abs(balance - total) > TOLERANCE:
                yield (
                    f"User {user!r} has a balance of {balance!r} tokens but "
                    f"their journal sums to {total!r}."
                )
            if balance < -TOLERANCE:
                yield f"User {user!r} has a negative balance of {balance!r} tokens."

    def _check_reward_entries(self) -> Iterator[str]:
        for row in self._db.query(
            "SELECT task_id, count(*) AS n FROM journal WHERE kind = 'reward' "
            "GROUP BY task_id HAVING n > 1 ORDER BY task_id"
        ):
            yield f"Task {row['task_id']} has {row['n']} reward entries; expected one."
        for row in self._db.query(
            """
            SELECT j.entry_id, j.task_id, j.user_id AS paid_to, t.user_id, t.status
            FROM journal AS j JOIN tasks AS t ON t.task_id = j.task_id
            WHERE j.kind = 'reward' ORDER BY j.entry_id
            """
        ):
            if row["status"] != "completed":
                yield (
                    f"Journal entry {row['entry_id']} pays a reward for task "
                    f"{row['task_id']}, which is {row['status']}, not completed."
                )
            if row["paid_to"] != row["user_id"]:
                yield (
                    f"Journal entry {row['entry_id']} pays task {row['task_id']}'s "
                    f"reward to {row['paid_to']!r}, but {row['user_id']!r} did it."
                )

    def _check_task_rewards(self) -> Iterator[str]:
        for row in self._db.query(
            """
            SELECT t.task_id, t.status, t.reward, count(j.entry_id) AS entries,
                   coalesce(sum(j.amount), 0) AS paid
            FROM tasks AS t
            LEFT JOIN journal AS j ON j.task_id = t.task_id AND j.kind = 'reward'
            GROUP BY t.task_id ORDER BY t.task_id
            """
        ):
            if row["status"] == "completed" and row["entries"] == 0:
                yield f"Task {row['task_id']} is completed but has no reward entry."
            if abs(row["reward"] - row["paid"]) > TOLERANCE:
                yield (
                    f"Task {row['task_id']} records a reward of {row['reward']!r} "
                    f"but the journal paid {row['paid']!r} for it."
                )

    def _check_work_done(self) -> Iterator[str]:
        rows = self._db.query(
            """
            SELECT u.user_id, u.total_work_done,
                   (SELECT count(*) FROM tasks AS t WHERE t.user_id = u.user_id
                    AND t.status = 'completed') AS completed
            FROM users AS u ORDER BY u.user_id
            """
        )
        for row in rows:
            if row["total_work_done"] != row["completed"]:
                yield (
                    f"User {row['user_id']!r} has total_work_done "
                    f"{row['total_work_done']} but {row['completed']} completed tasks."
                )

    def columns(self, table: str) -> list[str]:
        """Return a table's column names, in schema order.

        Parameters
        ----------
        table : str
            One of users, tasks, journal or queries.
        """
        _check_table(table)
        return [column.name for column in self._db.table(table).columns]

    def export(self) -> dict[str, list[dict[str, Any]]]:
        """Return every row of every table, keyed by table name, from one snapshot."""
        with self._db.atomic():
            tables = {
                table: list(self._db.table(table).rows_where(order_by="rowid"))
                for table in TABLES
            }
        tables["tasks"] = [_task_row(row) for row in tables["tasks"]]
        return tables


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def format_tokens(amount: float) -> str:
    """Format a token amount for people, at most 6 decimals: 2, 1.2, 0.000001."""
    return f"{amount:.{DECIMALS}f}".rstrip("0").rstrip(".")


def _task_row(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "node_id": int(row["node_id"])}


def _node_text(node_id: int) -> str:
    """Return a Flower node id as the decimal text stored in tasks.node_id."""
    try:
        number = operator.index(node_id)
    except TypeError:
        number = -1
    if isinstance(node_id, bool) or not 0 <= number <= MAX_NODE_ID:
        raise ValueError(
            f"Expected a Flower node id, an integer from 0 to 2**64 - 1, "
            f"but got {node_id!r}."
        )
    return str(number)


def _require_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Expected {name} to be an integer >= 0, but got {value!r}.")


def _positive_amount(name: str, value: float) -> float:
    amount = round(float(value), DECIMALS) if math.isfinite(value) else 0.0
    if amount <= 0:
        raise ValueError(
            f"Expected {name} to be a number of tokens > 0 (at {DECIMALS} "
            f"decimals), but got {value!r}."
        )
    return amount


def _check_manual_kind(kind: str) -> None:
    if kind not in JOURNAL_KINDS or kind == "reward":
        raise ValueError(
            f"Expected kind to be adjustment, refund or query, but got {kind!r}; "
            f"rewards are paid only by settle_round, each tied to its task."
        )


def _check_table(table: str) -> None:
    if table not in TABLES:
        raise ValueError(f"Expected a ledger table in {TABLES}, but got {table!r}.")


def _checked_outcome(outcome: TaskOutcome) -> TaskOutcome:
    """Return the outcome as settle_round records it; raise if it cannot."""
    _node_text(outcome.node_id)
    if outcome.status not in OUTCOME_STATUSES:
        raise ValueError(
            f"Expected the outcome status of node {outcome.node_id} to be one of "
            f"{OUTCOME_STATUSES}, but got {outcome.status!r}."
        )

    # A completion that names no user has no one to pay. It comes from a
    # node's reply, so it is recorded as rejected rather than failing the round.
    user_id = outcome.user_id or None
    if outcome.status == "completed" and user_id is None:
        log.warning(
            "Node %s completed its task but named no user_id; recorded as "
            "rejected, since its reward has no one to go to.",
            outcome.node_id,
        )
        return dataclasses.replace(
            outcome, status="rejected", user_id=None, reason=NO_USER_REASON
        )
    return dataclasses.replace(outcome, user_id=user_id)
