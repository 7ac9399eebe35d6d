"""Shared pieces for tests that run real Flower simulations."""

from __future__ import annotations

import logging

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

from hydraai import server_app
from hydraai.client_app import app as honest_client_app
from hydraai.config import RunConfig


def tiny_config(tmp_path, **changes) -> RunConfig:
    """A run small enough for a test: a 1-layer model on the built-in corpus."""
    values = dict(
        num_server_rounds=2,
        local_steps=3,
        batch_size=4,
        learning_rate=0.01,
        block_size=32,
        n_embd=32,
        n_layer=1,
        n_head=2,
        vocab_size=400,
        sample_tokens=8,
        run_name="tiny",
        output_dir=str(tmp_path / "outputs"),
    )
    values.update(changes)
    return RunConfig(**values)


def simulate(
    config: RunConfig,
    num_supernodes: int = 2,
    client_app: ClientApp = honest_client_app,
) -> list[dict]:
    """Run the real ServerApp against a ClientApp in Flower's simulation engine.

    `run_simulation` does not read pyproject.toml, so the config is handed to
    the coordinator's `run` directly. Returns the run's metrics records.
    """
    records: list[dict] = []
    app = ServerApp()

    @app.main()
    def main(grid, context):
        server_app.setup_logging()
        records.extend(server_app.run(grid, config))

    run_simulation(
        server_app=app,
        client_app=client_app,
        num_supernodes=num_supernodes,
        backend_config={"client_resources": {"num_cpus": 1}},
    )
    logging.getLogger("hydraai").handlers.clear()
    return records
