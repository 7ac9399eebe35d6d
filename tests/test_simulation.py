"""Real Flower simulations: the federation learns, checkpoints, pays and resumes."""

import json

from helpers import simulate, tiny_config
from typer.testing import CliRunner

from hydraai.checkpoint import Checkpoint
from hydraai.ledger import Ledger
from hydraai.ledger_cli import app as ledger_cli


def test_a_run_learns_checkpoints_pays_and_resumes(tmp_path):
    config = tiny_config(tmp_path)
    run_dir = tmp_path / "outputs" / "tiny"

    # Two rounds: validation loss falls and every round is recorded.
    records = simulate(config)
    assert [r["server_round"] for r in records] == [0, 1, 2]
    assert records[2]["val_loss"] < records[0]["val_loss"]
    assert all(r["accepted"] == 2 and r["rejected"] == 0 for r in records[1:])
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk == records
    for key in ("val_perplexity", "train_tokens", "seconds", "tokens_paid"):
        assert key in on_disk[-1]
    checkpoint = Checkpoint.load(run_dir)
    assert checkpoint.server_round == 2
    assert checkpoint.config["run-name"] == "tiny"
    assert (run_dir / "checkpoint-00002" / "tokenizer.json").exists()
    assert (run_dir / "sample.txt").read_text().strip()

    # Each volunteer did two tasks of 3 assigned steps: 2 * 2.0 tokens.
    with Ledger(tmp_path / "outputs" / "ledger.db") as ledger:
        balances = {row["user_id"]: row["balance"] for row in ledger.balances()}
        assert balances == {"volunteer-0": 4.0, "volunteer-1": 4.0}
        assert ledger.verify() == []

    # A volunteer spends 0.5 of the tokens on a query to the trained model.
    outputs = tmp_path / "outputs"
    result = CliRunner().invoke(
        ledger_cli,
        ["--db", str(outputs / "ledger.db"), "query", "volunteer-0", "The class",
         "--max-new-tokens", "12", "--output-dir", str(outputs)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()
    with Ledger(outputs / "ledger.db") as ledger:
        assert ledger.balance("volunteer-0") == 3.5
        assert ledger.verify() == []

    # Started again with more rounds, the same run-name goes on at round 3.
    resumed = simulate(config.replace(num_server_rounds=3))
    assert [r["server_round"] for r in resumed] == [0, 1, 2, 3]
    assert resumed[:3] == records
    assert Checkpoint.load(run_dir).server_round == 3
    with Ledger(tmp_path / "outputs" / "ledger.db") as ledger:
        balances = {row["user_id"]: row["balance"] for row in ledger.balances()}
        assert balances == {"volunteer-0": 5.5, "volunteer-1": 6.0}
        assert len(ledger.tasks(run_name="tiny", status="completed")) == 6
        assert ledger.verify() == []
