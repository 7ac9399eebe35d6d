"""Real deployments on 127.0.0.1: SuperLink, SuperNodes, TLS, authentication, crash."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_ssh_private_key,
    load_ssh_public_key,
)
from helpers import tiny_config

from hydraai.certs import main as hydra_certs
from hydraai.certs import make_server_certs, make_supernode_keys
from hydraai.config import RunConfig
from hydraai.deploy import (
    ServerCerts,
    SuperLink,
    register_supernode,
    start_run,
    start_superlink,
    start_supernode,
    started_run_id,
    wait_for_line,
    write_connection,
)
from hydraai.launch import flower_env, run_status, stop_tree
from hydraai.ledger import Ledger

APP_DIR = Path(__file__).resolve().parents[1]
CONNECTION = "hydra"
# Every process a test starts inherits this variable, so leftovers can be found.
MARK = "HYDRAAI_DEPLOYMENT_TEST"
# Seconds to wait for a SuperNode to connect, and for a whole run.
NODE_TIMEOUT = 60
RUN_TIMEOUT = 300
# A SuperNode that stops sending heartbeats still counts as online for up to
# 2 x 30 s in flwr 1.42; a round timeout beyond that lets the SuperLink report
# a killed node's task as failed before the round gives up waiting.
ROUND_TIMEOUT = 120.0
ALICE = {"user-id": "alice", "partition-id": 0, "num-partitions": 2}
BOB = {"user-id": "bob", "partition-id": 1, "num-partitions": 2}


def tiny_run(tmp_path: Path, **changes) -> dict:
    """The tiny run of tests/helpers.py as --run-config entries, defaults left out."""
    config = tiny_config(tmp_path, round_timeout=ROUND_TIMEOUT, **changes)
    defaults = RunConfig().to_run_config()
    return {k: v for k, v in config.to_run_config().items() if v != defaults[k]}


class Deployment:
    """Starts a SuperLink, SuperNodes and runs under tmp_path; stops them all."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path
        self.coordinator = tmp_path / "coordinator"
        self.env = flower_env(APP_DIR, tmp_path / "flwr-home")
        self.env[MARK] = str(tmp_path)
        self.processes: list[subprocess.Popen] = []
        self.superlink: SuperLink | None = None

    def start_superlink(self, certs: ServerCerts | None = None, auth=False) -> None:
        self.superlink = start_superlink(self.env, self.coordinator, certs, auth)
        self.processes.append(self.superlink.process)
        root = certs.ca if certs is not None else None
        write_connection(
            Path(self.env["FLWR_HOME"]), CONNECTION, self.superlink.address, root
        )

    def start_supernode(
        self, machine: str, node_config: dict, key: Path | None = None, log_name=""
    ) -> tuple[subprocess.Popen, Path]:
        """A SuperNode with the FLWR_HOME of its volunteer's machine; its log."""
        env = dict(self.env, FLWR_HOME=str(self.root / "nodes" / machine))
        log = self.root / "nodes" / f"{log_name or machine}.log"
        process = start_supernode(env, self.superlink, node_config, log, key)
        self.processes.append(process)
        return process, log

    def connect(
        self, machine: str, node_config: dict, key: Path | None = None, log_name=""
    ) -> tuple[subprocess.Popen, Path, int]:
        """Start a SuperNode and wait until it is online; also returns its node id."""
        process, log = self.start_supernode(machine, node_config, key, log_name)
        found = wait_for_line(log, r"SuperNode ID: (\d+)", NODE_TIMEOUT, process)
        return process, log, int(found.group(1))

    def start_run(self, run_config: dict) -> subprocess.Popen:
        process = start_run(
            self.env, APP_DIR, CONNECTION, run_config, self.root / "run.log"
        )
        self.processes.append(process)
        return process

    def finish_run(self, process: subprocess.Popen) -> str:
        """Wait for `flwr run --stream` to end; the run's status from `flwr ls`."""
        try:
            process.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the run did not end in {RUN_TIMEOUT}s:\n{self.run_log()}")
        run_id = started_run_id(self.root / "run.log")
        assert run_id is not None, f"flwr run started no run:\n{self.run_log()}"
        return run_status(self.env, run_id, CONNECTION)

    def run_log(self) -> str:
        text = (self.root / "run.log").read_text(errors="replace")
        return text[-6000:]

    def stop(self) -> list[str]:
        """Stop every process, last started first; the ones still alive after."""
        for process in reversed(self.processes):
            stop_tree(process)
        return leftovers(str(self.root))


