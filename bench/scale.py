"""Section 5: peak memory and round time of simulations with many supernodes."""

from __future__ import annotations

import statistics

from bench.common import SectionResult, new_section, print_table
from bench.flower_run import FlowerRun, hydra_run

FRACTION = 0.1
LOCAL_STEPS = 2
MEMORY_LIMIT_GIB = 24.0


def run(quick: bool, smaller: dict[int, FlowerRun] | None = None) -> SectionResult:
    """Simulate 50 and 100 supernodes; smaller are runs of section 2, if any."""
    section = new_section("scale", "5. Scale", quick)
    counts = (50,) if quick else (50, 100)
    rounds = 2 if quick else 3
    section.settings = {
        "runs": f"hydra-run, {rounds} rounds, local-steps {LOCAL_STEPS}, "
        f"fraction-train {FRACTION} and fraction-evaluate {FRACTION} (at the "
        "default 1.0 every one of the nodes would also evaluate every round)",
        "smaller runs": "2, 5 and 10 supernodes are section 2's runs (fraction "
        "1.0, 4 rounds), reused",
        "memory": "sampled every second over the whole process tree of "
        "hydra-run: SuperLink, flwr-simulation (ServerApp), Ray and its "
        "workers; RSS summed as asked (a page shared by n processes counts n "
        "times) and PSS (shared pages split), read from /proc/<pid>/smaps_rollup",
    }
    config = {
        "num-server-rounds": rounds,
        "local-steps": LOCAL_STEPS,
        "fraction-train": FRACTION,
        "fraction-evaluate": FRACTION,
    }
    # Section 2's runs at 2, 5 and 10 supernodes, from this invocation or saved.
    runs = dict(smaller or {})
    for n in (2, 5, 10):
        if n not in runs and (saved := FlowerRun.load(f"federation-{n}")):
            runs[n] = saved
    for n in counts:
        runs[n] = hydra_run(f"scale-{n}", n, config)

    table = section.table(
        "Memory and round time by number of supernodes",
        [
            "supernodes",
            "trained/round",
            "round 1 s",
            "rounds 2+ s",
            "peak RSS GiB",
            "peak PSS GiB",
            "processes",
            "actors",
        ],
    )
    for n, run_ in sorted(runs.items()):
        rounds_ = run_.rounds()
        if not rounds_:
            table.rows.append([n, "failed", None, None, None, None, None, None])
            continue
        later = rounds_[1:] or rounds_
        table.rows.append(
            [
                n,
                rounds_[-1]["accepted"]
                + rounds_[-1]["rejected"]
                + rounds_[-1]["failed"],
                rounds_[0]["seconds"],
                statistics.mean(r["seconds"] for r in later),
                run_.peak_rss_gib,
                run_.peak_pss_gib,
                run_.peak_processes,
                run_.actors,
            ]
        )
    print_table(table)

    big = [n for n in counts if runs[n].ok]
    if len(big) == 2:
        low, high = runs[big[0]], runs[big[1]]
        per_node = (high.peak_rss_gib - low.peak_rss_gib) / (big[1] - big[0]) * 1024
        section.note(
            f"Peak RSS grows {per_node:+.1f} MiB per extra supernode from "
            f"{big[0]} to {big[1]} (at fraction-train {FRACTION})."
        )
    largest = max(counts)
    if runs[largest].ok:
        section.target(
            f"{largest} supernodes fit in {MEMORY_LIMIT_GIB:.0f} GiB",
            f"peak RSS {runs[largest].peak_rss_gib:.2f} GiB summed, "
            f"PSS {runs[largest].peak_pss_gib:.2f} GiB",
            runs[largest].peak_rss_gib < MEMORY_LIMIT_GIB,
        )
    else:
        section.target(
            f"{largest} supernodes fit in {MEMORY_LIMIT_GIB:.0f} GiB",
            "the run did not complete",
            False,
        )
    return section
