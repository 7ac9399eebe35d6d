"""Run reports: charts of how a run learned and paid, and a Markdown summary."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from hydraai.checkpoint import LATEST, STATE
from hydraai.errors import LedgerError, ReportError
from hydraai.ledger import Ledger, format_tokens

logger = logging.getLogger(__name__)

# What the ServerApp writes into each run folder (server_app.METRICS_FILE and
# SAMPLE_FILE); named again here so a report needs neither torch nor Flower.
METRICS_FILE = "metrics.json"
SAMPLE_FILE = "sample.txt"
# Keys every metrics record has, round 0 included.
RECORD_KEYS = ("server_round", "val_loss", "val_perplexity")

REPORT_DIR = "report"
REPORT_FILE = "report.md"
VALIDATION_CHART = "validation.png"
TASKS_CHART = "tasks.png"
TOKENS_CHART = "tokens_per_user.png"
CHARTS = (VALIDATION_CHART, TASKS_CHART, TOKENS_CHART)

# Users drawn with a bar each; the others share one bar, so a federation of
# hundreds still gives a readable chart.
TOP_USERS = 15
DPI = 120
# Beyond this many rounds a line's markers would merge into a smear.
MARKER_ROUNDS = 30
# Perplexity is drawn on a log scale once it spans more than this factor.
LOG_PERPLEXITY_SPAN = 10.0
STATUS_COLORS = {"accepted": "tab:green", "rejected": "tab:orange", "failed": "tab:red"}


@dataclass
class RunData:
    """Everything a report shows about one run."""

    run_name: str
    records: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    sample: str = ""
    tasks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def trained(self) -> list[dict[str, Any]]:
        """The records of rounds that trained (round 1 on)."""
        return [r for r in self.records if r["server_round"] > 0]


def write_report(run_dir: Path, ledger_path: Path, out_dir: Path | None = None) -> Path:
    """Write the charts and report.md of the run in run_dir; return report.md's path.

    Parameters
    ----------
    run_dir : Path
        The run's folder, ``<output-dir>/<run-name>``, with its metrics.json.
    ledger_path : Path
        The ledger the run paid into, ``<output-dir>/<ledger-db>``.
    out_dir : Path, optional
        Where to write; default ``<run_dir>/report``. Created if missing.
    """
    run = load_run(Path(run_dir), Path(ledger_path))
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)

    # Draw each chart, then the summary that embeds them.
    save_chart(plot_validation(run.records, run.run_name), out_dir / VALIDATION_CHART)
    save_chart(plot_tasks(run.records, run.run_name), out_dir / TASKS_CHART)
    save_chart(plot_tokens_per_user(run.tasks, run.run_name), out_dir / TOKENS_CHART)
    path = out_dir / REPORT_FILE
    path.write_text(render_markdown(run), encoding="utf-8")
    logger.info("report of run '%s' written to %s", run.run_name, path)
    return path


def load_run(run_dir: Path, ledger_path: Path) -> RunData:
    """Read a run's metrics, config, sample and ledger tasks."""
    records = read_metrics(run_dir)
    if not ledger_path.is_file():
        raise LedgerError(
            f"No ledger database at {ledger_path}; expected the file the run's "
            f"ServerApp writes, <output-dir>/<ledger-db>; pass that path."
        )
    with Ledger(ledger_path) as ledger:
        tasks = ledger.tasks(run_name=run_dir.name)
    sample_path = run_dir / SAMPLE_FILE
    sample = sample_path.read_text(encoding="utf-8") if sample_path.exists() else ""
    return RunData(
        run_name=run_dir.name,
        records=records,
        config=read_run_config(run_dir),
        sample=sample.strip(),
        tasks=tasks,
    )


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The run's metrics records, oldest round first; raise if there are none."""
    if not run_dir.is_dir():
        runs = sorted(p.parent.name for p in run_dir.parent.glob(f"*/{METRICS_FILE}"))
        if runs:
            fix = f"; expected one of: {', '.join(runs)}"
        elif run_dir.parent.is_dir():
            fix = ", which holds no runs; pass the output-dir the run wrote to"
        else:
            fix = ", which does not exist; pass the output-dir the run wrote to"
        raise ReportError(f"No run '{run_dir.name}' in {run_dir.parent}{fix}.")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise ReportError(
            f"Run '{run_dir.name}' has no {METRICS_FILE} yet; the ServerApp writes "
            f"it once round 0 is evaluated. Wait for the run to start, then retry."
        )
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
        for record in records:
            missing = [key for key in RECORD_KEYS if key not in record]
            if missing:
                raise KeyError(f"a record without {', '.join(missing)}")
        records = sorted(records, key=lambda r: r["server_round"])
    except (ValueError, TypeError, KeyError) as err:
        raise ReportError(
            f"{path} is not a list of metrics records ({err}); it was damaged "
            f"after the run wrote it. Restore it or report on another run."
        ) from None
    if not records:
        raise ReportError(f"{path} holds no records yet; retry once round 0 is done.")
    return records


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The resolved config in the latest checkpoint, or {} before the first one."""
    try:
        folder = run_dir / (run_dir / LATEST).read_text(encoding="utf-8").strip()
        state = json.loads((folder / STATE).read_text(encoding="utf-8"))
        return dict(state["config"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def ledger_path_of(run_dir: Path) -> Path:
    """Where a run's ledger is: ``<output-dir>/<ledger-db>`` from its config."""
    config = read_run_config(run_dir)
    return run_dir.parent / config.get("ledger-db", "ledger.db")


