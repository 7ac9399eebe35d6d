"""Section 2: time per round in real Flower runs, client compute against the rest."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from flwr.app import ConfigRecord

from bench.common import SectionResult, declared_config, new_section, print_table, say
from bench.emulate import Federation, validate
from bench.flower_run import FlowerRun, hydra_run
from hydraai import client_app as client_module
from hydraai.checkpoint import Checkpoint
from hydraai.client_app import app as client_app
from hydraai.ledger import Ledger
from hydraai.protocol import METRICS

# Local steps of the measured runs: small, to keep the section short.
LOCAL_STEPS = 2
# The target: the rest of a round (all but client compute) at most this share.
MAX_SHARE = 0.15


def split(run: FlowerRun) -> list[dict]:
    """Per round: wall time, client compute and everything else.

    Client compute is the nodes' reported training seconds divided by the
    ClientApp actors that ran at once (on 2 cores Flower's default of 2 CPUs
    per ClientApp leaves room for one, so they run one after another).
    """
    actors = max(1, run.actors)
    rows = []
    for record in run.rounds():
        client = record["client_seconds"] / actors
        other = record["seconds"] - client
        rows.append(
            {
                "round": record["server_round"],
                "seconds": record["seconds"],
                "client": client,
                "other": other,
                "share": other / record["seconds"],
                "tokens": record["train_tokens"],
                "client_seconds": record["client_seconds"],
            }
        )
    return rows


def in_process_costs(num_nodes: int, local_steps: int) -> dict[str, float]:
    """Seconds per round of HydraAI's own work outside training, without Flower.

    Runs the real strategy, ClientApp, validation, checkpoint and ledger of a
    round in this process (the second of two rounds, so caches are as warm as
    they get), so that what a Flower round costs beyond this is Flower's.
    """
    config = declared_config(local_steps=local_steps)
    federation = Federation(config, list(range(1, num_nodes + 1)))
    federation.step()
    strategy, grid = federation.strategy, federation.grid
    cache = client_module._local_tokens.cache_info()
    costs: dict[str, float] = {}

    def timed(name: str, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        costs[name] = costs.get(name, 0.0) + time.perf_counter() - start
        return result

    # Train: send, the ClientApp on each node (minus its reported training), check.
    messages = timed(
        "server: configure_train (hash the model)",
        lambda: strategy.configure_train(
            2, federation.arrays, federation.train_config, grid
        ),
    )
    replies, trained = [], 0.0
    for msg in messages:
        context = federation.contexts[msg.metadata.dst_node_id]
        reply = timed(
            "clients: train task beyond train_steps", client_app, msg, context
        )
        trained += reply.content[METRICS]["train-seconds"]
        replies.append(reply)
    costs["clients: train task beyond train_steps"] -= trained
    new, _ = timed(
        "server: aggregate_train (checks, probe, mean, step)",
        lambda: strategy.aggregate_train(2, replies),
    )

    # Evaluate on every node, then the server's own end of round.
    evaluate = timed(
        "server: configure_evaluate",
        lambda: strategy.configure_evaluate(
            2, new, ConfigRecord(dict(federation.train_config)), grid
        ),
    )
    for msg in evaluate:
        context = federation.contexts[msg.metadata.dst_node_id]
        timed("clients: evaluate tasks", client_app, msg, context)
    timed("server: validation (64 windows)", lambda: validate(federation.state, new))
    with tempfile.TemporaryDirectory() as folder:
        timed(
            "server: checkpoint",
            lambda: Checkpoint(
                server_round=2,
                arrays={k: v.numpy() for k, v in new.items()},
                tokenizer_json=federation.state.tokenizer_json,
                config=config.to_run_config(),
            ).save(Path(folder)),
        )
        with Ledger(Path(folder) / "ledger.db") as ledger:
            timed(
                "server: ledger assign + settle",
                lambda: (
                    ledger.assign_tasks("b", 2, strategy.sampled_nodes, 2, 32),
                    ledger.settle_round("b", 2, strategy.outcomes),
                ),
            )
    after = client_module._local_tokens.cache_info()
    costs["(client token cache: hits)"] = after.hits - cache.hits
    costs["(client token cache: misses)"] = after.misses - cache.misses
    return costs


def summarize(
    run_: FlowerRun, local_steps: int, fraction_evaluate: str = "1.0"
) -> dict | None:
    """Rounds 2+ of a run, averaged, with round 1 apart."""
    if not run_.ok:
        return None
    rows = split(run_)
    later = rows[1:] or rows
    mean = {k: statistics.mean(r[k] for r in later) for k in later[0]}
    return {
        **mean,
        "rows": rows,
        "first": rows[0]["seconds"],
        "tok_s": mean["tokens"] / mean["client_seconds"],
        "local_steps": local_steps,
        "fraction_evaluate": fraction_evaluate,
        "actors": max(1, run_.actors),
    }


def run(quick: bool, shared: dict | None = None) -> SectionResult:
    """Runs 2, 5 and 10 supernodes; leaves the runs in shared for section 5."""
    section = new_section("federation", "2. Federation overhead", quick)
    node_counts = (2, 10) if quick else (2, 5, 10)
    rounds = 3 if quick else 4
    largest = max(node_counts)
    default_steps = declared_config().local_steps
    section.settings = {
        "runs": f"hydra-run (flwr run with a private SuperLink), {rounds} rounds "
        f"of local-steps {LOCAL_STEPS}; "
        + (
            ""
            if quick
            else f"then {largest} supernodes for 3 rounds without federated "
            f"evaluation, and for 3 rounds of the default local-steps "
            f"{default_steps}; "
        )
        + "otherwise pyproject.toml's config (fraction-evaluate 1.0: every "
        "node also evaluates every round)",
        "supernodes": ", ".join(map(str, node_counts)),
        "client compute": "sum of the nodes' reported train-seconds divided by "
        "the ClientApp actors alive at once (counted from /proc)",
        "other": "round seconds minus client compute: messaging, Ray, the "
        "nodes' model loading and evaluation, the server's checks, "
        "aggregation, validation, checkpoint and ledger",
    }

    # Short rounds at 2, 5 and 10 supernodes; the default round at 10.
    runs = {
        n: hydra_run(f"federation-{n}", n, config(rounds, LOCAL_STEPS))
        for n in node_counts
    }
    if shared is not None:
        shared["federation runs"] = runs
    measured = [(n, LOCAL_STEPS, summarize(r, LOCAL_STEPS)) for n, r in runs.items()]
    if not quick:
        # The same short rounds without federated evaluation, to size its share.
        no_eval = hydra_run(
            f"federation-{largest}-no-evaluate",
            largest,
            {**config(3, LOCAL_STEPS), "fraction-evaluate": 0.0},
        )
        measured.append((largest, LOCAL_STEPS, summarize(no_eval, LOCAL_STEPS, "0.0")))
        default_run = hydra_run(
            f"federation-{largest}-default", largest, config(3, default_steps)
        )
        measured.append((largest, default_steps, summarize(default_run, default_steps)))

    columns = ["supernodes", "local-steps", "fraction-evaluate"]
    detail = section.table(
        "Per round",
        columns + ["round", "seconds", "client s", "other s", "other %"],
    )
    summary = section.table(
        "Rounds 2+ averaged (round 1 apart: it pays Ray's start-up)",
        columns
        + [
            "actors",
            "round 1 s",
            "round s",
            "client s",
            "other s",
            "other %",
            "other s/node",
            "client tok/s",
        ],
    )
    for n, steps, result in measured:
        if result is None:
            section.note(f"the {n}-supernode run (local-steps {steps}) failed")
            continue
        key = [n, steps, result["fraction_evaluate"]]
        for row in result["rows"]:
            detail.rows.append(
                key
                + [
                    row["round"],
                    row["seconds"],
                    row["client"],
                    row["other"],
                    f"{row['share']:.0%}",
                ]
            )
        summary.rows.append(
            key
            + [
                result["actors"],
                result["first"],
                result["seconds"],
                result["client"],
                result["other"],
                f"{result['share']:.0%}",
                result["other"] / n,
                result["tok_s"],
            ]
        )
    print_table(detail)
    print_table(summary)

    # Where the rest goes: HydraAI's own work per round, measured in-process.
    say(f"  timing HydraAI's own per-round work for {largest} nodes in-process")
    costs = in_process_costs(largest, LOCAL_STEPS)
    breakdown = section.table(
        f"HydraAI's own work in a round of {largest} nodes at local-steps "
        f"{LOCAL_STEPS}, outside training (in-process, no Flower)",
        ["part", "seconds"],
    )
    breakdown.rows += [[k, v] for k, v in costs.items()]
    own = sum(v for k, v in costs.items() if not k.startswith("("))
    breakdown.rows.append(["total", own])
    short = measured[node_counts.index(largest)][2]
    if short is not None:
        breakdown.rows.append(
            ["Flower and Ray: the run's other s minus this total", short["other"] - own]
        )
    print_table(breakdown)

    for n, steps, result in measured:
        if n == largest and result is not None:
            section.target(
                f"other <= {MAX_SHARE:.0%} of round time at {n} supernodes after "
                f"round 1 (local-steps {steps}, fraction-evaluate "
                f"{result['fraction_evaluate']})",
                f"{result['share']:.0%} ({result['other']:.1f}s of "
                f"{result['seconds']:.1f}s)",
                result["share"] <= MAX_SHARE,
            )

    # The rest is nearly fixed per round, so the task size sets its share.
    default = measured[-1][2] if not quick else None
    if default is not None and short is not None:
        per_step = default["client"] / (largest * default_steps)
        # other / (other + nodes * per_step * steps) <= MAX_SHARE, solved for steps.
        needed = default["other"] * (1 / MAX_SHARE - 1) / (largest * per_step)
        section.note(
            f"At {largest} supernodes the rest of a round is {default['other']:.1f}s "
            f"at local-steps {default_steps} and {short['other']:.1f}s at "
            f"{LOCAL_STEPS}, nearly fixed, while a step costs {per_step:.2f}s per "
            f"node: the rest stays under {MAX_SHARE:.0%} from about {needed:.1f} "
            "local steps per task up."
        )
    return section


def config(rounds: int, local_steps: int) -> dict:
    return {"num-server-rounds": rounds, "local-steps": local_steps}
