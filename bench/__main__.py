"""python -m bench: run the benchmark sections and write docs/benchmarks.md."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from bench import (
    communication,
    federation,
    learning,
    ledger_bench,
    report,
    scale,
    throughput,
)
from bench.common import ROOT, machine, say, wait_for_quiet

# Sections in the order they run: learning before communication, so that the
# float32 federation learning trains is reused rather than trained twice.
ORDER = ("throughput", "federation", "learning", "communication", "scale", "ledger")
HELP = {
    "throughput": "1. tokens/s of the ClientApp's training loop against a plain one",
    "federation": "2. time per round with 2, 5 and 10 supernodes",
    "communication": "3. bytes per client and round, float32 against float16",
    "learning": "4. validation loss per token, centralized against federated",
    "scale": "5. memory and round time with 50 and 100 supernodes",
    "ledger": "6. ledger writes/s and hydra-ledger balances with 10,000 users",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure HydraAI and write docs/benchmarks.md. With no "
        "section flag every section runs (about 30 minutes on 2 cores). "
        "Example: python -m bench --quick --throughput --ledger",
    )
    parser.add_argument("--quick", action="store_true", help="shorter runs of each")
    for name in ORDER:
        parser.add_argument(f"--{name}", action="store_true", help=HELP[name])
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="measure at once, without waiting for the load average to fall "
        "below 1.5 (the default waits up to 10 minutes)",
    )
    parser.add_argument(
        "--out",
        default=str(ROOT / "docs" / "benchmarks.md"),
        help="the Markdown file to write (default: docs/benchmarks.md)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = [name for name in ORDER if getattr(args, name)] or list(ORDER)
    flags = shlex.join(argv if argv is not None else sys.argv[1:])
    command = f"python -m bench {flags}".strip()
    info = machine()
    say("Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    load = os.getloadavg()[0] if args.no_wait else wait_for_quiet()
    info["1-minute load at the start"] = f"{load:.2f}"

    runners = {
        "throughput": lambda: throughput.run(args.quick),
        "federation": lambda: federation.run(args.quick, shared),
        "learning": lambda: learning.run(args.quick),
        "communication": lambda: communication.run(args.quick),
        "scale": lambda: scale.run(args.quick, shared.get("federation runs")),
        "ledger": lambda: ledger_bench.run(args.quick),
    }
    shared: dict = {}
    start = time.perf_counter()
    for name in chosen:
        began = time.perf_counter()
        section = runners[name]()
        section.seconds = time.perf_counter() - began
        section.load_after = os.getloadavg()[0]
        section.save()
        say(f"  ({name}: {section.seconds:.0f}s)")

    info["date"] = time.strftime("%Y-%m-%d %H:%M %Z")
    info["run time"] = f"{time.perf_counter() - start:.0f} s for {', '.join(chosen)}"
    path = report.write(Path(args.out), info, command)
    say(f"\nAll done in {time.perf_counter() - start:.0f}s; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
