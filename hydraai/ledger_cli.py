"""The hydra-ledger command: the ledger's balances, tasks and queries; run reports."""

import contextlib
import csv
import io
import json
import math
import sqlite3
import sys
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import click
import typer
from rich import box
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from hydraai.checkpoint import latest_query_cost
from hydraai.errors import HydraError, LedgerError
from hydraai.ledger import TABLES, TASK_STATUSES, Ledger, format_tokens

DEFAULT_DB = Path("outputs/ledger.db")
DEFAULT_OUTPUT_DIR = Path("outputs")
DEFAULT_QUERY_COST = 0.5

# Seconds a command waits for the server's write lock before giving up
BUSY_TIMEOUT_S = 30.0

TaskStatus = StrEnum("TaskStatus", {status: status for status in TASK_STATUSES})
TableName = StrEnum("TableName", {table: table for table in TABLES})
ExportFormat = StrEnum("ExportFormat", {"csv": "csv", "json": "json"})


class _LedgerGroup(TyperGroup):
    """The command group, changed only to report usage errors on one line."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            exit_code = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:
            # The message is the help, unless rich has printed it already
            if exc.format_message().strip():
                exc.show()
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            message = " ".join(exc.format_message().split())
            if not message.endswith((".", "?", "!")):
                message += "."
            if getattr(exc, "ctx", None) is not None:
                message += f" See '{exc.ctx.command_path} --help'."
            typer.echo(f"Error: {message}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            typer.echo("Error: aborted.", err=True)
            sys.exit(1)
        sys.exit(exit_code if isinstance(exit_code, int) else 0)


app = typer.Typer(
    name="hydra-ledger",
    cls=_LedgerGroup,
    add_completion=False,
    no_args_is_help=True,
    suggest_commands=False,  # click suggests close commands itself
    pretty_exceptions_enable=False,
)


@app.callback()
def main(
    ctx: typer.Context,
    db: Annotated[
        Path,
        typer.Option(
            "--db",
            envvar="HYDRA_LEDGER_DB",
            help="The ledger database file the ServerApp writes.",
        ),
    ] = DEFAULT_DB,
) -> None:
    """Read the HydraAI token ledger, pay for queries, check and export it.

    Example: hydra-ledger --db outputs/ledger.db balances
    """
    ctx.obj = db


def _fail(message: str) -> NoReturn:
    """Print one error line to stderr and exit with status 1."""
    typer.echo(f"Error: {' '.join(message.split())}", err=True)
    raise typer.Exit(1)


@contextlib.contextmanager
def _open_ledger(ctx: typer.Context) -> Iterator[Ledger]:
    """Open the ledger named by --db; turn its errors into one line and exit 1."""
    path: Path = ctx.obj
    try:
        # Never create a ledger here: a wrong path would look like an empty one
        if not path.is_file():
            raise LedgerError(
                f"No ledger database at {path}; expected the file the ServerApp "
                f"writes. Pass --db PATH or set HYDRA_LEDGER_DB."
            )
        with Ledger(path, timeout=BUSY_TIMEOUT_S) as ledger:
            yield ledger
    except HydraError as exc:
        _fail(str(exc))
    except sqlite3.Error as exc:
        _fail(
            f"The ledger at {path} could not be read or written: {exc}. If it "
            f"is locked, retry once the server's write has finished."
        )


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


# Columns whose cells are short and unreadable when cut: narrow terminals
# squeeze the others instead
_NUMERIC_KEYS = {"balance", "amount", "reward", "train_loss"}
_SHORT_KEYS = {"task_id", "entry_id", "server_round", "status", "steps", "kind"}
_TIME_KEYS = {"created_at", "last_activity"}


def _cell(value: Any, key: str) -> str:
    """Format one value of a row for a table meant for people."""
    if value is None:
        return ""
    if key in ("balance", "amount", "reward"):
        return format_tokens(value)
    if key == "train_loss":
        return f"{value:.4f}"
    if key in _TIME_KEYS:
        return value.replace("T", " ").removesuffix("+00:00")
    return str(value)


def _print_table(
    title: str, columns: dict[str, str], rows: list[dict[str, Any]]
) -> None:
    """Print rows as a table whose headers are the values of ``columns``."""
    table = Table(
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1),
        collapse_padding=True,
    )
    for key, header in columns.items():
        numeric = key in _NUMERIC_KEYS
        table.add_column(
            header,
            justify="right" if numeric else "left",
            no_wrap=numeric or key in _SHORT_KEYS,
            overflow="fold",
        )
    for row in rows:
        table.add_row(*(_cell(row.get(key), key) for key in columns))
    Console().print(table)


_TASK_COLUMNS = {
    "task_id": "Task",
    "run_name": "Run",
    "server_round": "Round",
    "node_id": "Node",
    "user_id": "User",
    "status": "Status",
    "steps": "Steps",
    "train_loss": "Loss",
    "reward": "Reward",
    "reason": "Reason",
}


def _with_steps(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add a 'steps' cell, reported/assigned, to each task row."""
    return [
        {**task, "steps": f"{task['reported_steps']}/{task['assigned_steps']}"}
        for task in tasks
    ]


