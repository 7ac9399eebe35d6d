"""hydra-run, what `make run` calls: a real SuperLink, status checked, nothing left."""

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parent.parent
TINY = (
    "num-server-rounds=2 local-steps=2 batch-size=4 block-size=32 n-embd=32 "
    "n-layer=1 n-head=2 vocab-size=400 sample-tokens=8 run-name='launched'"
)
FLOWER_PROGRAMS = ("flower-superlink", "flower-superexec", "flwr-simulation", "raylet")


def hydra_run(tmp_path, *run_config):
    outputs = tmp_path / "outputs"
    return subprocess.run(
        [
            sys.executable, "-m", "hydraai.launch",
            "--num-supernodes", "2",
            "--flwr-home", str(tmp_path / "flwr"),
            "--run-config", f"output-dir='{outputs}'",
            *[arg for config in run_config for arg in ("--run-config", config)],
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip


def flower_processes(flwr_home: Path) -> list[str]:
    """Command lines of live Flower or Ray processes that use this FLWR_HOME."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            environ = (entry / "environ").read_bytes()
        except OSError:  # not a process, or one that has just ended
            continue
        text = cmdline.decode(errors="replace")
        uses_home = str(flwr_home).encode() in environ
        if uses_home and any(program in text for program in FLOWER_PROGRAMS):
            found.append(text)
    return found


def test_a_completed_run_exits_zero_with_outputs_and_no_processes_left(tmp_path):
    result = hydra_run(tmp_path, TINY)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "finished:completed" in result.stdout
    assert "round 2/2" in result.stdout
    assert "Sample from the final model" in result.stdout

    run_dir = tmp_path / "outputs" / "launched"
    assert (run_dir / "metrics.json").exists()
    assert (run_dir / "report" / "report.md").exists()
    assert (tmp_path / "outputs" / "ledger.db").exists()
    time.sleep(1)
    assert flower_processes(tmp_path / "flwr") == []


def test_a_failed_run_exits_non_zero(tmp_path):
    result = hydra_run(tmp_path, TINY, "dataset='/no/such/corpus.txt'")
    assert result.returncode == 1
    assert "did not complete" in result.stderr
    assert "finished:failed" in result.stdout
    time.sleep(1)
    assert flower_processes(tmp_path / "flwr") == []


def test_a_bad_config_value_stops_before_anything_starts(tmp_path):
    result = hydra_run(tmp_path, "blend-rate=1.5")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: run config key 'blend-rate' is 1.5, but it must be a number in "
        "(0, 1]; fix it in [tool.flwr.app.config] or with --run-config "
        '"blend-rate=..."'
    ]
    assert not (tmp_path / "flwr").exists()
