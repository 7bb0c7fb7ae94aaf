"""Fault injection with SIGKILL on real processes, one data root through the whole module, in order:

1. a training worker killed mid-epoch inside the first `flywheel run`;
2. the next `flywheel run` (resuming that training) killed between publishing a registry version
   and flipping the champion pointer;
3. after a drifted batch lands, the export killed while it writes its ONNX files.

Each time the next run completes, the champion is always servable by ONNX Runtime, and no half
written file is ever read as a version. Last, nothing any of these processes wrote holds the W&B key."""

import subprocess
import time
from pathlib import Path

import dagster as dg
import pytest

from orchestration.instance import latest_materialization
from tests.reliability.conftest import WANDB_SECRET, Flywheel, kill_when
from training.registry import Registry

# pytest's own limit above the tests' hang guards (kill_when's 900 s, then a whole tick).
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]


@pytest.fixture(scope="module")
def flywheel(tmp_path_factory: pytest.TempPathFactory) -> Flywheel:
    root = tmp_path_factory.mktemp("faults") / "flywheel"
    root.mkdir()
    wheel = Flywheel(root)
    assert wheel("simulate", "--batches", "2", "--size", "200").returncode == 0
    return wheel


def registry_of(flywheel: Flywheel) -> Registry:
    return Registry(flywheel.root / "registry")


def assert_no_partial_files(flywheel: Flywheel) -> None:
    registry = registry_of(flywheel)
    leftovers = [p for p in registry.root.rglob("*") if p.name.startswith(".")]
    assert not leftovers, leftovers
    for version in registry.versions():
        version.verify()  # every published version is complete and servable


def unfinished_runs(flywheel: Flywheel) -> list:
    return flywheel.instance().get_run_records(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING]))


def new_attempt_checkpointed(checkpoints: Path, before: set[Path]):
    def condition() -> bool:
        attempts = set(checkpoints.iterdir()) if checkpoints.exists() else set()
        return any((a / "checkpoints" / "last.ckpt").exists() for a in attempts - before)
    return condition


def test_training_worker_killed_mid_epoch(flywheel: Flywheel):
    registry = registry_of(flywheel)
    checkpoints = flywheel.root / "checkpoints"
    tick = flywheel.start(*flywheel.tick_args())
    deadline = time.monotonic() + 900  # a hang guard (see kill_when)
    checkpointed = new_attempt_checkpointed(checkpoints, set())
    while not checkpointed():
        assert tick.poll() is None and time.monotonic() < deadline, "training never wrote its first checkpoint"
        time.sleep(0.05)
    # The workers (`python [-u] -m training.fit <attempt>/fit_config.json`), not their torchrun agent.
    pattern = f"^[^ ]+ (-u )?-m training.fit {checkpoints}"
    workers = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    assert workers, "no training worker process found"
    subprocess.run(["kill", "-KILL", *workers], check=True)
    failed = flywheel.finish(tick)
    assert failed.returncode == 2
    # torchrun prints its worker's fate above; the command's last word is one line naming the signal.
    last_line = failed.stderr.strip().splitlines()[-1]
    assert last_line.startswith("flywheel run: retraining failed (run "), last_line
    assert "training failed: training worker rank 0 (pid " in last_line and "killed by signal SIGKILL (9)" in last_line, last_line
    assert registry.versions() == [] and registry.champion() is None


def test_flywheel_run_killed_between_publish_and_pointer_flip(flywheel: Flywheel):
    registry = registry_of(flywheel)
    run = flywheel.start(*flywheel.tick_args())
    kill_when(run, lambda: bool(registry.versions()), what="v0001 was published")
    trained = latest_materialization(flywheel.instance(), "trained_model").asset_materialization.metadata
    assert trained["resumed_from_step"].value > 0  # it continued from the killed worker's checkpoint
    assert [v.version for v in registry.versions()] == ["v0001"]
    assert registry.champion() is None, "the pointer flipped before the kill: the fault was not injected where intended"
    registry.get("v0001").verify()  # published as a whole, even though never promoted
    assert len(unfinished_runs(flywheel)) == 1  # the killed run, still "started" and holding its pool slots

    recovery = flywheel.run()
    assert recovery.returncode == 0, recovery.stdout + recovery.stderr
    assert "left unfinished by a flywheel run that died" in recovery.stdout
    assert unfinished_runs(flywheel) == []
    # Same data, settings and training attempt: the published version is promoted, not exported again.
    assert [v.version for v in registry.versions()] == ["v0001"]
    assert registry.champion().version == "v0001"
    assert_no_partial_files(flywheel)


def test_export_killed_mid_write(flywheel: Flywheel):
    registry = registry_of(flywheel)
    assert flywheel("simulate", "--batches", "1", "--pool", "holdout", "--drift", "invert", "--prefix", "inverted").returncode == 0
    # This test is about a killed export, not about the promotion gate: here the evaluation gate
    # admits any candidate, so the export starts whatever the retrained candidate scores on this
    # machine's CPU (the gate's decisions are tested in tests/test_gate.py and tests/test_loop.py),
    # and the retraining is short (4 epochs; it was this test's longest step).
    flywheel.settings.write_text(
        "trained_model:\n  epochs: 4\n  batch_size: 32\n"
        "model_evaluation:\n  non_inferiority_margin: 1.0\n  min_slice_size: 1000000\n  max_ece_increase: 1.0\n"
    )
    tick = flywheel.start(*flywheel.tick_args())
    kill_when(tick, lambda: any(registry.root.glob(".staging-*/*")), what="the export began writing files")
    assert [v.version for v in registry.versions()] == ["v0001"]
    assert registry.champion().version == "v0001"
    registry.champion().inference_session()

    again = flywheel.run()
    assert again.returncode == 0, again.stdout + again.stderr
    assert "retraining: yes" in again.stdout and "drifted" in again.stdout  # the unanswered drift, answered now
    assert [v.version for v in registry.versions()] == ["v0001", "v0002"]
    champion = registry.champion()
    assert champion.version == "v0002" and "inverted-000" in champion.card().lineage.training_batches
    assert_no_partial_files(flywheel)


def test_the_wandb_key_is_never_written(flywheel: Flywheel):
    """Everything the processes above wrote or printed: data root, Dagster instance (event logs,
    run metadata), model cards, offline W&B runs, and their stdout/stderr."""
    assert flywheel.outputs
    secret = WANDB_SECRET.encode()
    leaks = [str(p) for p in flywheel.root.rglob("*") if p.is_file() and secret in p.read_bytes()]
    leaks += [f"output {i}" for i, text in enumerate(flywheel.outputs) if WANDB_SECRET in text]
    assert not leaks, leaks
    assert list(flywheel.root.rglob("*.wandb")), "the offline W&B runs were not written: nothing was checked"
