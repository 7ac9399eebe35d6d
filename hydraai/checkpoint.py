"""Round checkpoints of a run: weights, tokenizer, resolved config and state."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from hydraai.errors import CheckpointError

logger = logging.getLogger(__name__)

LATEST = "LATEST"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
STATE = "state.json"
STRATEGY = "strategy.safetensors"


@dataclass
class Checkpoint:
    """Everything needed to resume a run after `server_round`."""

    server_round: int
    arrays: dict[str, np.ndarray]
    tokenizer_json: str
    config: dict[str, Any]
    # JSON-able strategy and ledger state, e.g. the outcomes of the round.
    state: dict[str, Any] = field(default_factory=dict)
    # Arrays the strategy keeps between rounds, e.g. a server momentum buffer.
    strategy_arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def save(self, run_dir: Path) -> Path:
        """Write into `run_dir/checkpoint-<round>` and then point LATEST at it.

        LATEST changes by an atomic rename, so a crash at any moment leaves the
        previous checkpoint or the new one, never a half-written one.
        """
        run_dir.mkdir(parents=True, exist_ok=True)
        target = run_dir / f"checkpoint-{self.server_round:05d}"
        if target.exists():
            shutil.rmtree(target)
        staging = run_dir / f".{target.name}.tmp"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()

        # Write every file, then move the folder into place.
        save_file(self.arrays, str(staging / WEIGHTS))
        if self.strategy_arrays:
            save_file(self.strategy_arrays, str(staging / STRATEGY))
        (staging / TOKENIZER).write_text(self.tokenizer_json, encoding="utf-8")
        state = {"server_round": self.server_round, "config": self.config, **self.state}
        (staging / STATE).write_text(json.dumps(state, indent=2), encoding="utf-8")
        os.replace(staging, target)
        _write_atomic(run_dir / LATEST, target.name)

        # Keep only the newest checkpoint; the older ones are superseded.
        for old in run_dir.glob("checkpoint-*"):
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
        return target

    @classmethod
    def load(cls, run_dir: Path) -> Checkpoint | None:
        """The latest checkpoint of a run, or None if the run has none."""
        pointer = run_dir / LATEST
        if not pointer.exists():
            return None
        folder = run_dir / pointer.read_text(encoding="utf-8").strip()
        try:
            state = json.loads((folder / STATE).read_text(encoding="utf-8"))
            arrays = load_file(str(folder / WEIGHTS))
            tokenizer_json = (folder / TOKENIZER).read_text(encoding="utf-8")
            strategy_file = folder / STRATEGY
            strategy_arrays = (
                load_file(str(strategy_file)) if strategy_file.exists() else {}
            )
        except (OSError, ValueError) as err:
            raise CheckpointError(
                f"the checkpoint in '{folder}' cannot be read ({err}); restore it "
                "from a backup or start a new run-name"
            ) from err
        return cls(
            server_round=state.pop("server_round"),
            config=state.pop("config"),
            arrays=arrays,
            tokenizer_json=tokenizer_json,
            state=state,
            strategy_arrays=strategy_arrays,
        )


def latest_run_dir(output_dir: Path) -> Path:
    """The run under output_dir whose checkpoint was written last."""
    pointers = sorted(output_dir.glob(f"*/{LATEST}"), key=lambda p: p.stat().st_mtime)
    if not pointers:
        raise CheckpointError(
            f"no checkpoint under '{output_dir}'; run a training run first "
            "(make run) or point --output-dir at the folder a run wrote"
        )
    return pointers[-1].parent


def latest_query_cost(output_dir: Path) -> float | None:
    """The query-cost of the run that wrote the newest checkpoint, if any."""
    try:
        run_dir = latest_run_dir(output_dir)
        folder = run_dir / (run_dir / LATEST).read_text(encoding="utf-8").strip()
        state = json.loads((folder / STATE).read_text(encoding="utf-8"))
        return float(state["config"]["query-cost"])
    except (OSError, ValueError, KeyError, TypeError, CheckpointError):
        return None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that a reader never sees a half-written file."""
    _write_atomic(path, json.dumps(data, indent=2))
