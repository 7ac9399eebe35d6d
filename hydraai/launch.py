"""hydra-run: one simulation through a private SuperLink, checked and cleaned up after.

`flwr run . --stream` exits 0 even when the run fails, leaves its SuperLink
running, and by default reinstalls the app's dependencies. This launcher starts
its own SuperLink (without reinstalling), runs the app, reads the run's final
status and stops every process it started.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import tomllib
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import click
from flwr.common.config import parse_config_args

from hydraai.config import RunConfig
from hydraai.errors import ConfigError, HydraError

STARTUP_TIMEOUT = 30.0


def main(argv: list[str] | None = None) -> int:
    """Run the app in simulation and return 0 only if the run completed."""
    args = parse_args(argv)
    app_dir = Path(args.app).resolve()
    try:
        overrides = resolve_run_config(app_dir, args.run_config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except click.ClickException as err:
        print(f"error: --run-config: {err.message}", file=sys.stderr)
        return 2

    # SIGTERM unwinds like Ctrl-C, so the SuperLink is stopped either way.
    signal.signal(signal.SIGTERM, _interrupt)
    env = flower_env(app_dir, Path(args.flwr_home) if args.flwr_home else None)
    superlink = start_superlink(env, app_dir)
    try:
        run_id = run_app(env, app_dir, overrides, args.num_supernodes)
        status = run_status(env, run_id) if run_id is not None else "unknown"
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: stopped the run and every process it started; resume it "
            f"with --run-config \"run-name='{overrides['run-name']}'\"",
            file=sys.stderr,
        )
        return 130
    finally:
        stop_tree(superlink)

    run_dir = Path(overrides["output-dir"]) / overrides["run-name"]
    run_dir = run_dir if run_dir.is_absolute() else app_dir / run_dir
    print(f"\nrun {run_id}: {status}")
    if status != "finished:completed":
        log = Path(env["FLWR_HOME"]) / "local-superlink" / "superlink.log"
        print(
            f"error: the run did not complete; see the output above and {log}",
            file=sys.stderr,
        )
        return 1
    sample = run_dir / "sample.txt"
    if sample.exists():
        print(f"\nSample from the final model:\n{sample.read_text(encoding='utf-8')}")
    print(f"Outputs: {run_dir}")
    report_run(run_dir, app_dir / overrides["output-dir"] / overrides["ledger-db"])
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def report_run(run_dir: Path, ledger_path: Path) -> None:
    """Write the run's report and print where it is; a failure only warns."""
    # matplotlib is imported only once a run has completed
    from hydraai.report import write_report

    try:
        path = write_report(run_dir, ledger_path)
    except (HydraError, OSError, sqlite3.Error) as err:
        print(
            f"warning: the run completed, but its report was not written: {err} "
            f"(retry with: hydra-ledger report {run_dir.name} "
            f"--output-dir {run_dir.parent})",
            file=sys.stderr,
        )
        return
    print(f"Report: {path}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="hydra-run",
        description="Run a HydraAI simulation and fail unless it completes. "
        'Example: hydra-run --num-supernodes 4 --run-config "num-server-rounds=3"',
    )
    parser.add_argument("--app", default=".", help="the app's folder (default: .)")
    parser.add_argument(
        "--num-supernodes",
        type=int,
        default=4,
        help="virtual volunteers in the simulation (default: 4)",
    )
    parser.add_argument(
        "--run-config",
        action="append",
        default=[],
        help='run config overrides, e.g. "local-steps=5 seed=1"',
    )
    parser.add_argument(
        "--flwr-home", default=None, help="Flower's state folder (default: <app>/.flwr)"
    )
    return parser.parse_args(argv)


def resolve_run_config(app_dir: Path, overrides: list[str]) -> dict:
    """Check the declared config with its overrides and fix the run-name.

    The ServerApp checks the config again; doing it here stops a bad value
    before any Flower process starts.
    """
    with (app_dir / "pyproject.toml").open("rb") as f:
        declared = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    values = {**declared, **parse_config_args(overrides)}
    if not values.get("run-name"):
        values["run-name"] = datetime.now(UTC).strftime("run-%Y%m%d-%H%M%S")
    RunConfig.from_run_config(values)
    return values


