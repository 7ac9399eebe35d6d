"""Real Flower runs through hydra-run, watched for memory and cleaned up after."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import BIN, RESULTS, ROOT, TreeSampler, gib, say
from hydraai.launch import stop_tree


@dataclass
class FlowerRun:
    """What a hydra-run run did: its metrics.json, memory and processes."""

    label: str
    num_supernodes: int
    returncode: int | None
    wall_seconds: float
    records: list[dict[str, Any]] = field(default_factory=list)
    peak_rss_gib: float = 0.0
    peak_pss_gib: float = 0.0
    peak_processes: int = 0
    actors: int = 0
    leftovers: int = 0
    run_dir: Path = Path()

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and len(self.records) > 1

    def save(self) -> None:
        """Write what the run measured beside it, for a later section to read."""
        data = {k: v for k, v in asdict(self).items() if k != "run_dir"}
        (self.run_dir / "summary.json").write_text(json.dumps(data, indent=2))

    @classmethod
    def load(cls, label: str) -> FlowerRun | None:
        """A run saved by an earlier invocation, if its folder is still there."""
        run_dir = RESULTS / "runs" / label
        path = run_dir / "summary.json"
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()), run_dir=run_dir)

    def rounds(self) -> list[dict[str, Any]]:
        """The records of the trained rounds (round 0 is the initial model)."""
        return [r for r in self.records if r["server_round"] > 0]

    def node_partitions(self) -> dict[int, int]:
        """node id -> partition id, read back from the run's ledger."""
        ledger = self.run_dir / "outputs" / "ledger.db"
        with sqlite3.connect(ledger) as db:
            rows = db.execute(
                "SELECT DISTINCT node_id, user_id FROM tasks WHERE run_name = ?",
                [self.label],
            ).fetchall()
        return {int(node): int(user.rsplit("-", 1)[1]) for node, user in rows}


def toml_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else str(value)


def hydra_run(
    label: str,
    num_supernodes: int,
    run_config: dict[str, Any],
    timeout: float = 1800.0,
) -> FlowerRun:
    """Run the app with hydra-run in its own folder under bench/results/runs.

    The run gets a private Flower home and output folder, so it shares no state
    with other runs on the machine. Every process of its tree is sampled for
    memory while it runs, and any that outlives it is stopped.
    """
    run_dir = RESULTS / "runs" / label
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    overrides = {
        "run-name": label,
        "output-dir": str(run_dir / "outputs"),
        "sample-tokens": 0,
        **run_config,
    }
    command = [
        str(BIN / "hydra-run"),
        "--app",
        str(ROOT),
        "--num-supernodes",
        str(num_supernodes),
        "--flwr-home",
        str(run_dir / "flwr"),
        "--run-config",
        " ".join(f"{k}={toml_value(v)}" for k, v in overrides.items()),
    ]
    say(f"  hydra-run {label}: {num_supernodes} supernodes, {run_config}")

    # Start it in its own session and sample its tree until it exits.
    start = time.perf_counter()
    with (run_dir / "hydra-run.log").open("w") as log:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        returncode = None
        with TreeSampler(process.pid) as sampler:
            try:
                returncode = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                say(f"  {label} ran past {timeout:.0f}s: stopping it")
            finally:
                if process.poll() is None:
                    stop_tree(process)
        leftovers = sampler.stop_leftovers()
    wall = time.perf_counter() - start

    metrics = run_dir / "outputs" / label / "metrics.json"
    records = json.loads(metrics.read_text()) if metrics.exists() else []
    run = FlowerRun(
        label=label,
        num_supernodes=num_supernodes,
        returncode=returncode,
        wall_seconds=wall,
        records=records,
        peak_rss_gib=gib(sampler.peak_rss_kib),
        peak_pss_gib=gib(sampler.peak_pss_kib),
        peak_processes=sampler.peak_processes,
        actors=sampler.max_actors,
        leftovers=leftovers,
        run_dir=run_dir,
    )
    say(
        f"  {label}: exit {returncode}, {len(run.rounds())} rounds in {wall:.0f}s, "
        f"peak RSS {run.peak_rss_gib:.2f} GiB (PSS {run.peak_pss_gib:.2f}), "
        f"{run.actors} ClientApp actor(s), {leftovers} leftover process(es) stopped"
    )
    if not run.ok:
        say(f"  {label} did not complete: see {run_dir / 'hydra-run.log'}")
    run.save()
    return run
