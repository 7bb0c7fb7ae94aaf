"""Two `flywheel run` ticks and the daemon's sensor-triggered runs at the same time on one data root:
no DuckDB lock error reaches anyone, no batch is ingested twice, no two trainings overlap."""

import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from tests.conftest import stop_process_group
from tests.reliability.conftest import REPO, Flywheel
from training.registry import Registry

pytestmark = pytest.mark.e2e

ACTIVE = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]
LOCK_ERRORS = ("Could not set lock", "Conflicting lock", "database is locked", "IOException")


def step_intervals(instance: dg.DagsterInstance, step_key: str) -> list[tuple[float, float, str]]:
    """(start, end, run id) of every execution of one step, in any run."""
    intervals = []
    for record in instance.get_run_records():
        times = {}
        for entry in instance.all_logs(record.dagster_run.run_id):
            event = entry.dagster_event
            if event is None or event.step_key != step_key:
                continue
            if event.event_type == dg.DagsterEventType.STEP_START:
                times["start"] = entry.timestamp
            elif event.event_type in (dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE):
                times["end"] = entry.timestamp
        if "start" in times:
            intervals.append((times["start"], times.get("end", float("inf")), record.dagster_run.run_id))
    return sorted(intervals)


def wait_for_the_daemon(instance: dg.DagsterInstance, daemon: subprocess.Popen, log: Path, timeout: float = 1500) -> list:
    """Until the landing sensor has launched its ingestion runs and no run is queued or running. When the
    daemon's drift sensor asked for the first retraining before the ticks did, the training runs here
    (the ticks find it queued and leave it), so this guard is the ticks' own: a hang guard, not a speed limit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert daemon.poll() is None, f"the daemon stopped: {log.read_text()[-3000:]}"
        sensor_runs = instance.get_run_records(dg.RunsFilter(tags={"dagster/sensor_name": "landing_sensor"}))
        if len([r for r in sensor_runs if r.dagster_run.job_name == "ingest"]) >= 2 and not instance.get_run_records(
            dg.RunsFilter(statuses=ACTIVE)
        ):
            return sensor_runs
        time.sleep(2)
    raise AssertionError("the daemon's sensor runs did not finish in time")


# pytest's own limit sits above the test's guards (1500 s for the ticks, then 1500 s for the daemon's
# runs; one or the other trains): the suite's default of 900 s stopped it first on a loaded 2-core
# machine (~700 s when nothing else runs).
@pytest.mark.timeout(3300)
def test_two_ticks_and_the_sensors_at_once(flywheel: Flywheel):
    assert flywheel("simulate", "--batches", "2", "--size", "200").returncode == 0
    for path in (flywheel.root / "landing").glob("*.parquet"):
        os.utime(path, (time.time() - 60, time.time() - 60))  # settled, as the landing sensor expects

    # The instance folder with flywheel's dagster.yaml (pools), as `make dev` prepares it.
    subprocess.run([sys.executable, "-m", "orchestration.instance"], cwd=REPO, env=flywheel.env, check=True)
    # The daemon and the run workers it starts log to a file: a pipe nobody reads while they run fills
    # up (64 KiB) and blocks every process writing to it, runs included.
    daemon_log_path = flywheel.root.parent / "daemon.log"
    with daemon_log_path.open("w") as daemon_log_file:
        daemon = subprocess.Popen(
            [str(Path(sys.prefix) / "bin" / "dagster-daemon"), "run", "-w", "workspace.yaml"],
            cwd=REPO, env=flywheel.env, stdout=daemon_log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        ticks = [flywheel.start(*flywheel.tick_args()) for _ in range(2)]
        # A guard against a hang, not a speed limit: the second tick queues behind the first, which
        # waits for the daemon's ingestion runs of the same batches and then trains (10+ min on 2 cores).
        results = [flywheel.finish(tick, timeout=1500) for tick in ticks]
        instance = flywheel.instance()
        sensor_runs = wait_for_the_daemon(instance, daemon, daemon_log_path)
    finally:
        stop_process_group(daemon, grace=60)
    daemon_log = daemon_log_path.read_text()

    for result in results:
        assert result.returncode == 0, result.stdout + result.stderr
    assert any("waiting for it to finish" in r.stderr for r in results)  # the second tick queued behind the first
    runs = instance.get_run_records()
    failures = [
        entry.message for record in runs for entry in instance.all_logs(record.dagster_run.run_id)
        if entry.dagster_event and entry.dagster_event.is_failure
    ]
    for text in [daemon_log, *flywheel.outputs, *failures]:
        assert not any(error in text for error in LOCK_ERRORS), text[-3000:]
    assert all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in sensor_runs), [
        (r.dagster_run.job_name, r.dagster_run.status) for r in sensor_runs
    ]

    # Each batch was written to the warehouse exactly once, whoever asked first; later asks were no-ops.
    writes: dict[str, int] = {}
    for record in instance.fetch_materializations(dg.AssetKey("raw_images"), limit=100).records:
        writes[record.partition_key] = writes.get(record.partition_key, 0) + 1
    assert writes == {"digits-000": 1, "digits-001": 1}
    with duckdb.connect(str(flywheel.root / "warehouse.duckdb"), read_only=True) as connection:
        images, distinct = connection.execute("SELECT count(*), count(DISTINCT image_id) FROM raw_images").fetchone()
        files = connection.execute("SELECT count(*) FROM ingested_files").fetchone()[0]
    assert images == distinct == 400 and files == 2

    # Every training (the ticks' and the sensor's) ran alone, the pool `gpu` queueing the others.
    trainings = step_intervals(instance, "trained_model")
    assert trainings, "no training ran"
    for (_, end, first), (start, _, second) in zip(trainings, trainings[1:]):
        assert end <= start, f"trainings of runs {first} and {second} overlapped"

    registry = Registry(flywheel.root / "registry")
    assert registry.champion() is not None
    for version in registry.versions():
        version.verify()
