"""Section 4: validation loss per token, centralized against the federation."""

from __future__ import annotations

from bench.common import SectionResult, declared_config, new_section, print_table, say
from bench.emulate import NODES, History, centralized, federation
from bench.flower_run import hydra_run

# Server-optimizer settings (kind, momentum, server-learning-rate) compared at
# the default blend-rate; a learning rate of 0 steps at the blend rate.
# (An outer rate of 0.7, DiLoCo's, trailed 0.4 at every round of a 6-round run.)
SETTINGS = (
    ("none", 0.9, 0.0),
    ("momentum", 0.9, 0.0),
    ("nesterov", 0.9, 0.0),
    ("nesterov", 0.9, 0.4),
)
QUICK_SETTINGS = (("none", 0.9, 0.0), ("nesterov", 0.9, 0.4))
# Not candidates: plain FedAvg, the blend's own upper reference, and one AdamW
# stepping on all nodes' batches at once: what a synchronous data-parallel run
# (communicating every step) would learn from the federation's tokens.
FEDAVG = "FedAvg (blend 1.0, reference)"
WIDE = "centralized, the nodes' batches in one (reference)"
REFERENCES = (FEDAVG, WIDE)


def label(kind: str, momentum: float, learning_rate: float) -> str:
    if kind == "none":
        return "plain blend"
    return f"{kind} {momentum}" + (f", lr {learning_rate}" if learning_rate else "")


def tokens_to_reach(history: History, target: float) -> float | None:
    """Tokens trained when validation loss first fell to target, if it did.

    Interpolated linearly between the two validations around the crossing.
    """
    points = list(zip(history.tokens, history.val_loss, strict=True))
    for (t0, l0), (t1, l1) in zip(points, points[1:], strict=False):
        if l1 <= target:
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return None


def real_check(section: SectionResult) -> None:
    """A short real Flower run, emulated again with its own node ids."""
    rounds, steps = 2, 3
    run_config = {"num-server-rounds": rounds, "local-steps": steps}
    real = hydra_run("learning-check", len(NODES), run_config)
    if not real.ok:
        section.note("the real Flower check did not complete")
        return
    by_partition = sorted(real.node_partitions().items(), key=lambda item: item[1])
    node_ids = [node for node, _ in by_partition]
    emulated = federation(
        declared_config(num_server_rounds=rounds, local_steps=steps), node_ids
    ).run_until(rounds)

    table = section.table(
        f"Real Flower run against the emulation ({len(NODES)} nodes, "
        f"local-steps {steps}, the real run's node ids)",
        ["round", "real val loss", "emulated val loss", "difference"],
    )
    worst = 0.0
    for record in real.records:
        r = record["server_round"]
        difference = emulated.val_loss[r] - record["val_loss"]
        worst = max(worst, abs(difference))
        table.rows.append([r, record["val_loss"], emulated.val_loss[r], difference])
    print_table(table)
    section.note(
        f"The emulation matches the real Flower run to {worst:.1e} nats in "
        f"validation loss over rounds 0-{rounds}."
    )


