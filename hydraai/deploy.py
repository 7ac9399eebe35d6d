"""Flower's deployment engine on one machine: a SuperLink, SuperNodes and a run.

What a coordinator and volunteers type by hand (see the README), as functions:
start a SuperLink with or without TLS and SuperNode authentication, name it
as a connection in `$FLWR_HOME/config.toml`, register volunteers' keys, start
SuperNodes and submit a run. Every process starts in its own session, so
`hydraai.launch.stop_tree` stops it with everything it started.
"""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from hydraai.launch import free_port

STARTUP_TIMEOUT = 30.0


@dataclass(frozen=True)
class ServerCerts:
    """The SuperLink's TLS files, as `hydra-certs server` writes them."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def in_folder(cls, folder: Path) -> ServerCerts:
        """ca.crt, server.pem and server.key in folder, as absolute paths."""
        folder = folder.resolve()
        return cls(folder / "ca.crt", folder / "server.pem", folder / "server.key")


@dataclass
class SuperLink:
    """A running SuperLink: its process, address, TLS files and log."""

    process: subprocess.Popen
    address: str
    certs: ServerCerts | None
    log: Path


def start_superlink(
    env: dict[str, str],
    state_dir: Path,
    certs: ServerCerts | None = None,
    auth: bool = False,
) -> SuperLink:
    """Start a deployment SuperLink on a free port of 127.0.0.1; wait until it answers.

    Its working directory is state_dir, which is also where the ServerApp
    resolves a relative output-dir. Without certs it runs with --insecure.
    """
    if auth and certs is None:
        raise ValueError("SuperNode authentication needs TLS: pass the server certs")
    state_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [
        "flower-superlink",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--database",
        str(state_dir / "state.db"),
        "--disable-runtime-dependency-installation",
    ]
    if certs is None:
        command.append("--insecure")
    else:
        command += ["--ssl-ca-certfile", str(certs.ca)]
        command += ["--ssl-certfile", str(certs.cert)]
        command += ["--ssl-keyfile", str(certs.key)]
    if auth:
        command.append("--enable-supernode-auth")

    log = state_dir / "superlink.log"
    process = _start(command, env, state_dir, log)
    superlink = SuperLink(process, f"127.0.0.1:{port}", certs, log)
    wait_until_healthy(superlink)
    return superlink


def wait_until_healthy(superlink: SuperLink, timeout: float = STARTUP_TIMEOUT) -> None:
    """Return once the SuperLink answers /health; raise if it exits or stays silent."""
    scheme, context = "http", None
    if superlink.certs is not None:
        scheme = "https"
        context = ssl.create_default_context(cafile=str(superlink.certs.ca))
    url = f"{scheme}://{superlink.address}/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if superlink.process.poll() is not None:
            raise RuntimeError(
                f"flower-superlink exited with code {superlink.process.returncode} "
                f"instead of serving {superlink.address}; see {superlink.log}"
            )
        try:
            with urllib.request.urlopen(url, timeout=1, context=context):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(
        f"flower-superlink did not answer {url} within {timeout:.0f}s; "
        f"see {superlink.log}"
    )


def write_connection(
    flwr_home: Path, name: str, address: str, root_certificates: Path | None = None
) -> Path:
    """Make `name` the default connection in flwr_home/config.toml and return it.

    Without root_certificates the connection is insecure. Flower requires the
    root-certificates path to be absolute.
    """
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]"]
    lines.append(f'address = "{address}"')
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{Path(root_certificates).resolve()}"')
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def register_supernode(
    env: dict[str, str], public_key: Path, connection: str, name: str
) -> int:
    """`flwr supernode register`: allow a volunteer's key; returns the node id."""
    result = _flwr(
        env,
        ["supernode", "register", str(public_key), connection, "--name", name],
    )
    try:
        return int(json.loads(result.stdout)["node-id"])
    except (ValueError, KeyError, TypeError):
        raise RuntimeError(
            f"flwr supernode register {public_key} did not return a node id: "
            f"{result.stdout.strip() or result.stderr.strip()}"
        ) from None


def start_supernode(
    env: dict[str, str],
    superlink: SuperLink,
    node_config: dict,
    log: Path,
    private_key: Path | None = None,
) -> subprocess.Popen:
    """Start a SuperNode that connects to superlink, its output going to log.

    It trusts the SuperLink's CA when the SuperLink has TLS, and signs in with
    private_key when one is given. It listens on a free port for its ClientApps.
    """
    config = " ".join(f"{k}={json.dumps(v)}" for k, v in node_config.items())
    command = [
        "flower-supernode",
        "--superlink",
        superlink.address,
        "--port",
        str(free_port()),
        "--node-config",
        config,
    ]
    if superlink.certs is None:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(superlink.certs.ca)]
    if private_key is not None:
        command += ["--auth-supernode-private-key", str(private_key)]
    log.parent.mkdir(parents=True, exist_ok=True)
    return _start(command, env, log.parent, log)


def start_run(
    env: dict[str, str], app_dir: Path, connection: str, run_config: dict, log: Path
) -> subprocess.Popen:
    """`flwr run APP CONNECTION --stream` in the background, its output going to log.

    The process ends when the run does; `started_run_id` reads the run id from
    the log, and `hydraai.launch.run_status` tells how the run ended.
    """
    config = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
    command = ["flwr", "run", str(app_dir), connection, "--stream"]
    command += ["--run-config", config]
    return _start(command, env, app_dir, log)


def started_run_id(log: Path) -> int | None:
    """The run id `flwr run` reported in its log, or None if it has not yet."""
    found = re.search(r"Successfully started run (\d+)", _read(log))
    return int(found.group(1)) if found else None


def wait_for_line(
    log: Path,
    pattern: str,
    timeout: float,
    process: subprocess.Popen | None = None,
) -> re.Match:
    """Wait until log has a line matching pattern; return the match.

    Raises TimeoutError after timeout seconds, or RuntimeError if process has
    exited first without writing it.
    """
    deadline = time.monotonic() + timeout
    while True:
        found = re.search(pattern, _read(log), re.MULTILINE)
        if found:
            return found
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"{process.args[0]} exited with code {process.returncode} before "
                f"logging /{pattern}/; see {log}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"no line matching /{pattern}/ in {log} in {timeout}s")
        time.sleep(0.2)


def _flwr(env: dict[str, str], args: list[str]) -> subprocess.CompletedProcess:
    """One `flwr` CLI command with JSON output, run away from any pyproject.toml."""
    return subprocess.run(
        ["flwr", *args, "--format", "json"],
        env=env,
        cwd=env["FLWR_HOME"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def _start(
    command: list[str], env: dict[str, str], cwd: Path, log: Path
) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen(
            command,
            env=env,
            cwd=cwd,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
