"""The run config: every knob in `[tool.flwr.app.config]`, read and checked once."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from hydraai.aggregation import AGGREGATIONS, SERVER_OPTIMIZERS
from hydraai.errors import ConfigError

PARTITIONERS = ("iid", "dirichlet", "size-skewed")
TRANSFER_DTYPES = ("float32", "float16")
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class RunConfig:
    """Typed, validated values of the run config; attribute names mirror the keys."""

    num_server_rounds: int = 10
    blend_rate: float = 0.1
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    round_timeout: float = 600.0
    local_steps: int = 10
    batch_size: int = 8
    learning_rate: float = 0.003
    warmup_steps: int = 5
    block_size: int = 128
    vocab_size: int = 10000
    n_embd: int = 256
    n_layer: int = 4
    n_head: int = 8
    dropout: float = 0.0
    dataset: str = "builtin"
    text_column: str = "text"
    val_fraction: float = 0.1
    partitioner: str = "iid"
    dirichlet_alpha: float = 0.5
    aggregation: str = "mean"
    trim_fraction: float = 0.2
    max_update_factor: float = 3.0
    min_update_factor: float = 0.25
    outlier_factor: float = 3.0
    min_cosine: float = 0.05
    probe_windows: int = 8
    server_optimizer: str = "none"
    server_momentum: float = 0.9
    server_learning_rate: float = 0.0
    transfer_dtype: str = "float32"
    reward_per_task: float = 2.0
    query_cost: float = 0.5
    ledger_db: str = "ledger.db"
    run_name: str = ""
    output_dir: str = "outputs"
    seed: int = 42
    sample_tokens: int = 48

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's run config; unknown keys and bad values raise."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(run_config) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown run config key(s) {', '.join(unknown)}; "
                f"known keys are: {', '.join(sorted(known))}"
            )

        values = {}
        for key, field in known.items():
            if key in run_config:
                values[field.name] = _coerce(key, run_config[key], field.type)
        config = cls(**values)
        config.validate()
        return config

    def to_run_config(self) -> dict[str, Any]:
        """The config as Flower run config entries (kebab-case keys)."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some values changed, validated again."""
        config = dataclasses.replace(self, **changes)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ConfigError naming the first key whose value is not allowed."""
        _check(
            "num-server-rounds",
            self.num_server_rounds,
            self.num_server_rounds >= 1,
            "an integer >= 1",
        )
        _check(
            "blend-rate",
            self.blend_rate,
            0.0 < self.blend_rate <= 1.0,
            "a number in (0, 1]",
        )
        _check(
            "fraction-train",
            self.fraction_train,
            0.0 < self.fraction_train <= 1.0,
            "a number in (0, 1]",
        )
        _check(
            "fraction-evaluate",
            self.fraction_evaluate,
            0.0 <= self.fraction_evaluate <= 1.0,
            "a number in [0, 1]",
        )
        _check(
            "round-timeout",
            self.round_timeout,
            self.round_timeout > 0,
            "a number of seconds > 0",
        )
        _check(
            "local-steps", self.local_steps, self.local_steps >= 1, "an integer >= 1"
        )
        _check("batch-size", self.batch_size, self.batch_size >= 1, "an integer >= 1")
        _check(
            "learning-rate",
            self.learning_rate,
            0.0 < self.learning_rate < 1.0,
            "a number in (0, 1)",
        )
        _check(
            "warmup-steps",
            self.warmup_steps,
            self.warmup_steps >= 0,
            "an integer >= 0 (steps trained below the full learning rate)",
        )
        _check(
            "block-size",
            self.block_size,
            2 <= self.block_size <= 4096,
            "an integer in [2, 4096]",
        )
        # A byte-level BPE needs its 256 byte symbols plus special tokens.
        _check(
            "vocab-size",
            self.vocab_size,
            260 <= self.vocab_size <= 65536,
            "an integer in [260, 65536]",
        )
        _check("n-layer", self.n_layer, self.n_layer >= 1, "an integer >= 1")
        _check("n-head", self.n_head, self.n_head >= 1, "an integer >= 1")
        _check(
            "n-embd",
            self.n_embd,
            self.n_embd >= 1 and self.n_embd % self.n_head == 0,
            f"a positive multiple of n-head ({self.n_head})",
        )
        _check("dropout", self.dropout, 0.0 <= self.dropout < 1.0, "a number in [0, 1)")
        _check(
            "dataset",
            self.dataset,
            bool(self.dataset.strip()),
            "'builtin', a local file or folder, or a hub dataset name",
        )
        _check("text-column", self.text_column, bool(self.text_column), "a column name")
        _check(
            "val-fraction",
            self.val_fraction,
            0.0 < self.val_fraction < 0.5,
            "a number in (0, 0.5)",
        )
        _check(
            "partitioner",
            self.partitioner,
            self.partitioner in PARTITIONERS,
            f"one of {', '.join(PARTITIONERS)}",
        )
        _check(
            "dirichlet-alpha",
            self.dirichlet_alpha,
            self.dirichlet_alpha > 0,
            "a number > 0",
        )
        _check(
            "aggregation",
            self.aggregation,
            self.aggregation in AGGREGATIONS,
            f"one of {', '.join(AGGREGATIONS)}",
        )
        _check(
            "trim-fraction",
            self.trim_fraction,
            0.0 <= self.trim_fraction < 0.5,
            "a number in [0, 0.5)",
        )
        _check(
            "max-update-factor",
            self.max_update_factor,
            self.max_update_factor >= 1.0,
            "a number >= 1 (AdamW moves a parameter about 1 learning rate a step)",
        )
        _check(
            "min-update-factor",
            self.min_update_factor,
            0.0 <= self.min_update_factor < 1.0,
            "a number in [0, 1)",
        )
        _check(
            "outlier-factor",
            self.outlier_factor,
            self.outlier_factor > 1.0,
            "a number > 1",
        )
        _check(
            "min-cosine",
            self.min_cosine,
            -1.0 <= self.min_cosine <= 1.0,
            "a number in [-1, 1]",
        )
        _check(
            "probe-windows",
            self.probe_windows,
            self.probe_windows >= 0,
            "an integer >= 0 (0 turns the direction check off)",
        )
        _check(
            "server-optimizer",
            self.server_optimizer,
            self.server_optimizer in SERVER_OPTIMIZERS,
            f"one of {', '.join(SERVER_OPTIMIZERS)}",
        )
        _check(
            "server-momentum",
            self.server_momentum,
            0.0 <= self.server_momentum < 1.0,
            "a number in [0, 1)",
        )
        _check(
            "server-learning-rate",
            self.server_learning_rate,
            0.0 <= self.server_learning_rate <= 2.0,
            "a number in [0, 2] (0: step at blend-rate)",
        )
        _check(
            "transfer-dtype",
            self.transfer_dtype,
            self.transfer_dtype in TRANSFER_DTYPES,
            f"one of {', '.join(TRANSFER_DTYPES)}",
        )
        _check(
            "reward-per-task",
            self.reward_per_task,
            self.reward_per_task >= 0,
            "a number >= 0",
        )
        _check("query-cost", self.query_cost, self.query_cost > 0, "a number > 0")
        _check("ledger-db", self.ledger_db, bool(self.ledger_db), "a file path")
        _check(
            "run-name",
            self.run_name,
            self.run_name == "" or bool(RUN_NAME.match(self.run_name)),
            "empty (a new name is made) or up to 64 letters, digits, '.', '_', '-'",
        )
        _check("output-dir", self.output_dir, bool(self.output_dir), "a folder path")
        _check("seed", self.seed, self.seed >= 0, "an integer >= 0")
        _check(
            "sample-tokens",
            self.sample_tokens,
            self.sample_tokens >= 0,
            "an integer >= 0",
        )


def _check(key: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(
            f"run config key '{key}' is {value!r}, but it must be {allowed}; "
            f'fix it in [tool.flwr.app.config] or with --run-config "{key}=..."'
        )


def _coerce(key: str, value: Any, type_name: str) -> Any:
    """Convert a TOML or CLI value to the field's type, or raise naming the key."""
    kind = {"int": int, "float": float, "str": str}[type_name]
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if (
        kind is float
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
    ):
        return float(value)
    if kind is str and isinstance(value, str):
        return value
    raise ConfigError(
        f"run config key '{key}' is {value!r} ({type(value).__name__}), "
        f"but it must be of type {type_name}"
    )