def flower_env(app_dir: Path, flwr_home: Path | None) -> dict[str, str]:
    """Environment for Flower's programs: private state, free ports, no reinstall."""
    env = os.environ.copy()
    env["FLWR_HOME"] = str(flwr_home or app_dir / ".flwr")
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(free_port())
    env["FLWR_LOCAL_CONTROL_API_PORT"] = str(free_port())
    # Flower finds its programs by name: put this environment's first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_superlink(env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """Start a simulation SuperLink in its own session and wait until it answers."""
    state_dir = Path(env["FLWR_HOME"]) / "local-superlink"
    state_dir.mkdir(parents=True, exist_ok=True)
    port = env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]
    command = [
        "flower-superlink",
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--disable-runtime-dependency-installation",
        "--control-api-address",
        f"127.0.0.1:{env['FLWR_LOCAL_CONTROL_API_PORT']}",
        "--host",
        "127.0.0.1",
        "--port",
        port,
        "--database",
        str(state_dir / "state.db"),
        "--log-file",
        str(state_dir / "superlink.log"),
    ]
    process = subprocess.Popen(
        command,
        env=env,
        cwd=cwd,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"flower-superlink exited with code {process.returncode}; "
                f"see {state_dir / 'superlink.log'}"
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return process
        except OSError:
            time.sleep(0.2)
    stop_tree(process)
    raise RuntimeError(f"flower-superlink did not answer within {STARTUP_TIMEOUT:.0f}s")


def run_app(
    env: dict[str, str], app_dir: Path, overrides: dict, num_supernodes: int
) -> int | None:
    """`flwr run --stream`, echoing its output; returns the run id it started."""
    config_arg = " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())
    command = [
        "flwr",
        "run",
        str(app_dir),
        "local",
        "--stream",
        "--run-config",
        config_arg,
        "--federation-config",
        f"num-supernodes={num_supernodes}",
    ]
    run_id = None
    with subprocess.Popen(
        command,
        env=env,
        cwd=app_dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    ) as process:
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            found = re.search(r"[Rr]un (?:ID )?(\d{3,})", line)
            if run_id is None and found:
                run_id = int(found.group(1))
    return run_id


def run_status(env: dict[str, str], run_id: int, connection: str = "local") -> str:
    """The run's status as Flower reports it, e.g. "finished:completed"."""
    result = subprocess.run(
        ["flwr", "ls", connection, "--run-id", str(run_id), "--format", "json"],
        env=env,
        # Away from the app's pyproject.toml, which flwr would try to migrate.
        cwd=env["FLWR_HOME"],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        runs = json.loads(result.stdout)["runs"]
        return runs[0]["status"]
    except (ValueError, KeyError, IndexError):
        return f"unknown ({result.stdout.strip() or result.stderr.strip()})"


def stop_tree(process: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop a process, every process below it and their process groups."""
    groups = {
        os.getpgid(pid)
        for pid in descendants(process.pid) | {process.pid}
        if _alive(pid)
    }
    for signum in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            try:
                os.killpg(group, signum)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and members(groups):
            process.poll()
            time.sleep(0.2)
        if not members(groups):
            break
    process.poll()


def descendants(root: int) -> set[int]:
    """Every process whose chain of parents leads to root."""
    children: dict[int, list[int]] = {}
    for pid, stat in _stats():
        children.setdefault(stat[1], []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def members(groups: set[int]) -> set[int]:
    """Live (not zombie) processes in any of the given process groups."""
    return {pid for pid, stat in _stats() if stat[2] in groups and stat[0] != "Z"}


def _stats():
    """(pid, (state, ppid, pgid)) for every process, read from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        yield int(entry.name), (fields[0], int(fields[1]), int(fields[2]))


def _alive(pid: int) -> bool:
    try:
        os.getpgid(pid)
        return True
    except ProcessLookupError:
        return False


if __name__ == "__main__":
    sys.exit(main())
