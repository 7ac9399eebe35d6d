"""The coordinator's ServerApp: runs the rounds, evaluates, checkpoints and pays."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from tokenizers import Tokenizer

from hydraai.aggregation import Defences, ServerOptimizer
from hydraai.checkpoint import Checkpoint, write_json_atomic
from hydraai.config import RunConfig
from hydraai.data import encode, eval_windows, load_corpus, split_corpus
from hydraai.errors import CheckpointError, HydraError, RunFailed
from hydraai.ledger import Ledger, TaskOutcome
from hydraai.model import ModelConfig, SimpleTransformer
from hydraai.protocol import TASK_KEYS
from hydraai.strategy import BlendedFedAvg
from hydraai.tokenizer import eot_id, fingerprint, train_tokenizer
from hydraai.training import evaluate_loss, perplexity

logger = logging.getLogger(__name__)

app = ServerApp()

METRICS_FILE = "metrics.json"
SAMPLE_FILE = "sample.txt"
SAMPLE_PROMPT = "The "
# Validation windows scored after every round (block-size tokens each).
VAL_WINDOWS = 64
# Config keys that fix the model's shape; a resumed run must keep them.
SHAPE_KEYS = ("n-embd", "n-layer", "n-head", "block-size", "vocab-size")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Read the run config, then train; a bad config stops before round 1."""
    setup_logging()
    try:
        config = RunConfig.from_run_config(context.run_config)
        run(grid, config)
    except HydraError as err:
        # One line that says what to fix; raising marks the run as failed.
        logger.error("%s: %s", err.__class__.__name__, err)
        raise RunFailed(str(err)) from None


def setup_logging() -> None:
    """Send HydraAI's log records through Flower's handlers, so they are streamed."""
    hydra_logger = logging.getLogger("hydraai")
    flwr_logger = logging.getLogger("flwr")
    if flwr_logger.handlers and not hydra_logger.handlers:
        for handler in flwr_logger.handlers:
            hydra_logger.addHandler(handler)
        hydra_logger.propagate = False
    hydra_logger.setLevel(logging.INFO)


@dataclass
class RunState:
    """What the coordinator knows about the run in progress."""

    config: RunConfig
    run_dir: Path
    tokenizer_json: str
    val_tokens: torch.Tensor
    # Held-out text, apart from val_tokens, for the direction check on updates.
    probe_tokens: torch.Tensor
    model_config: ModelConfig
    start_round: int
    records: list[dict] = field(default_factory=list)
    # The server optimizer's velocity at the checkpoint, if it has one.
    velocity: np.ndarray | None = None

    @property
    def tokenizer_sha256(self) -> str:
        return fingerprint(self.tokenizer_json)


def run(grid: Grid, config: RunConfig) -> list[dict]:
    """Train for the configured rounds, resuming a run-name that has a checkpoint.

    Returns the metrics records of the whole run, one per round from round 0.
    """
    if not config.run_name:
        config = config.replace(
            run_name=datetime.now(UTC).strftime("run-%Y%m%d-%H%M%S")
        )
    run_dir = Path(config.output_dir) / config.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = Checkpoint.load(run_dir)
    state, initial = prepare(config, run_dir, checkpoint)

    remaining = config.num_server_rounds - state.start_round
    if remaining <= 0:
        logger.info(
            "run '%s' already finished %d round(s); raise num-server-rounds to "
            "train on, or start another run-name",
            config.run_name,
            state.start_round,
        )
        return state.records

    # The ledger: settle what a crashed coordinator checkpointed but may not have paid.
    ledger_path = Path(config.output_dir) / config.ledger_db
    ledger = Ledger(ledger_path, reward_per_task=config.reward_per_task)
    if checkpoint is not None:
        pending = [TaskOutcome(**o) for o in checkpoint.state.get("outcomes", [])]
        ledger.settle_round(config.run_name, checkpoint.server_round, pending)
        failed = ledger.fail_unfinished(
            config.run_name, "the coordinator stopped before the round finished"
        )
        logger.info(
            "resuming run '%s' after round %d (%d interrupted task(s) marked failed)",
            config.run_name,
            checkpoint.server_round,
            failed,
        )

    strategy = make_strategy(config, state, ledger)
    round_end = RoundEnd(state, strategy, ledger)
    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=remaining,
            timeout=config.round_timeout,
            train_config=task_record(config),
            evaluate_config=task_record(config),
            evaluate_fn=round_end,
        )
    finally:
        ledger.close()

    write_sample(state, result.arrays if result.arrays is not None else initial)
    logger.info("run '%s' finished; outputs are in %s", config.run_name, run_dir)
    return state.records


