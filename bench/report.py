"""docs/benchmarks.md from the sections' saved figures."""

from __future__ import annotations

from pathlib import Path

from bench.common import RESULTS, SectionResult, fmt

SECTIONS = ("throughput", "federation", "communication", "learning", "scale", "ledger")


def markdown_table(columns: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(c).replace("|", "/") for c in row) + " |")
    return lines


def write(path: Path, machine: dict[str, str], command: str) -> Path:
    """Write every section with saved figures, newest run of each, to path."""
    results = [
        SectionResult.load(RESULTS / f"{name}.json")
        for name in SECTIONS
        if (RESULTS / f"{name}.json").exists()
    ]
    lines = [
        "# HydraAI benchmarks",
        "",
        "Written by `python -m bench` (`make bench`); every figure below was "
        "measured, none is asserted. Rerun a section alone with its flag, e.g. "
        "`.venv/bin/python -m bench --ledger`; `--quick` runs a shorter version "
        "of each.",
        "",
        f"Command: `{command}` (`make bench` runs `python -m bench`; "
        "`make bench BENCH_ARGS=...` passes flags)",
        "",
        *markdown_table(["machine", ""], [[k, v] for k, v in machine.items()]),
        "",
        "## Targets",
        "",
    ]
    rows = [
        [r.title, t.goal, t.measured, "met" if t.met else "**missed**"]
        for r in results
        for t in r.targets
    ]
    lines += markdown_table(["section", "target", "measured", ""], rows)

    for result in results:
        lines += [
            "",
            f"## {result.title}",
            "",
            f"Measured {result.started}, {result.mode} mode, in "
            f"{result.seconds:.0f} s; 1-minute load average {result.load_before:.2f} "
            f"before, {result.load_after:.2f} after.",
            "",
        ]
        lines += [f"- {key}: {value}" for key, value in result.settings.items()]
        for table in result.tables:
            lines += ["", f"**{table.title}**", ""]
            lines += markdown_table(table.columns, table.rows)
        if result.targets:
            lines.append("")
            lines += [
                f"- Target: {t.goal}: {t.measured} ({'met' if t.met else 'missed'})"
                for t in result.targets
            ]
        if result.notes:
            lines.append("")
            lines += [f"- {note}" for note in result.notes]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
