"""Section 3: bytes each client sends and receives per round, float32 vs float16."""

from __future__ import annotations

from flwr.app import ConfigRecord, Message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from bench.common import SectionResult, declared_config, new_section, print_table, say
from bench.emulate import NODES, OTHER_NODES, Federation, federation
from hydraai.client_app import app as client_app
from hydraai.config import RunConfig

MB = 1e6


def sizes(msg: Message) -> dict[str, int]:
    """Bytes of a message: its arrays, other records, and its serialized objects.

    `wire` is what Flower 1.42 transfers: every object of the message's tree
    (message, record dict, records, arrays, 5 MiB array chunks) serialized,
    each identical object once.
    """
    content = msg.content
    arrays = sum(r.count_bytes() for r in content.array_records.values())
    configs = sum(r.count_bytes() for r in content.config_records.values())
    metrics = sum(r.count_bytes() for r in content.metric_records.values())
    wire = sum(len(o.deflate()) for o in get_all_nested_objects(msg).values())
    return {"arrays": arrays, "config": configs, "metrics": metrics, "wire": wire}


def round_messages(config: RunConfig) -> dict[str, dict[str, int]]:
    """The four messages of one node's round 2 (trained weights, not the init)."""
    fed = Federation(config.replace(local_steps=1), NODES[:1])
    fed.step()
    node = fed.node_ids[0]
    context = fed.contexts[node]
    strategy, grid = fed.strategy, fed.grid

    task = strategy.configure_train(2, fed.arrays, fed.train_config, grid)[0]
    reply = client_app(task, context)
    evaluate = strategy.configure_evaluate(
        2, fed.arrays, ConfigRecord(dict(fed.train_config)), grid
    )[0]
    result = client_app(evaluate, context)
    return {
        "train task (down)": sizes(task),
        "train reply (up)": sizes(reply),
        "evaluate task (down)": sizes(evaluate),
        "evaluate reply (up)": sizes(result),
        "tokenizer JSON": {"config": len(fed.state.tokenizer_json)},
    }


def run(quick: bool) -> SectionResult:
    section = new_section("communication", "3. Communication", quick)
    base = declared_config()
    rounds = 2 if quick else 3
    section.settings = {
        "bytes": "one node's round 2 messages built by the real strategy and "
        "ClientApp; `wire` serializes each as Flower 1.42 does",
        "loss": f"{rounds} rounds of 4 IID nodes at pyproject.toml's config, "
        "emulated in-process with the real strategy and ClientApp; float16 "
        "shares the float32 run's node ids (same batches), a second float32 run "
        "with other node ids shows the run-to-run spread",
    }

    # Bytes, message by message, in both transfer dtypes.
    measured = {}
    for dtype in ("float32", "float16"):
        measured[dtype] = round_messages(base.replace(transfer_dtype=dtype))
    table = section.table(
        "Bytes per message (MB = 1e6 bytes)",
        ["message", "dtype", "arrays MB", "config MB", "metrics B", "wire MB"],
    )
    for dtype, messages in measured.items():
        for name, size in messages.items():
            if name == "tokenizer JSON":
                continue
            table.rows.append(
                [
                    name,
                    dtype,
                    size["arrays"] / MB,
                    size["config"] / MB,
                    size["metrics"],
                    size["wire"] / MB,
                ]
            )
    print_table(table)

    per_round = section.table(
        "Per client per round (train + evaluate, fraction-evaluate 1.0)",
        ["dtype", "down MB", "up MB", "arrays MB", "tokenizer MB", "wire MB"],
    )
    totals = {}
    for dtype, messages in measured.items():
        down = ("train task (down)", "evaluate task (down)")
        up = ("train reply (up)", "evaluate reply (up)")
        wire_down = sum(messages[m]["wire"] for m in down)
        wire_up = sum(messages[m]["wire"] for m in up)
        arrays = sum(messages[m]["arrays"] for m in down + up)
        totals[dtype] = arrays
        per_round.rows.append(
            [
                dtype,
                wire_down / MB,
                wire_up / MB,
                arrays / MB,
                2 * messages["tokenizer JSON"]["config"] / MB,
                (wire_down + wire_up) / MB,
            ]
        )
    print_table(per_round)
    array_ratio = totals["float16"] / totals["float32"]

    # Validation loss: float16 against float32 on the same batches.
    say(f"  {rounds} emulated rounds each: float32, float16, float32 other seeds")
    f32 = federation(base, NODES).run_until(rounds)
    f16 = federation(base.replace(transfer_dtype="float16"), NODES).run_until(rounds)
    other = federation(base, OTHER_NODES).run_until(rounds)
    losses = section.table(
        "Validation loss per round",
        [
            "round",
            "tokens",
            "float32",
            "float16",
            "float16 - float32",
            "float32, other seeds - float32",
        ],
    )
    for r in range(rounds + 1):
        losses.rows.append(
            [
                r,
                f32.tokens[r],
                f32.val_loss[r],
                f16.val_loss[r],
                f16.val_loss[r] - f32.val_loss[r],
                other.val_loss[r] - f32.val_loss[r],
            ]
        )
    print_table(losses)
    # The penalty on average over the rounds; the spread at its widest.
    penalty = sum(f16.val_loss[r] - f32.val_loss[r] for r in range(1, rounds + 1))
    penalty /= rounds
    spread = max(abs(other.val_loss[r] - f32.val_loss[r]) for r in range(1, rounds + 1))
    section.target(
        "float16 halves the array bytes",
        f"float16/float32 array bytes = {array_ratio:.3f}",
        array_ratio <= 0.501,
    )
    section.target(
        "float16 costs no measurable validation loss",
        f"float16 - float32 = {penalty:+.4f} nats on average over {rounds} "
        f"rounds; float32 with other seeds differs by up to {spread:.4f}",
        penalty <= spread,
    )
    tokenizer = measured["float32"]["tokenizer JSON"]["config"]
    section.note(
        f"The tokenizer JSON ({tokenizer / MB:.2f} MB) travels in both task "
        "messages of every node every round; with float16 it is "
        f"{2 * tokenizer / (totals['float16'] / 2 + 2 * tokenizer):.0%} of the "
        "downlink."
    )
    return section
