"""The volunteer's ClientApp: train the global model on the local shard and report."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from hydraai.config import RunConfig
from hydraai.data import encode, load_corpus, load_partition, split_corpus
from hydraai.errors import DataError
from hydraai.model import ModelConfig, SimpleTransformer, pick_device
from hydraai.protocol import ARRAYS, CONFIG, METRICS, REPORT, TASK_KEYS
from hydraai.tokenizer import eot_id, from_json
from hydraai.training import evaluate_loss, train_steps

logger = logging.getLogger(__name__)

app = ClientApp()

# Share of the node's shard kept back for its own evaluation.
LOCAL_EVAL_FRACTION = 0.1


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model for the assigned steps and send it back."""
    config = msg.content[CONFIG]
    task, model, (train_tokens, _) = receive(msg, context)

    # Train the received weights locally, seeded by run, round and node.
    seed = (
        task.seed * 1_000_003
        + int(config["server-round"]) * 7919
        + context.node_id % 7919
    )
    report = train_steps(
        model,
        train_tokens,
        task.local_steps,
        task.batch_size,
        task.learning_rate,
        seed,
        task.warmup_steps,
    )
    logger.debug(
        "trained %d steps, loss %.4f in %.1fs",
        report.steps,
        report.loss,
        report.seconds,
    )

    # Weights travel back in the dtype they came in (float16 halves the bytes).
    transfer_dtype = getattr(torch, task.transfer_dtype)
    content = RecordDict(
        {
            ARRAYS: ArrayRecord(
                {k: v.to(transfer_dtype) for k, v in model.state_dict().items()}
            ),
            METRICS: MetricRecord(
                {
                    "num-examples": report.examples,
                    "train-loss": report.loss,
                    "train-steps": report.steps,
                    "train-tokens": report.tokens,
                    "train-seconds": report.seconds,
                }
            ),
            REPORT: ConfigRecord(
                {
                    "user-id": user_id(dict(context.node_config)),
                    "model-sha256": config["model-sha256"],
                    "tokenizer-sha256": config["tokenizer-sha256"],
                }
            ),
        }
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the received model on the held-back part of the local shard."""
    _, model, (_, eval_tokens) = receive(msg, context)
    loss, count = evaluate_loss(model, eval_tokens, max_windows=16)
    metrics = MetricRecord({"eval-loss": loss, "num-examples": count})
    return Message(RecordDict({METRICS: metrics}), reply_to=msg)


def receive(
    msg: Message, context: Context
) -> tuple[RunConfig, SimpleTransformer, tuple[torch.Tensor, torch.Tensor]]:
    """The task, a model holding the received weights, and the node's token streams."""
    config = msg.content[CONFIG]
    task = task_config(config)
    tokenizer_json, tokenizer_sha = config["tokenizer-json"], config["tokenizer-sha256"]
    tokens = local_tokens(
        task, dict(context.node_config), tokenizer_json, tokenizer_sha
    )
    model = build_model(task, tokenizer_json, tokenizer_sha, msg.content[ARRAYS])
    return task, model, tokens


def task_config(config: ConfigRecord) -> RunConfig:
    """The part of the run config the coordinator sent with the task."""
    return RunConfig.from_run_config({k: config[k] for k in TASK_KEYS if k in config})


def user_id(node_config: dict) -> str:
    """The volunteer's claimed identity: node_config's user-id, else per partition."""
    claimed = node_config.get("user-id")
    if isinstance(claimed, str) and claimed:
        return claimed
    if "partition-id" in node_config:
        return f"volunteer-{int(node_config['partition-id'])}"
    raise DataError(
        "this node has no user-id; start the SuperNode with "
        "--node-config \"user-id='your-name'\" to be paid for its work"
    )


def build_model(
    task: RunConfig, tokenizer_json: str, tokenizer_sha: str, arrays: ArrayRecord
) -> SimpleTransformer:
    """A model of the task's shape holding the received weights, on the best device."""
    tokenizer = cached_tokenizer(tokenizer_json, tokenizer_sha)
    model = reusable_model(ModelConfig.from_run(task, tokenizer.get_vocab_size()))
    model.load_state_dict(arrays.to_torch_state_dict())
    return model


# A new model draws random weights that load_state_dict then overwrites, which
# costs more than the load itself. A simulation runs task after task in one
# process, so it keeps its model and loads each task's weights into it; every
# parameter is overwritten, and replies hold copies, never the live tensors.
@functools.lru_cache(maxsize=1)
def reusable_model(config: ModelConfig) -> SimpleTransformer:
    """The model this process loads received weights into."""
    return SimpleTransformer(config).to(pick_device())


@functools.lru_cache(maxsize=2)
def cached_tokenizer(tokenizer_json: str, tokenizer_sha: str):
    """The tokenizer the coordinator sent, after checking its fingerprint."""
    return from_json(tokenizer_json, tokenizer_sha)


def local_tokens(
    task: RunConfig, node_config: dict, tokenizer_json: str, tokenizer_sha: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token streams (train, eval) of this node's own text."""
    data_path = node_config.get("data-path")
    return _local_tokens(
        task.dataset,
        task.text_column,
        task.val_fraction,
        task.partitioner,
        task.dirichlet_alpha,
        task.seed,
        str(data_path) if data_path else "",
        int(node_config.get("partition-id", -1)),
        int(node_config.get("num-partitions", 0)),
        tokenizer_json,
        tokenizer_sha,
    )


# In a simulation one Ray actor serves every partition in turn: the cache must
# hold them all, or each task tokenises its shard again.
@functools.lru_cache(maxsize=256)
def _local_tokens(
    dataset: str,
    text_column: str,
    val_fraction: float,
    partitioner: str,
    alpha: float,
    seed: int,
    data_path: str,
    partition_id: int,
    num_partitions: int,
    tokenizer_json: str,
    tokenizer_sha: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    # A volunteer's own files, or this node's partition of the run's training split.
    if data_path:
        if not Path(data_path).exists():
            raise DataError(
                f"data-path '{data_path}' does not exist on this volunteer's machine; "
                "point it at a .txt/.jsonl/.parquet file or a folder of them"
            )
        shard = load_corpus(data_path, text_column)
    else:
        if partition_id < 0 or num_partitions <= 0:
            raise DataError(
                "this node has neither data-path nor partition-id and num-partitions "
                "in its node config; start the SuperNode with --node-config "
                '"data-path=\'/path/to/texts\'" or "partition-id=0 num-partitions=2"'
            )
        train_split, _ = split_corpus(
            load_corpus(dataset, text_column), val_fraction, seed
        )
        shard = load_partition(
            train_split, partitioner, partition_id, num_partitions, seed, alpha
        )

    # Hold a small part of the shard back for local evaluation.
    texts = shard["text"]
    if len(texts) < 2:
        raise DataError(
            f"this node's shard has {len(texts)} record(s); it needs at least 2"
        )
    n_eval = max(1, int(len(texts) * LOCAL_EVAL_FRACTION))
    tokenizer = cached_tokenizer(tokenizer_json, tokenizer_sha)
    eot = eot_id(tokenizer)
    return encode(tokenizer, texts[n_eval:], eot), encode(
        tokenizer, texts[:n_eval], eot
    )