def prepare(
    config: RunConfig, run_dir: Path, checkpoint: Checkpoint | None
) -> tuple[RunState, ArrayRecord]:
    """Load data and tokenizer, and the initial or checkpointed global model."""
    corpus = load_corpus(config.dataset, config.text_column)
    train_split, val_split = split_corpus(corpus, config.val_fraction, config.seed)

    # The tokenizer is trained once per run and then travels with the checkpoint.
    if checkpoint is None:
        tokenizer = train_tokenizer(train_split["text"], config.vocab_size)
        tokenizer_json = tokenizer.to_str()
    else:
        check_resumable(config, checkpoint)
        tokenizer_json = checkpoint.tokenizer_json
        tokenizer = Tokenizer.from_str(tokenizer_json)
    val_tokens = encode(tokenizer, val_split["text"], eot_id(tokenizer))
    val_tokens, probe_tokens = split_probe(val_tokens, config)
    model_config = ModelConfig.from_run(config, tokenizer.get_vocab_size())

    # Seeded initial weights, or the checkpoint's.
    if checkpoint is None:
        torch.manual_seed(config.seed)
        model = SimpleTransformer(model_config)
        initial = ArrayRecord(model.state_dict())
        records: list[dict] = []
        logger.info(
            "new run '%s': %d training and %d validation records, vocabulary %d, "
            "model of %.2fM parameters",
            config.run_name,
            len(train_split),
            len(val_split),
            tokenizer.get_vocab_size(),
            model.num_params() / 1e6,
        )
    else:
        initial = ArrayRecord(
            {k: torch.from_numpy(v) for k, v in checkpoint.arrays.items()}
        )
        records = read_records(run_dir)[: checkpoint.server_round + 1]

    state = RunState(
        config=config,
        run_dir=run_dir,
        tokenizer_json=tokenizer_json,
        val_tokens=val_tokens,
        probe_tokens=probe_tokens,
        model_config=model_config,
        start_round=checkpoint.server_round if checkpoint else 0,
        records=records,
        velocity=checkpoint.strategy_arrays.get("velocity") if checkpoint else None,
    )
    return state, initial


