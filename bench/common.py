"""What every benchmark section shares: results, the machine, load and memory."""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import flwr
import torch

from hydraai.config import RunConfig

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BIN = Path(sys.executable).parent

# The brief for a fair measurement: a 1-minute load average below this.
QUIET_LOAD = 1.5


@dataclass
class Table:
    """Figures side by side: a title, column names and rows of cells."""

    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)


@dataclass
class Target:
    """A goal, what was measured against it and whether it was met."""

    goal: str
    measured: str
    met: bool


@dataclass
class SectionResult:
    """Everything one section measured, as printed and as written to the docs."""

    name: str
    title: str
    mode: str
    started: str
    load_before: float
    settings: dict[str, Any] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    load_after: float = 0.0

    def table(self, title: str, columns: list[str]) -> Table:
        """Start a new table in this section and return it."""
        table = Table(title, columns)
        self.tables.append(table)
        return table

    def target(self, goal: str, measured: str, met: bool) -> None:
        self.targets.append(Target(goal, measured, met))
        say(f"  target: {goal} -> {measured} [{'met' if met else 'MISSED'}]")

    def note(self, text: str) -> None:
        self.notes.append(text)
        say(f"  note: {text}")

    def save(self) -> Path:
        """Write the section's figures to bench/results/<name>.json."""
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{self.name}.json"
        path.write_text(json.dumps(asdict(self), indent=2, default=str))
        return path

    @classmethod
    def load(cls, path: Path) -> SectionResult:
        data = json.loads(path.read_text())
        data["tables"] = [Table(**t) for t in data["tables"]]
        data["targets"] = [Target(**t) for t in data["targets"]]
        return cls(**data)


def declared_config(**changes: Any) -> RunConfig:
    """The run config pyproject.toml declares, as hydra-run starts it, changed."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        declared = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    return RunConfig.from_run_config(declared).replace(**changes)


def new_section(name: str, title: str, quick: bool) -> SectionResult:
    load = os.getloadavg()[0]
    say(f"\n== {title} ({'quick' if quick else 'full'}; load {load:.2f}) ==")
    return SectionResult(
        name=name,
        title=title,
        mode="quick" if quick else "full",
        started=datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        load_before=load,
    )


def say(text: str) -> None:
    """Print a line of progress or a figure at once."""
    print(text, flush=True)


def print_table(table: Table) -> None:
    """Print a table as aligned columns."""
    cells = [table.columns] + [[fmt(c) for c in row] for row in table.rows]
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(cells[0]))]
    say(f"  {table.title}")
    for row in cells:
        say(
            "    "
            + "  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True))
        )


def fmt(value: Any) -> str:
    """A cell as text: floats with a sensible number of digits."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        if abs(value) >= 0.01:
            return f"{value:.3f}"
        return f"{value:.2e}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    model = platform.processor() or "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "memory": f"{mem_kib / 2**20:.1f} GiB",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch threads": str(torch.get_num_threads()),
        "flwr": flwr.__version__,
        "os": platform.platform(),
    }


def wait_for_quiet(max_wait: float = 600.0, poll: float = 30.0) -> float:
    """Wait until the 1-minute load average is below QUIET_LOAD; return it.

    The machine is shared, so a measurement under someone else's load would
    measure them; after max_wait seconds the run goes ahead and says so.
    """
    deadline = time.monotonic() + max_wait
    load = os.getloadavg()[0]
    while load >= QUIET_LOAD and time.monotonic() < deadline:
        say(f"load average {load:.2f} >= {QUIET_LOAD}: waiting {poll:.0f}s")
        time.sleep(poll)
        load = os.getloadavg()[0]
    if load >= QUIET_LOAD:
        say(f"load average still {load:.2f} after {max_wait:.0f}s: measuring anyway")
    return load


def best_of(fn, repeats: int = 3) -> float:
    """The shortest wall time of several calls of fn, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_ceiling(sizes: tuple[int, ...] = (1024, 2048), repeats: int = 10) -> float:
    """Measured fp32 matrix-multiply FLOP/s on this machine: the best square run."""
    best = 0.0
    for size in sizes:
        a, b = torch.randn(size, size), torch.randn(size, size)
        torch.mm(a, b)  # warm up the BLAS threads
        seconds = best_of(functools.partial(torch.mm, a, b), repeats)
        best = max(best, 2 * size**3 / seconds)
    return best


# --- processes -------------------------------------------------------------


def process_table() -> dict[int, tuple[int, str]]:
    """(parent pid, start time) of every process, from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), fields[19])
    return table


def tree(root: int, table: dict[int, tuple[int, str]]) -> set[int]:
    """root and every process whose chain of parents leads to it."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found & set(table)


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in KiB; PSS shares each shared page out."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


class TreeSampler:
    """Samples the memory of a process tree in the background while it runs.

    Records the peak of the summed RSS (what the brief asks for; it counts a
    page shared by n processes n times) and of the summed PSS (each shared
    page split between its users, so closer to what the tree really costs),
    the most Ray ClientApp actors alive at once, and every process seen, so
    that whatever outlives the run can be stopped.
    """

    def __init__(self, root: int, interval: float = 1.0) -> None:
        self.root = root
        self.interval = interval
        self.peak_rss_kib = 0
        self.peak_pss_kib = 0
        self.peak_processes = 0
        self.max_actors = 0
        self.seen: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        table = process_table()
        pids = tree(self.root, table)
        rss = pss = actors = 0
        for pid in pids:
            self.seen.setdefault(pid, table[pid][1])
            r, p = memory_kib(pid)
            rss, pss = rss + r, pss + p
            if "ClientAppActor" in cmdline(pid):
                actors += 1
        self.peak_rss_kib = max(self.peak_rss_kib, rss)
        self.peak_pss_kib = max(self.peak_pss_kib, pss)
        self.peak_processes = max(self.peak_processes, len(pids))
        self.max_actors = max(self.max_actors, actors)

    def stop_leftovers(self) -> int:
        """SIGKILL every process seen in the tree that is still alive; count them.

        A pid counts only if its start time is unchanged, so a recycled pid of
        someone else's process is never touched.
        """
        table = process_table()
        stopped = 0
        for pid, started in self.seen.items():
            if pid in table and table[pid][1] == started and pid != os.getpid():
                try:
                    os.kill(pid, 9)
                    stopped += 1
                except (ProcessLookupError, PermissionError):
                    pass
        return stopped


def gib(kib: int) -> float:
    return kib / 2**20