def run(quick: bool) -> SectionResult:
    section = new_section("learning", "4. Learning efficiency", quick)
    base = declared_config()
    settings = QUICK_SETTINGS if quick else SETTINGS
    # The centralized run trains the tokens of the default run (its rounds).
    central_rounds = 2 if quick else base.num_server_rounds
    # Each federation trains up to 1.5x the centralized tokens (rounded up).
    fed_rounds = -(-central_rounds * 3 // 2)
    steps_per_round = len(NODES) * base.local_steps
    section.settings = {
        "federation": f"{len(NODES)} IID nodes, pyproject.toml's config "
        f"(blend-rate {base.blend_rate}, local-steps {base.local_steps}, batch "
        f"{base.batch_size}, learning-rate {base.learning_rate}), up to "
        f"{fed_rounds} rounds; emulated in-process with the real strategy and "
        "ClientApp",
        "centralized": f"one AdamW on the whole training split, "
        f"{central_rounds * steps_per_round} steps of batch {base.batch_size} "
        f"(the tokens of {central_rounds} federation rounds), validated at the "
        "same token counts",
        "target loss": "the centralized run's final validation loss",
        "references": f"FedAvg (blend-rate 1.0); and one AdamW whose every step "
        f"takes a batch of {len(NODES) * base.batch_size}, the {len(NODES)} nodes' "
        f"batches together, {base.local_steps} steps per round's tokens",
    }

    say(f"  centralized: {central_rounds * steps_per_round} steps")
    central = centralized(base, central_rounds * steps_per_round, steps_per_round)
    target = central.val_loss[-1]
    budget = central.tokens[-1]
    runs: dict[str, History] = {}
    for kind, momentum, learning_rate in settings:
        config = base.replace(
            server_optimizer=kind,
            server_momentum=momentum,
            server_learning_rate=learning_rate,
        )
        name = label(kind, momentum, learning_rate)
        say(f"  federation, {name}: {fed_rounds} rounds")
        runs[name] = federation(config, NODES).run_until(fed_rounds)
    if not quick:
        say(f"  federation, {FEDAVG}: {fed_rounds} rounds")
        runs[FEDAVG] = federation(base.replace(blend_rate=1.0), NODES).run_until(
            fed_rounds
        )
        wide = base.replace(batch_size=len(NODES) * base.batch_size)
        say(f"  {WIDE}: {fed_rounds * base.local_steps} steps of {wide.batch_size}")
        runs[WIDE] = centralized(wide, fed_rounds * base.local_steps, base.local_steps)

    # Validation loss side by side at equal tokens.
    curves = section.table(
        "Validation loss at equal tokens (nats/token)",
        ["round", "tokens", "centralized"] + list(runs),
    )
    for r in range(fed_rounds + 1):
        tokens = r * steps_per_round * base.batch_size * base.block_size
        row = [r, tokens, central.val_loss[r] if r <= central_rounds else None]
        curves.rows.append(row + [h.val_loss[r] for h in runs.values()])
    print_table(curves)

    reach = section.table(
        f"Against the centralized final loss {target:.4f} at {budget:,} tokens",
        [
            "setting",
            "loss at equal tokens",
            "lowest loss (tokens)",
            "last loss",
            "rejected replies",
            "tokens to target",
            "x centralized",
        ],
    )
    reach.rows.append(["centralized", target, "-", target, 0, budget, "1.00"])
    needed = {name: tokens_to_reach(h, target) for name, h in runs.items()}
    lowest = {name: min(h.val_loss) for name, h in runs.items()}
    for name, history in runs.items():
        at = history.tokens[history.val_loss.index(lowest[name])]
        reach.rows.append(
            [
                name,
                history.val_loss[central_rounds],
                f"{lowest[name]:.3f} ({at:,})",
                history.val_loss[-1],
                sum(history.rejected),
                round(needed[name]) if needed[name] else f"> {history.tokens[-1]:,}",
                f"{needed[name] / budget:.2f}"
                if needed[name]
                else f"> {history.tokens[-1] / budget:.2f}",
            ]
        )
    print_table(reach)

    # The best setting: the fewest tokens to the target, else the lowest loss.
    candidates = [name for name in runs if name not in REFERENCES]
    reached = {name: needed[name] for name in candidates if needed[name]}
    if reached:
        best = min(reached, key=reached.get)
        measured = f"best: {best}, {reached[best] / budget:.2f}x"
    else:
        best = min(candidates, key=lowest.get)
        measured = (
            f"not reached by any setting within {fed_rounds / central_rounds:.1f}x; "
            f"lowest: {best}, {lowest[best]:.4f} against {target:.4f}"
        )
    section.target(
        "with the best server optimizer, the federation reaches the centralized "
        "final validation loss within 1.5x its tokens",
        measured,
        best in reached and reached[best] <= 1.5 * budget,
    )
    if WIDE in runs:
        wide = runs[WIDE]
        verdict = (
            f"reaches it at {needed[WIDE] / budget:.2f}x"
            if needed[WIDE]
            else "misses it as well"
        )
        n = len(NODES)
        note = (
            f"The synchronous reference, every step on all {n} nodes' batches at "
            f"once, is at {wide.val_loss[central_rounds]:.3f} at equal tokens and "
            f"{min(wide.val_loss):.3f} at best within 1.5x against the target "
            f"{target:.3f}, so it {verdict}. At equal tokens {n} nodes take {n}x "
            "fewer sequential steps than one machine"
        )
        # Equal steps at n times the batch against equal steps and equal tokens.
        if central_rounds >= n:
            note += (
                f": {n * base.local_steps} steps of batch {n * base.batch_size} "
                f"reach {wide.val_loss[n]:.3f}, {n * base.local_steps} steps of "
                f"batch {base.batch_size} {central.val_loss[1]:.3f} and "
                f"{n * n * base.local_steps} steps of batch {base.batch_size}, the "
                f"same tokens, {central.val_loss[n]:.3f}"
            )
        section.note(note + ".")
    seconds = {name: h.seconds for name, h in runs.items()}
    section.note(
        "Emulated seconds per federation: "
        + ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items())
        + f"; centralized {central.seconds:.0f}s."
    )

    if quick:
        section.note("quick mode: the real Flower check of the emulation is skipped")
    else:
        real_check(section)
    return section
