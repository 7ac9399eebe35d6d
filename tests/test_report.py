"""Tests of run reports: the charts, report.md and `hydra-ledger report`."""

import json
import math
import struct

import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from helpers import simulate, tiny_config
from typer.testing import CliRunner

from hydraai import client_app, report, server_app
from hydraai.ledger import Ledger, TaskOutcome
from hydraai.ledger_cli import app
from hydraai.report import CHARTS, REPORT_FILE

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STALE_PARTITION = 2

# A federation of three volunteers in which one always trains a stale model.
stale_node_app = ClientApp()


@stale_node_app.train()
def stale_train(msg: Message, context: Context) -> Message:
    reply = client_app.train(msg, context)
    if context.node_config["partition-id"] == STALE_PARTITION:
        reply.content["report"]["model-sha256"] = "0" * 64
    return reply


@stale_node_app.evaluate()
def honest_evaluate(msg: Message, context: Context) -> Message:
    return client_app.evaluate(msg, context)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """The output-dir of one real 2-round run 'tiny' of 3 nodes, 1 of them stale."""
    root = tmp_path_factory.mktemp("report")
    simulate(tiny_config(root), num_supernodes=3, client_app=stale_node_app)
    return root / "outputs"


def invoke(*args):
    """Run hydra-ledger in-process, with no ledger named by the environment."""
    return CliRunner().invoke(app, list(args), env={"HYDRA_LEDGER_DB": None})