# Charts


def plot_validation(records: list[dict[str, Any]], run_name: str) -> Figure:
    """Validation loss and perplexity per round, with the replies' train loss."""
    rounds = [r["server_round"] for r in records]
    marker = "o" if len(rounds) <= MARKER_ROUNDS else None
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, ppl_ax = fig.subplots(1, 2)

    # Loss: validation from round 0, and the mean train loss of accepted replies.
    loss_ax.plot(
        rounds, [r["val_loss"] for r in records], marker=marker, label="validation"
    )
    trained = [(r["server_round"], r.get("train_loss")) for r in records]
    trained = [(n, loss) for n, loss in trained if loss is not None]
    if trained:
        loss_ax.plot(
            *zip(*trained, strict=True),
            linestyle="--",
            marker=marker and "s",
            color="tab:gray",
            label="train (mean of accepted replies)",
        )
    loss_ax.set_ylabel("loss (nats/token)")
    loss_ax.set_title("Loss")
    loss_ax.legend(loc="best", fontsize="small")

    # Perplexity is exp(loss): a log scale keeps a long run's tail readable.
    perplexities = [r["val_perplexity"] for r in records]
    ppl_ax.plot(rounds, perplexities, marker=marker)
    ppl_ax.set_ylabel("validation perplexity")
    if max(perplexities) > LOG_PERPLEXITY_SPAN * min(perplexities):
        ppl_ax.set_yscale("log")
        ppl_ax.set_ylabel("validation perplexity (log scale)")
    ppl_ax.set_title("Validation perplexity")
    for ax in (loss_ax, ppl_ax):
        _round_axis(ax, rounds)
        ax.grid(alpha=0.3)
    _suptitle(
        fig, "Loss and perplexity per round (round 0 = before training)", run_name
    )
    return fig


def plot_tasks(records: list[dict[str, Any]], run_name: str) -> Figure:
    """Accepted, rejected and failed tasks per round, stacked."""
    trained = [r for r in records if r["server_round"] > 0]
    rounds = [r["server_round"] for r in trained]
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()

    # Stack each status on the ones below it.
    bottom = [0] * len(trained)
    for status, color in STATUS_COLORS.items():
        counts = [r.get(status, 0) for r in trained]
        ax.bar(rounds, counts, bottom=bottom, color=color, label=status, width=0.8)
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]

    ax.set_ylabel("tasks")
    ax.set_ylim(0, max([*bottom, 1]) * 1.05)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    _round_axis(ax, rounds or [1])
    if trained:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    else:
        ax.set_xticks([])
        _note(ax, "no round has finished yet")
    ax.grid(axis="y", alpha=0.3)
    _suptitle(fig, "Tasks per round by outcome", run_name)
    return fig