def split_probe(
    tokens: torch.Tensor, config: RunConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the probe for the direction check off the end of the validation text.

    Kept apart so that the reported validation loss is not measured on the text
    that decided which updates were accepted; a validation text too short to
    share is used for both.
    """
    probe_len = config.probe_windows * config.block_size + 1
    if config.probe_windows == 0:
        return tokens, tokens[:0]
    if len(tokens) - probe_len < config.block_size + 1:
        logger.warning(
            "the validation text (%d tokens) is too short to set %d probe windows "
            "apart; the direction check uses validation text",
            len(tokens),
            config.probe_windows,
        )
        return tokens, tokens[-probe_len:]
    return tokens[:-probe_len], tokens[-probe_len:]


def check_resumable(config: RunConfig, checkpoint: Checkpoint) -> None:
    """Refuse to resume a checkpoint whose model shape differs from the config."""
    current = config.to_run_config()
    for key in SHAPE_KEYS:
        if checkpoint.config.get(key) != current[key]:
            raise CheckpointError(
                f"run '{config.run_name}' was checkpointed with {key}="
                f"{checkpoint.config.get(key)!r}, but the config now says "
                f"{current[key]!r}; set it back or start another run-name"
            )


def make_strategy(config: RunConfig, state: RunState, ledger: Ledger) -> BlendedFedAvg:
    """The blended FedAvg for this run's config, with its defences."""
    defences = Defences(
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        max_update_factor=config.max_update_factor,
        min_update_factor=config.min_update_factor,
        outlier_factor=config.outlier_factor,
        min_cosine=config.min_cosine,
    )
    downhill = None
    if config.probe_windows > 0:
        downhill = DescentProbe(state.model_config, state.probe_tokens)
    optimizer = ServerOptimizer(
        config.server_optimizer, config.server_momentum, config.server_learning_rate
    )
    optimizer.velocity = state.velocity
    return BlendedFedAvg(
        blend_rate=config.blend_rate,
        assigned_steps=config.local_steps,
        assigned_examples=config.local_steps * config.batch_size,
        tokenizer_sha256=state.tokenizer_sha256,
        tokenizer_json=state.tokenizer_json,
        round_offset=state.start_round,
        ledger=ledger,
        run_name=config.run_name,
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1 if config.fraction_evaluate > 0 else 0,
        min_available_nodes=1,
        defences=defences,
        downhill=downhill,
        aggregation=config.aggregation,
        trim_fraction=config.trim_fraction,
        server_optimizer=optimizer,
        transfer_dtype=config.transfer_dtype,
    )


class DescentProbe:
    """The direction of AdamW's first step on held-out text, flat, in arrays' order.

    A fresh AdamW's first step moves every parameter by one learning rate
    against the sign of its gradient, and an honest node's update is a sum of
    such steps, so the reference an update is compared with is the sign of the
    negative gradient: the server's own update by the nodes' procedure, as
    FLTrust (Cao et al., NDSS 2021) builds it from its root data. The raw
    gradient is a poor reference for AdamW updates: once the first round has
    learned the easy directions, honest updates measured cosines of -0.014 to
    0.02 with it, and the sign of it gave 0.25 to 0.39.
    One model is built for the run and loaded with each round's weights.
    """

    def __init__(self, model_config: ModelConfig, tokens: torch.Tensor) -> None:
        # Eval mode: dropout off, so the direction depends on the weights alone.
        self.model = SimpleTransformer(model_config).eval()
        self.x, self.y = eval_windows(tokens, model_config.block_size, len(tokens))

    def __call__(self, arrays: ArrayRecord) -> np.ndarray:
        self.model.load_state_dict(arrays.to_torch_state_dict())
        self.model.zero_grad(set_to_none=True)
        _, loss = self.model(self.x, self.y)
        loss.backward()
        params = dict(self.model.named_parameters())
        return np.concatenate(
            [-params[name].grad.sign().numpy().ravel() for name in arrays]
        )


def task_record(config: RunConfig) -> ConfigRecord:
    """The task description each node receives; the strategy adds the tokenizer."""
    values = config.to_run_config()
    return ConfigRecord({key: values[key] for key in TASK_KEYS})


class RoundEnd:
    """Called by the strategy after each round: evaluate, checkpoint, then pay.

    The checkpoint holds the round's task outcomes and is written before the
    ledger is settled. A coordinator that crashes in between settles them when
    it resumes, and the ledger pays each task at most once, so no task is paid
    twice or lost.
    """

    def __init__(
        self, state: RunState, strategy: BlendedFedAvg, ledger: Ledger
    ) -> None:
        self.state = state
        self.strategy = strategy
        self.ledger = ledger
        self.last_time = time.perf_counter()

    def __call__(self, local_round: int, arrays: ArrayRecord) -> MetricRecord:
        state = self.state
        server_round = state.start_round + local_round
        val_loss = self.validate(arrays)
        if local_round == 0:
            if server_round == 0:
                self.record(
                    {
                        "server_round": 0,
                        "val_loss": val_loss,
                        "val_perplexity": perplexity(val_loss),
                    }
                )
            logger.info(
                "round %d: val loss %.4f, perplexity %.1f (before training)",
                server_round,
                val_loss,
                perplexity(val_loss),
            )
            return MetricRecord({"val-loss": val_loss})

        # Checkpoint the round with its outcomes, then settle them in the ledger.
        outcomes = self.strategy.outcomes
        velocity = self.strategy.server_optimizer.velocity
        Checkpoint(
            server_round=server_round,
            arrays={k: v.numpy() for k, v in arrays.items()},
            tokenizer_json=state.tokenizer_json,
            config=state.config.to_run_config(),
            state={"outcomes": [o.__dict__ for o in outcomes]},
            strategy_arrays={} if velocity is None else {"velocity": velocity},
        ).save(state.run_dir)
        paid = self.ledger.settle_round(state.config.run_name, server_round, outcomes)

        # Record and report the round.
        statuses = [o.status for o in outcomes]
        done = [o for o in outcomes if o.status == "completed"]
        now = time.perf_counter()
        record = {
            "server_round": server_round,
            "val_loss": val_loss,
            "val_perplexity": perplexity(val_loss),
            "accepted": statuses.count("completed"),
            "rejected": statuses.count("rejected"),
            "failed": statuses.count("failed"),
            "train_loss": _mean([o.train_loss for o in done]),
            "train_tokens": sum(o.reported_tokens for o in done),
            "tokens_paid": paid,
            "seconds": now - self.last_time,
            "client_seconds": self.strategy.client_seconds,
        }
        self.last_time = now
        self.record(record)
        logger.info(
            "round %d/%d: %d accepted, %d rejected%s, %d failed | train loss %s | "
            "val loss %.4f, perplexity %.1f | %.2f tokens paid | %.1fs",
            server_round,
            state.config.num_server_rounds,
            record["accepted"],
            record["rejected"],
            _reason_counts(outcomes, "rejected"),
            record["failed"],
            "n/a" if record["train_loss"] is None else f"{record['train_loss']:.4f}",
            val_loss,
            record["val_perplexity"],
            paid,
            record["seconds"],
        )
        return MetricRecord({"val-loss": val_loss})

    def validate(self, arrays: ArrayRecord) -> float:
        model = SimpleTransformer(self.state.model_config)
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, _ = evaluate_loss(model, self.state.val_tokens, max_windows=VAL_WINDOWS)
        return loss

    def record(self, record: dict) -> None:
        records = [
            r for r in self.state.records if r["server_round"] != record["server_round"]
        ]
        self.state.records = records + [record]
        write_json_atomic(self.state.run_dir / METRICS_FILE, self.state.records)


def write_sample(state: RunState, arrays: ArrayRecord) -> str:
    """Generate a short text from the final model, log it and save it."""
    if state.config.sample_tokens == 0:
        return ""
    tokenizer = Tokenizer.from_str(state.tokenizer_json)
    model = SimpleTransformer(state.model_config)
    model.load_state_dict(arrays.to_torch_state_dict())
    model.eval()
    prompt = torch.tensor([tokenizer.encode(SAMPLE_PROMPT).ids])
    generator = torch.Generator().manual_seed(state.config.seed)
    out = model.generate(
        prompt,
        state.config.sample_tokens,
        temperature=0.8,
        top_k=40,
        generator=generator,
    )
    text = tokenizer.decode(out[0].tolist())
    state.run_dir.mkdir(parents=True, exist_ok=True)
    (state.run_dir / SAMPLE_FILE).write_text(text + "\n", encoding="utf-8")
    logger.info("sample from the final model:\n%s", text)
    return text


def read_records(run_dir: Path) -> list[dict]:
    """The metrics records a run has written so far."""
    path = run_dir / METRICS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else []


def _reason_counts(outcomes: list[TaskOutcome], status: str) -> str:
    """' (2 stale model; 1 NaN values)': the reasons of outcomes in status, or ''.

    A reason's detail after its first ':' (the offending value) is left out,
    so that replies rejected for the same check count together.
    """
    counts: dict[str, int] = {}
    for outcome in outcomes:
        if outcome.status == status:
            reason = outcome.reason.split(":")[0].strip() or "no reason given"
            counts[reason] = counts.get(reason, 0) + 1
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    return f" ({'; '.join(f'{n} {r}' for r, n in ranked)})" if ranked else ""


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None