def png_size(path):
    """(width, height) of a PNG file, read from its IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert result.stdout == ""


def records(rounds, nodes=2):
    """Hand-made metrics records: round 0, then `rounds` rounds of `nodes` tasks."""
    made = [{"server_round": 0, "val_loss": 6.0, "val_perplexity": math.exp(6.0)}]
    for n in range(1, rounds + 1):
        loss = 6.0 - 0.5 * n
        made.append(
            {
                "server_round": n,
                "val_loss": loss,
                "val_perplexity": math.exp(loss),
                "accepted": nodes - 1,
                "rejected": 1,
                "failed": 0,
                "train_loss": None if n == 1 else loss - 0.1,
                "train_tokens": 100,
                "tokens_paid": 2.0 * (nodes - 1),
                "seconds": 1.5,
            }
        )
    return made


def tasks(rewards):
    """Ledger task rows paying each user the given rewards."""
    return [
        {"user_id": user, "status": "completed", "reward": reward, "reason": ""}
        for user, reward in rewards
    ]


def drawn(fig):
    """Render the figure once, so that ticks and text have their final places."""
    fig.canvas.draw()
    return fig


# The report of a real run


def test_report_writes_valid_charts_and_a_summary_that_embeds_them(outputs):
    result = invoke("report", "tiny", "--output-dir", str(outputs))

    assert result.exit_code == 0, result.output
    out_dir = outputs / "tiny" / "report"
    assert f"{out_dir / REPORT_FILE}" in result.stdout
    markdown = (out_dir / REPORT_FILE).read_text()
    for chart in CHARTS:
        width, height = png_size(out_dir / chart)
        assert width >= 600 and height >= 200
        assert (out_dir / chart).stat().st_size > 10_000
        assert f"]({chart})" in markdown
    sample = (outputs / "tiny" / "sample.txt").read_text().strip()
    assert sample and sample in markdown


def test_report_summary_counts_tasks_and_tokens_from_the_ledger(outputs):
    path = report.write_report(outputs / "tiny", outputs / "ledger.db")
    markdown = path.read_text()

    # 2 rounds of 3 tasks; the stale node's 2 are rejected. Each of the other
    # 4 reported its 3 assigned steps and earned reward-per-task, 2.0.
    assert path == outputs / "tiny" / "report" / REPORT_FILE
    assert "- rounds trained: 2 of 2" in markdown
    assert "- tasks: 4 accepted, 2 rejected, 0 failed" in markdown
    assert "- tokens paid: 8 to 2 of 3 users with tasks" in markdown
    assert "| rejected | trained from another global model" in markdown
    assert "| `num-server-rounds` | 2 |" in markdown
    with Ledger(outputs / "ledger.db") as ledger:
        rows = report.tokens_per_user(ledger.tasks(run_name="tiny"))
    assert rows == [("volunteer-0", 4.0, 1), ("volunteer-1", 4.0, 1)] + [
        (f"volunteer-{STALE_PARTITION}", 0.0, 1)
    ]


def test_report_json_names_the_files_written_to_out(outputs, tmp_path):
    out_dir = tmp_path / "elsewhere"
    result = invoke(
        "report", "tiny", "--output-dir", str(outputs), "--out", str(out_dir), "--json"
    )

    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout)
    assert written["report"] == str(out_dir / REPORT_FILE)
    assert sorted(written["files"]) == sorted(
        str(out_dir / name) for name in (*CHARTS, REPORT_FILE)
    )
    assert all((out_dir / name).is_file() for name in (*CHARTS, REPORT_FILE))


# Errors


def test_an_unknown_run_is_one_line_naming_the_runs_there(tmp_path):
    (tmp_path / "outputs" / "demo").mkdir(parents=True)
    (tmp_path / "outputs" / "demo" / "metrics.json").write_text("[]")
    result = invoke("report", "nope", "--output-dir", str(tmp_path / "outputs"))
    assert_one_line_error(result, "No run 'nope'", "expected one of: demo")


def test_a_run_without_metrics_is_one_line(tmp_path):
    (tmp_path / "outputs" / "starting").mkdir(parents=True)
    Ledger(tmp_path / "outputs" / "ledger.db").close()
    result = invoke("report", "starting", "--output-dir", str(tmp_path / "outputs"))
    assert_one_line_error(result, "'starting' has no metrics.json yet")


def test_a_missing_ledger_is_one_line_and_not_created(tmp_path):
    run_dir = tmp_path / "outputs" / "demo"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps(records(1)))
    missing = tmp_path / "other.db"
    result = invoke(
        "--db", str(missing), "report", "demo", "--output-dir", str(run_dir.parent)
    )
    assert_one_line_error(result, "No ledger database", str(missing))
    assert not missing.exists()
    assert not (run_dir / "report").exists()


def test_damaged_metrics_are_one_line(tmp_path):
    run_dir = tmp_path / "outputs" / "demo"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text('{"server_round": ')
    Ledger(tmp_path / "outputs" / "ledger.db").close()
    result = invoke("report", "demo", "--output-dir", str(run_dir.parent))
    assert_one_line_error(result, "metrics.json is not a list of metrics records")


# A report from hand-made files, without Flower


def test_a_run_before_its_first_checkpoint_still_reports(ledger, ledger_path):
    run_dir = ledger_path.parent / "early"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps(records(0)))

    markdown = report.write_report(run_dir, ledger_path).read_text()

    assert "- rounds trained: 0 of ?" in markdown
    assert "No checkpoint yet" in markdown
    assert "No sample" in markdown
    assert all((run_dir / "report" / chart).is_file() for chart in CHARTS)


def test_a_sample_with_backticks_stays_inside_its_code_block(ledger, ledger_path):
    run_dir = ledger_path.parent / "quoted"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps(records(1)))
    (run_dir / "sample.txt").write_text("The ```fence``` and | pipe\n")

    markdown = report.write_report(run_dir, ledger_path).read_text()

    assert "````text\nThe ```fence``` and | pipe\n````" in markdown


# The charts, on hand-made records


def test_validation_chart_labels_its_axes_with_units_and_integer_rounds():
    fig = drawn(report.plot_validation(records(2), "two"))
    loss_ax, ppl_ax = fig.axes

    assert loss_ax.get_xlabel() == ppl_ax.get_xlabel() == "round"
    assert loss_ax.get_ylabel() == "loss (nats/token)"
    assert ppl_ax.get_ylabel() == "validation perplexity"
    assert "two" in fig.get_suptitle()
    visible = [t for t in loss_ax.get_xticks() if -0.5 <= t <= 2.5]
    assert visible == [0, 1, 2]
    validation, train = loss_ax.get_lines()
    assert list(validation.get_xdata()) == [0, 1, 2]
    assert list(train.get_xdata()) == [2]  # round 1 has no train loss


def test_validation_chart_of_round_0_alone_has_one_integer_tick():
    loss_ax, _ = drawn(report.plot_validation(records(0), "new")).axes
    assert [t for t in loss_ax.get_xticks() if -0.5 <= t <= 0.5] == [0]


def test_perplexity_turns_to_a_log_scale_when_it_spans_orders_of_magnitude():
    _, ppl_ax = report.plot_validation(records(8), "long").axes
    assert ppl_ax.get_yscale() == "log"
    assert "log scale" in ppl_ax.get_ylabel()


def test_tasks_chart_stacks_accepted_rejected_and_failed_per_round():
    made = records(2, nodes=3)
    made[2].update(accepted=0, rejected=1, failed=2)
    ax = drawn(report.plot_tasks(made, "two")).axes[0]

    # One bar per round and status, each on top of the statuses before it.
    bars = [
        (p.get_x() + p.get_width() / 2, p.get_y(), p.get_height()) for p in ax.patches
    ]
    accepted = [(1, 0, 2), (2, 0, 0)]
    rejected = [(1, 2, 1), (2, 0, 1)]
    failed = [(1, 3, 0), (2, 1, 2)]
    assert bars == accepted + rejected + failed
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("round", "tasks")
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["accepted", "rejected", "failed"]
    assert all(t == int(t) for t in ax.get_yticks())


def test_tokens_per_user_keeps_the_top_users_and_sums_the_others():
    rows = report.tokens_per_user(
        tasks([("b", 1.0), ("a", 3.0), ("c", 1.0), ("a", 1.0), ("d", 0.5)]), top=3
    )
    assert rows == [("a", 4.0, 1), ("b", 1.0, 1), ("others (2 users)", 1.5, 2)]
    assert len(report.tokens_per_user(tasks([("a", 1.0), ("b", 1.0)]), top=2)) == 2


def test_tokens_chart_of_100_users_is_readable():
    many = tasks([(f"volunteer-{i:03d}", 0.1 * i) for i in range(100)])
    fig = drawn(report.plot_tokens_per_user(many, "crowd"))
    ax = fig.axes[0]

    # The 14 top earners and one bar for the other 86, whose labels never overlap.
    names = [t.get_text() for t in ax.get_yticklabels()]
    assert names[0] == "volunteer-099"
    assert names[-1] == "others (86 users)"
    assert len(names) == report.TOP_USERS
    boxes = [t.get_window_extent() for t in ax.get_yticklabels()]
    assert not any(a.overlaps(b) for a, b in zip(boxes, boxes[1:], strict=False))
    assert ax.get_xlabel() == "tokens"
    assert "to 99 of 100 users" in fig.get_suptitle()


def test_a_dollar_in_a_user_id_is_drawn_as_is():
    fig = drawn(report.plot_tokens_per_user(tasks([("$bob$", 1.0)]), "run"))
    assert fig.axes[0].get_yticklabels()[0].get_text() == r"\$bob\$"


def test_every_chart_saves_as_a_png(tmp_path):
    figures = {
        "validation.png": report.plot_validation(records(2), "two"),
        "tasks.png": report.plot_tasks(records(0), "none"),
        "tokens.png": report.plot_tokens_per_user([], "none"),
    }
    for name, fig in figures.items():
        width, height = png_size(report.save_chart(fig, tmp_path / name))
        assert width > 500 and height > 200


# The round log line and the names shared with the ServerApp


def test_round_log_counts_rejections_by_reason():
    outcomes = [
        TaskOutcome(1, "rejected", reason="trained from another global model"),
        TaskOutcome(2, "rejected", reason="metric 'train-loss' is negative: -1"),
        TaskOutcome(3, "rejected", reason="metric 'train-loss' is negative: -2"),
        TaskOutcome(4, "failed", reason="no reply before the round timeout"),
        TaskOutcome(5, "completed"),
    ]
    assert server_app._reason_counts(outcomes, "rejected") == (
        " (2 metric 'train-loss' is negative; 1 trained from another global model)"
    )
    assert server_app._reason_counts(outcomes[4:], "rejected") == ""


def test_report_reads_the_files_the_server_app_writes():
    assert report.METRICS_FILE == server_app.METRICS_FILE
    assert report.SAMPLE_FILE == server_app.SAMPLE_FILE