@app.command()
def balances(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List every user's balance, completed tasks and last activity, highest first.

    Example: hydra-ledger balances --json
    """
    with _open_ledger(ctx) as ledger:
        rows = ledger.balances()
    if as_json:
        _echo_json(rows)
    elif not rows:
        typer.echo("No users yet: a user appears once their first task is settled.")
    else:
        columns = {
            "user_id": "User",
            "balance": "Balance",
            "total_work_done": "Tasks done",
            "last_activity": "Last activity (UTC)",
        }
        _print_table("Balances", columns, rows)


@app.command()
def history(
    ctx: typer.Context,
    user_id: Annotated[str, typer.Argument(metavar="USER", help="The user_id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show one user's balance, journal of credits and debits, and tasks.

    Example: hydra-ledger history alice --json
    """
    with _open_ledger(ctx) as ledger:
        balance = ledger.balance(user_id)
        entries = ledger.history(user_id)
    if as_json:
        _echo_json({"user_id": user_id, "balance": balance, **entries})
        return
    completed = sum(task["status"] == "completed" for task in entries["tasks"])
    typer.echo(
        f"{user_id}: balance {format_tokens(balance)} tokens, "
        f"{completed} completed tasks"
    )
    journal_columns = {
        "entry_id": "Entry",
        "created_at": "Time (UTC)",
        "kind": "Kind",
        "amount": "Amount",
        "task_id": "Task",
        "query_id": "Query",
        "note": "Note",
    }
    _print_table("Journal", journal_columns, entries["journal"])
    task_columns = {k: v for k, v in _TASK_COLUMNS.items() if k != "user_id"}
    _print_table("Tasks", task_columns, _with_steps(entries["tasks"]))


@app.command()
def tasks(
    ctx: typer.Context,
    run_name: Annotated[
        str | None, typer.Option("--run", help="Only tasks of this run.")
    ] = None,
    server_round: Annotated[
        int | None, typer.Option("--round", min=0, help="Only tasks of this round.")
    ] = None,
    status: Annotated[
        TaskStatus | None, typer.Option("--status", help="Only tasks in this status.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List tasks, one per node per round, with their work and reward.

    Example: hydra-ledger tasks --run demo --round 3 --status rejected
    """
    with _open_ledger(ctx) as ledger:
        rows = ledger.tasks(
            run_name=run_name,
            server_round=server_round,
            status=status.value if status else None,
        )
    if as_json:
        _echo_json(rows)
    elif not rows:
        typer.echo("No tasks match.")
    else:
        _print_table("Tasks", _TASK_COLUMNS, _with_steps(rows))


@app.command()
def query(
    ctx: typer.Context,
    user_id: Annotated[str, typer.Argument(metavar="USER", help="The paying user.")],
    prompt: Annotated[str, typer.Argument(help="The text for the model to continue.")],
    max_new_tokens: Annotated[
        int, typer.Option(min=1, help="Most tokens to generate.")
    ] = 64,
    query_cost: Annotated[
        float | None,
        typer.Option(
            help="Tokens charged for the query "
            "(default: the query-cost of the run that trained the model, else 0.5)."
        ),
    ] = None,
    output_dir: Annotated[
        Path,
        typer.Option(
            envvar="HYDRA_OUTPUT_DIR", help="Where the trained model was saved."
        ),
    ] = DEFAULT_OUTPUT_DIR,
) -> None:
    """Pay tokens to prompt the shared model, and print its reply.

    The cost is refunded if generation fails.

    Example: hydra-ledger query alice "The river was" --max-new-tokens 32
    """
    cost = query_cost
    if cost is None:
        cost = latest_query_cost(output_dir) or DEFAULT_QUERY_COST
    if not (math.isfinite(cost) and round(cost, 6) > 0):
        raise typer.BadParameter(
            f"expected a number of tokens > 0 at 6 decimals, got {cost}",
            param_hint="--query-cost",
        )

    # Import the model only once the user has paid: loading it takes seconds
    started = False

    def generate(text: str) -> str:
        nonlocal started
        started = True
        from hydraai.inference import generate_text

        return generate_text(text, max_new_tokens=max_new_tokens, output_dir=output_dir)

    with _open_ledger(ctx) as ledger:
        try:
            reply = ledger.charge_query(user_id, prompt, generate, cost=cost)
        except Exception as exc:
            # A failure of the model, after the charge, was refunded
            if not started or isinstance(exc, LedgerError):
                raise
            _fail(
                f"Generation failed, so the {format_tokens(cost)} tokens were "
                f"refunded: {type(exc).__name__}: {exc}"
            )
        balance = ledger.balance(user_id)
    typer.echo(reply)
    typer.echo(
        f"Charged {format_tokens(cost)} tokens to {user_id}; "
        f"balance now {format_tokens(balance)}.",
        err=True,
    )


@app.command()
def verify(ctx: typer.Context) -> None:
    """Check the ledger's invariants: print each violation and exit 1, else OK.

    Example: hydra-ledger verify
    """
    with _open_ledger(ctx) as ledger:
        problems = ledger.verify()
    for problem in problems:
        typer.echo(problem)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"OK: the ledger at {ctx.obj} holds every invariant.")


@app.command()
def export(
    ctx: typer.Context,
    export_format: Annotated[
        ExportFormat, typer.Option("--format", help="csv or json.")
    ],
    table: Annotated[
        TableName | None,
        typer.Option(help="One table; JSON without it holds every table."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="File to write instead of stdout.")
    ] = None,
) -> None:
    """Export ledger tables as CSV or JSON, to stdout or a file.

    CSV holds one table, so it needs --table.

    Example: hydra-ledger export --format csv --table journal --out journal.csv
    """
    if export_format == "csv" and table is None:
        raise typer.BadParameter(
            f"CSV holds one table; expected one of {', '.join(TABLES)}",
            param_hint="--table",
        )
    with _open_ledger(ctx) as ledger:
        tables = ledger.export()
        columns = ledger.columns(table.value) if table else []

    # Render the chosen tables, then write them where asked
    data: Any = tables[table.value] if table else tables
    if export_format == "json":
        text = json.dumps(data, indent=2) + "\n"
    else:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(data)
        text = buffer.getvalue()
    if out is None:
        typer.echo(text, nl=False)
        return
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        _fail(f"Cannot write {out}: {exc.strerror}; expected a writable file path.")
    typer.echo(f"Wrote {table.value if table else 'every table'} to {out}", err=True)


@app.command()
def report(
    ctx: typer.Context,
    run_name: Annotated[
        str, typer.Argument(metavar="RUN_NAME", help="The run-name to report on.")
    ],
    output_dir: Annotated[
        Path,
        typer.Option(envvar="HYDRA_OUTPUT_DIR", help="Where the run was written."),
    ] = DEFAULT_OUTPUT_DIR,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Folder for the report (default: <output-dir>/RUN_NAME/report)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Chart a run's loss, tasks and tokens paid, and summarise it in report.md.

    Writes validation.png, tasks.png, tokens_per_user.png and report.md. The
    ledger is --db when given, else the run's own, <output-dir>/<ledger-db>.

    Example: hydra-ledger report run-20250101-120000 --out /tmp/report
    """
    # Import matplotlib only here: it would slow every other command down
    from hydraai.report import CHARTS, ledger_path_of, write_report

    # The run's own ledger, unless --db or HYDRA_LEDGER_DB names another
    run_dir = output_dir / run_name
    source = ctx.parent.get_parameter_source("db") if ctx.parent else None
    given = source not in (None, click.core.ParameterSource.DEFAULT)
    ledger_path = ctx.obj if given else ledger_path_of(run_dir)
    if run_dir.is_dir() and not ledger_path.is_file():
        _fail(
            f"No ledger database at {ledger_path}; expected the file run "
            f"'{run_name}' paid into. Pass --db PATH or set HYDRA_LEDGER_DB."
        )
    try:
        path = write_report(run_dir, ledger_path, out)
    except HydraError as exc:
        _fail(str(exc))
    except sqlite3.Error as exc:
        _fail(f"The ledger at {ledger_path} could not be read: {exc}.")
    except OSError as exc:
        _fail(
            f"{exc.strerror}: {exc.filename}; expected a readable run folder and "
            f"a writable report folder (--out DIR)."
        )

    files = [path.parent / name for name in (*CHARTS, path.name)]
    if as_json:
        _echo_json(
            {"run_name": run_name, "report": str(path), "files": list(map(str, files))}
        )
        return
    typer.echo(f"Report of run '{run_name}': {path}")
    for file in files[:-1]:
        typer.echo(f"  {file}")