def plot_tokens_per_user(
    tasks: list[dict[str, Any]], run_name: str, top: int = TOP_USERS
) -> Figure:
    """Tokens each user earned in the run, highest first, the tail as "others".

    The "others" bar is their mean per user, so that it shares the scale of
    the single users' bars; its label also gives their total.
    """
    bars = tokens_per_user(tasks, top)
    total = sum(tokens for _, tokens, _ in bars)
    users = sum(count for _, _, count in bars)
    paid = len({t["user_id"] for t in tasks if t["user_id"] and t["reward"] > 0})
    fig = Figure(figsize=(8, 1.6 + 0.32 * max(len(bars), 2)), layout="constrained")
    ax = fig.subplots()

    # Horizontal bars leave room for long user ids; the largest is on top.
    names = [_plain(_shorten(name)) for name, _, _ in bars]
    values = [tokens / count for _, tokens, count in bars]
    labels = [
        _number(tokens)
        if count == 1
        else f"{_number(tokens / count)} each, {_number(tokens)} in all"
        for _, tokens, count in bars
    ]
    colors = ["tab:blue" if count == 1 else "tab:gray" for _, _, count in bars]
    drawn = ax.barh(range(len(bars)), values, color=colors)
    ax.bar_label(drawn, labels=labels, padding=3)
    ax.set_yticks(range(len(bars)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, max([*values, 1]) * 1.3)
    ax.set_xlabel("tokens")
    ax.grid(axis="x", alpha=0.3)
    if not bars:
        ax.set_xticks([])
        _note(ax, "no task of this run is in the ledger yet")
    _suptitle(
        fig,
        f"Tokens paid per user: {_number(total)} tokens in all, "
        f"to {paid} of {users} users with tasks",
        run_name,
    )
    return fig


def tokens_per_user(
    tasks: list[dict[str, Any]], top: int = TOP_USERS
) -> list[tuple[str, float, int]]:
    """(name, tokens, users) rows: the top users by reward, then "others".

    Each user has a row of their own (users 1) while there are at most ``top``;
    past that, the top - 1 highest earners do and one "others (n users)" row
    holds the rest. Every user with a task in the run counts, so a user whose
    every reply was rejected shows 0. Ties are broken by user_id.
    """
    earned: dict[str, float] = defaultdict(float)
    for task in tasks:
        if task["user_id"]:
            earned[task["user_id"]] += task["reward"]
    ranked = sorted(earned.items(), key=lambda item: (-item[1], item[0]))
    rows = [(user, tokens, 1) for user, tokens in ranked]
    if len(rows) <= top:
        return rows
    rest = ranked[top - 1 :]
    others = (f"others ({len(rest)} users)", sum(t for _, t in rest), len(rest))
    return [*rows[: top - 1], others]


def save_chart(fig: Figure, path: Path) -> Path:
    """Render a figure to a PNG file with the Agg backend."""
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _suptitle(fig: Figure, what: str, run_name: str) -> None:
    """Title a chart with what it shows, and the run on a line of its own."""
    fig.suptitle(f"{what}\nrun {_plain(run_name)}", fontsize="large")


def _round_axis(ax: Axes, rounds: list[int]) -> None:
    """Label the x axis "round", with integer ticks and half a round of margin."""
    ax.set_xlabel("round")
    ax.set_xlim(min(rounds) - 0.5, max(rounds) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def _note(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def _plain(text: str) -> str:
    """Text matplotlib draws as is: a '$' would start mathtext."""
    return text.replace("$", r"\$")


def _number(value: float) -> str:
    """A token amount short enough for a chart: at most 2 decimals."""
    return f"{value:,.2f}".rstrip("0").rstrip(".")


def _shorten(text: str, width: int = 28) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


# The Markdown summary


def render_markdown(run: RunData) -> str:
    """The report: final metrics, the charts, rejections, the sample, the config."""
    sections = [
        f"# Run report: {run.run_name}",
        _overview(run),
        "## Final metrics\n\n" + _metrics_table(run.records),
        f"## Learning\n\n![Validation loss and perplexity per round]"
        f"({VALIDATION_CHART})",
        f"## Tasks\n\n![Accepted, rejected and failed tasks per round]({TASKS_CHART})",
        _reasons_table(run.tasks),
        f"## Rewards\n\n![Tokens paid per user]({TOKENS_CHART})",
        "## Sample from the final model\n\n" + _fenced(run.sample),
        "## Config\n\n" + _config_table(run.config),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def _overview(run: RunData) -> str:
    trained = run.trained
    planned = run.config.get("num-server-rounds", "?")
    statuses = Counter(t["status"] for t in run.tasks)
    paid = sum(t["reward"] for t in run.tasks)
    users = {t["user_id"] for t in run.tasks if t["user_id"]}
    earners = {t["user_id"] for t in run.tasks if t["user_id"] and t["reward"] > 0}
    seconds = sum(r.get("seconds", 0.0) for r in trained)
    written = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            f"- rounds trained: {len(trained)} of {planned}",
            f"- tasks: {statuses['completed']} accepted, {statuses['rejected']} "
            f"rejected, {statuses['failed']} failed",
            f"- training tokens in accepted replies: "
            f"{sum(r.get('train_tokens', 0) for r in trained):,}",
            f"- tokens paid: {format_tokens(paid)} to {len(earners)} of "
            f"{len(users)} users with tasks",
            f"- time in rounds: {seconds:.1f} s",
            f"- report written {written}",
        ]
    )


def _metrics_table(records: list[dict[str, Any]]) -> str:
    first, last = records[0], records[-1]
    start = "before training" if first["server_round"] == 0 else "first"
    rows = [
        f"| | round {first['server_round']} ({start}) "
        f"| round {last['server_round']} (latest) |",
        "|---|---:|---:|",
        f"| validation loss (nats/token) | {first['val_loss']:.4f} "
        f"| {last['val_loss']:.4f} |",
        f"| validation perplexity | {first['val_perplexity']:.1f} "
        f"| {last['val_perplexity']:.1f} |",
    ]
    train_loss = last.get("train_loss")
    if train_loss is not None:
        rows.append(f"| train loss, accepted replies | | {train_loss:.4f} |")
    return "\n".join(rows)


def _reasons_table(tasks: list[dict[str, Any]]) -> str:
    """Why tasks were rejected or failed, most frequent first; "" if none were."""
    reasons = Counter(
        (t["status"], t["reason"] or "no reason recorded")
        for t in tasks
        if t["status"] in ("rejected", "failed")
    )
    if not reasons:
        return ""
    rows = ["| outcome | reason | tasks |", "|---|---|---:|"]
    for (status, reason), count in reasons.most_common():
        rows.append(f"| {status} | {_cell(reason)} | {count} |")
    return "### Rejected and failed tasks\n\n" + "\n".join(rows)


def _config_table(config: dict[str, Any]) -> str:
    if not config:
        return "No checkpoint yet, so the resolved config is not known."
    rows = ["| key | value |", "|---|---|"]
    rows += [f"| `{key}` | {_cell(json.dumps(config[key]))} |" for key in config]
    return "From the latest checkpoint's state.json.\n\n" + "\n".join(rows)


def _fenced(text: str) -> str:
    """A code block that holds the text, whatever backticks it contains."""
    if not text:
        return "No sample: the run has not finished, or sample-tokens is 0."
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def _cell(text: str) -> str:
    """Text that stays inside one Markdown table cell."""
    return " ".join(str(text).split()).replace("|", r"\|")
