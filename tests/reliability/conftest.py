"""Helpers for the reliability suite: the `flywheel` command run as a real process on a data root
(so it can be killed), snapshots of what the pipeline stores, and a secret to look for."""

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import duckdb
import pytest

REPO = Path(__file__).resolve().parents[2]
FLYWHEEL = str(Path(sys.prefix) / "bin" / "flywheel")
# A W&B key in every process's environment: it must never show up in anything flywheel writes.
WANDB_SECRET = secrets.token_hex(20)
# Small data and a short training: enough for the digits to pass the gates, fast on 2 CPU cores.
TRAINING_SETTINGS = "trained_model:\n  epochs: 10\n  batch_size: 32\n"


class Flywheel:
    """`flywheel` on one data root, as separate processes."""

    def __init__(self, root: Path):
        self.root = root
        self.dagster_home = root / "dagster"
        # Where the daemon's sensors read run settings too, so its runs train as fast as a tick's.
        self.settings = root / "flywheel.yaml"
        self.settings.write_text(TRAINING_SETTINGS)
        self.env = {
            **os.environ, "FLYWHEEL_HOME": str(root), "DAGSTER_HOME": str(self.dagster_home),
            "WANDB_MODE": "offline", "WANDB_API_KEY": WANDB_SECRET, "PYTHONUNBUFFERED": "1",
            "PATH": f"{Path(sys.prefix) / 'bin'}:{os.environ['PATH']}",
        }
        self.outputs: list[str] = []

    def instance(self) -> dg.DagsterInstance:
        return dg.DagsterInstance.from_config(str(self.dagster_home))

    def start(self, *args: str, **popen) -> subprocess.Popen:
        """The command with its output in files: a pipe that is read only at the end fills up (64 KiB)
        and blocks the process writing to it, which a test polling for a kill point would wait on."""
        logs = self.root.parent / "outputs"
        logs.mkdir(exist_ok=True)
        number = len(list(logs.glob("*.out")))
        out, err = logs / f"{number:03d}.out", logs / f"{number:03d}.err"
        with out.open("w") as stdout, err.open("w") as stderr:
            process = subprocess.Popen([FLYWHEEL, *args], cwd=REPO, env=self.env, stdout=stdout, stderr=stderr, **popen)
        process.output_files = (out, err)
        return process

    def finish(self, process: subprocess.Popen, timeout: float = 600) -> subprocess.CompletedProcess:
        process.wait(timeout=timeout)
        stdout, stderr = read_output(process)
        self.outputs += [stdout, stderr]
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

    def __call__(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return self.finish(self.start(*args), timeout)

    def tick_args(self) -> list[str]:
        """One loop tick with the fast settings."""
        return ["run", "--config", str(self.settings)]

    def run(self) -> subprocess.CompletedProcess:
        return self(*self.tick_args())


@pytest.fixture
def flywheel(tmp_path: Path) -> Flywheel:
    root = tmp_path / "flywheel"
    root.mkdir()
    return Flywheel(root)


def read_output(process: subprocess.Popen) -> tuple[str, str]:
    """(stdout, stderr) of a process `Flywheel.start` started."""
    return tuple(path.read_text() for path in process.output_files)


def kill_when(process: subprocess.Popen, condition, timeout: float = 900, what: str = "") -> None:
    """SIGKILL `process` as soon as `condition()` holds (polled every 20 ms). `timeout` is a hang guard,
    not a speed limit: under `make test` another test file runs beside this one, and a loop test then took
    up to ~2.4x its time alone (300 s was passed once, on the way to a drifted batch's export)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            stdout, stderr = read_output(process)
            raise AssertionError(f"the process ended (code {process.returncode}) before {what}:\n{stdout[-3000:]}\n{stderr[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    if not folder.exists():
        return {}
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*")) if path.is_file()
    }


def warehouse_snapshot(path: Path) -> dict[str, tuple[int, str]]:
    """(row count, content hash) of every table and view in the warehouse."""
    with duckdb.connect(str(path), read_only=True) as connection:
        tables = [row[0] for row in connection.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' ORDER BY table_name"
        ).fetchall()]
        snapshot = {}
        for table in tables:
            # Table names come from the catalog itself, never from input; quoted as identifiers.
            rows = connection.execute(f'SELECT t::VARCHAR AS row FROM "{table}" AS t ORDER BY row').fetchall()
            snapshot[table] = (len(rows), hashlib.sha256(json.dumps(rows).encode()).hexdigest())
    return snapshot