def leftovers(mark: str) -> list[str]:
    """Command lines of live processes whose environment carries the mark."""
    needle = f"{MARK}={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            found.append((entry / "cmdline").read_text().replace("\0", " "))
        except OSError:
            continue
    return found


@pytest.fixture
def deployment(tmp_path):
    """A Deployment whose processes are all stopped when the test ends, also on
    failure; the test errors if any of them, or anything they started, is left."""
    deployment = Deployment(tmp_path)
    try:
        yield deployment
    finally:
        left = deployment.stop()
    assert left == [], f"processes left running: {left}"


def balances(ledger_path: Path) -> dict[str, float]:
    with Ledger(ledger_path) as ledger:
        assert ledger.verify() == []
        return {row["user_id"]: row["balance"] for row in ledger.balances()}


def test_hydra_certs_makes_a_server_chain_and_supernode_keys(tmp_path, capsys):
    certs = tmp_path / "certs"
    args = ["server", str(certs), "--host", "hydra.example.org", "--host", "10.0.0.5"]
    assert hydra_certs(args) == 0

    # The server certificate is signed by the CA and names every host.
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert names.value.get_values_for_type(x509.DNSName) == [
        "localhost",
        "hydra.example.org",
    ]
    addresses = names.value.get_values_for_type(x509.IPAddress)
    assert [str(a) for a in addresses] == ["127.0.0.1", "10.0.0.5"]
    assert (certs / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (certs / "server.key").stat().st_mode & 0o777 == 0o600

    # Nothing is overwritten without --force, and a host with a port is refused.
    before = (certs / "ca.crt").read_bytes()
    assert hydra_certs(["server", str(certs)]) == 2
    assert "refusing to replace existing" in capsys.readouterr().err
    assert (certs / "ca.crt").read_bytes() == before
    assert hydra_certs(["server", str(tmp_path / "other"), "--host", "a.org:9093"]) == 2
    assert "without a port" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()

    # A SuperNode key pair: ECDSA P-384 in OpenSSH format, as Flower requires.
    assert hydra_certs(["key", str(tmp_path / "keys" / "alice")]) == 0
    private = load_ssh_private_key((tmp_path / "keys" / "alice").read_bytes(), None)
    public = load_ssh_public_key((tmp_path / "keys" / "alice.pub").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.curve.name == "secp384r1"
    assert public == private.public_key()


def test_two_volunteers_train_over_an_insecure_superlink(deployment, tmp_path):
    deployment.start_superlink()
    deployment.connect("alice", ALICE)
    deployment.connect("bob", BOB)

    # The default, relative output-dir lands in the SuperLink's working directory.
    run_config = tiny_run(
        tmp_path, run_name="insecure", output_dir="outputs", fraction_evaluate=0.0
    )
    assert "output-dir" not in run_config
    status = deployment.finish_run(deployment.start_run(run_config))
    assert status == "finished:completed", deployment.run_log()

    outputs = deployment.coordinator / "outputs"
    records = json.loads((outputs / "insecure" / "metrics.json").read_text())
    assert [r["server_round"] for r in records] == [0, 1, 2]
    assert [(r["accepted"], r["failed"]) for r in records[1:]] == [(2, 0), (2, 0)]
    # Two rounds of 2.0 tokens each, paid to the claimed user ids.
    assert balances(outputs / "ledger.db") == {"alice": 4.0, "bob": 4.0}


def test_tls_and_authentication_pay_registered_names_only(deployment, tmp_path):
    make_server_certs(tmp_path / "certs")
    keys = tmp_path / "keys"
    for name in ("alice", "bob", "mallory"):
        make_supernode_keys(keys / name)
    deployment.start_superlink(ServerCerts.in_folder(tmp_path / "certs"), auth=True)
    env = deployment.env
    alice_id = register_supernode(env, keys / "alice.pub", CONNECTION, "alice")
    bob_id = register_supernode(env, keys / "bob.pub", CONNECTION, "bob")

    # An unregistered key is refused: the SuperNode exits with an error.
    mallory, log = deployment.start_supernode(
        "mallory", {**ALICE, "user-id": "mallory"}, keys / "mallory"
    )
    assert mallory.wait(timeout=NODE_TIMEOUT) == 1
    assert "Exit Code: 305" in log.read_text()
    assert "Failed to activate SuperNode" in log.read_text()

    # Registered keys get in under the node ids their registration returned.
    _, _, node_id = deployment.connect("alice", ALICE, keys / "alice")
    assert node_id == alice_id
    _, _, node_id = deployment.connect("bob", {**BOB, "user-id": "carol"}, keys / "bob")
    assert node_id == bob_id

    output_dir = tmp_path / "outputs"
    run_config = tiny_run(
        tmp_path, run_name="tls", num_server_rounds=1, fraction_evaluate=0.0
    )
    assert run_config["output-dir"] == str(output_dir)
    status = deployment.finish_run(deployment.start_run(run_config))
    assert status == "finished:completed", deployment.run_log()

    # alice is paid under her registered name; bob's claim to be carol is refused.
    with Ledger(output_dir / "ledger.db") as ledger:
        tasks = {t["node_id"]: t for t in ledger.tasks(run_name="tls")}
    assert set(tasks) == {alice_id, bob_id}
    alice, bob = tasks[alice_id], tasks[bob_id]
    assert (alice["status"], alice["user_id"], alice["reward"]) == (
        "completed",
        "alice",
        2.0,
    )
    assert (bob["status"], bob["user_id"], bob["reward"]) == ("rejected", "bob", 0)
    claim = "claims user-id 'carol', but the node is registered as 'bob'"
    assert claim in bob["reason"]
    assert balances(output_dir / "ledger.db") == {"alice": 2.0, "bob": 0.0}


def test_a_killed_volunteer_fails_its_task_and_a_restarted_one_rejoins(
    deployment, tmp_path
):
    deployment.start_superlink()
    deployment.connect("alice", ALICE)
    bob, bob_log, killed_id = deployment.connect("bob", BOB)

    output_dir = tmp_path / "outputs"
    run = deployment.start_run(
        tiny_run(tmp_path, run_name="fault", fraction_evaluate=0.0)
    )

    # Kill bob's SuperNode and its ClientApp once it has received round 1's task.
    wait_for_line(bob_log, r"Receiving: train message", RUN_TIMEOUT, bob)
    os.killpg(bob.pid, signal.SIGKILL)
    bob.wait(timeout=NODE_TIMEOUT)

    # Restarted while round 1 waits for the killed node, bob comes back under a
    # new node id: without authentication nothing ties it to the old one.
    _, _, restarted_id = deployment.connect("bob", BOB, log_name="bob-again")
    assert restarted_id != killed_id

    status = deployment.finish_run(run)
    assert status == "finished:completed", deployment.run_log()
    records = json.loads((output_dir / "fault" / "metrics.json").read_text())
    assert [(r["accepted"], r["failed"]) for r in records[1:]] == [(1, 1), (2, 0)]

    # The killed node's task failed and earned nothing; alice was paid for both
    # rounds, and the restarted bob for round 2.
    with Ledger(output_dir / "ledger.db") as ledger:
        round_1 = {t["node_id"]: t for t in ledger.tasks("fault", server_round=1)}
        round_2 = {t["node_id"]: t for t in ledger.tasks("fault", server_round=2)}
    killed = round_1[killed_id]
    assert (killed["status"], killed["reward"], killed["user_id"]) == (
        "failed",
        0,
        None,
    )
    assert "Node Unavailable" in killed["reason"]
    assert round_2[restarted_id]["status"] == "completed"
    assert round_2[restarted_id]["user_id"] == "bob"
    assert killed_id not in round_2
    assert balances(output_dir / "ledger.db") == {"alice": 4.0, "bob": 2.0}
