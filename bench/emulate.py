"""A federation in one process: HydraAI's own strategy and ClientApp, no transport.

Each round calls BlendedFedAvg.configure_train, the ClientApp itself on every
message, BlendedFedAvg.aggregate_train (checks, defences, aggregate and the
server optimizer) and the server's own validation, as a Flower run does; only
Flower's messaging and Ray are left out. Given the node ids of a real run it
reproduces that run's training, since a node's batches are seeded by its id.
"""

from __future__ import annotations

import functools
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from tokenizers import Tokenizer

from hydraai import server_app
from hydraai.client_app import app as client_app
from hydraai.config import RunConfig
from hydraai.data import encode, load_corpus, random_batch, split_corpus
from hydraai.model import SimpleTransformer
from hydraai.protocol import METRICS
from hydraai.schedule import warmup
from hydraai.server_app import RunState
from hydraai.tokenizer import eot_id
from hydraai.training import evaluate_loss

# Node ids of the emulated federations; a node's batches are seeded by its id.
NODES = (1001, 2002, 3003, 4004)
OTHER_NODES = (5005, 6006, 7007, 8008)

# Messages can only be built inside a run; give this process one.
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


class LocalGrid:
    """The part of a Grid the strategy reads: the connected nodes."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def get_nodes(self) -> list:
        return []  # no authenticated identities in a simulation


@dataclass
class History:
    """Validation loss after each round (round 0 first) and tokens trained by then."""

    val_loss: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)
    seconds: float = 0.0


@functools.cache
def prepared(config: RunConfig) -> tuple[RunState, ArrayRecord]:
    """The ServerApp's own preparation: tokenizer, validation text, initial model."""
    run_dir = Path(tempfile.mkdtemp(prefix="hydra-bench-"))
    return server_app.prepare(config.replace(run_name="bench"), run_dir, None)


def validate(state: RunState, arrays: ArrayRecord) -> float:
    """The server's validation loss of a global model (RoundEnd.validate)."""
    return server_app.RoundEnd(state, None, None).validate(arrays)


class Federation:
    """A federation of nodes, partition i on node_ids[i], stepped round by round."""

    def __init__(self, config: RunConfig, node_ids: list[int]) -> None:
        self.config = config
        self.node_ids = list(node_ids)
        self.state, self.arrays = prepared(config)
        self.strategy = server_app.make_strategy(config, self.state, None)
        self.train_config = server_app.task_record(config)
        self.grid = LocalGrid(self.node_ids)
        self.contexts = {
            node_id: Context(
                run_id=1,
                node_id=node_id,
                node_config={"partition-id": i, "num-partitions": len(node_ids)},
                state=RecordDict(),
                run_config={},
            )
            for i, node_id in enumerate(self.node_ids)
        }
        self.history = History(val_loss=[validate(self.state, self.arrays)], tokens=[0])

    @property
    def rounds(self) -> int:
        return len(self.history.val_loss) - 1

    def step(self) -> float:
        """Train one round; return the new validation loss."""
        start = time.perf_counter()
        server_round = self.rounds + 1

        # Send, train on every node with the ClientApp itself, check and blend.
        messages = self.strategy.configure_train(
            server_round, self.arrays, self.train_config, self.grid
        )
        replies = [
            client_app(m, self.contexts[m.metadata.dst_node_id]) for m in messages
        ]
        new, metrics = self.strategy.aggregate_train(server_round, replies)
        if new is not None:
            self.arrays = new
        # Every reply's tokens count, rejected ones too: they were computed.
        trained = sum(int(r.content[METRICS]["train-tokens"]) for r in replies)

        # Score it as the server does after every round.
        loss = validate(self.state, self.arrays)
        history = self.history
        history.val_loss.append(loss)
        history.tokens.append(history.tokens[-1] + trained)
        history.accepted.append(int(metrics["accepted"]))
        history.rejected.append(len(replies) - int(metrics["accepted"]))
        history.seconds += time.perf_counter() - start
        return loss

    def run_until(self, rounds: int) -> History:
        while self.rounds < rounds:
            self.step()
        return self.history


# Federations by (config, node ids), so that a later section continues a run
# an earlier one started instead of training it again.
_RUNS: dict[tuple[RunConfig, tuple[int, ...]], Federation] = {}


def federation(config: RunConfig, node_ids: list[int]) -> Federation:
    key = (config, tuple(node_ids))
    if key not in _RUNS:
        _RUNS[key] = Federation(config, node_ids)
    return _RUNS[key]


def centralized(config: RunConfig, steps: int, eval_every: int) -> History:
    """One AdamW on the whole training split, from the same initial model.

    Uses the same batch sampler, batch size, learning rate, warmup (once, at
    the start) and validation as the federation; the validation loss is taken
    every eval_every steps.
    """
    state, initial = prepared(config)
    tokenizer = Tokenizer.from_str(state.tokenizer_json)
    train, _ = split_corpus(
        load_corpus(config.dataset, config.text_column),
        config.val_fraction,
        config.seed,
    )
    tokens = encode(tokenizer, train["text"], eot_id(tokenizer))

    model = SimpleTransformer(state.model_config)
    model.load_state_dict(initial.to_torch_state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    schedule = warmup(optimizer, config.warmup_steps)
    generator = torch.Generator().manual_seed(config.seed)
    history = History(
        val_loss=[evaluate_loss(model, state.val_tokens, server_app.VAL_WINDOWS)[0]],
        tokens=[0],
    )

    start = time.perf_counter()
    for step in range(1, steps + 1):
        model.train()
        x, y = random_batch(tokens, config.batch_size, config.block_size, generator)
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % eval_every == 0 or step == steps:
            val, _ = evaluate_loss(model, state.val_tokens, server_app.VAL_WINDOWS)
            history.val_loss.append(val)
            history.tokens.append(step * x.numel())
    history.seconds = time.perf_counter() - start
    return history
