"""The persistent Dagster instance under the data root, shared by `flywheel run`, `make dev`'s
webserver and daemon, so every run shows up in the UI."""

import os
import socket
import sys
from pathlib import Path

import dagster as dg

# Every pool has one slot: DuckDB allows one writer (pool `warehouse`), and one machine trains one run
# at a time (pool `gpu`; on a cluster its slots follow the GPUs: `set_training_slots`). Run monitoring
# frees the slots of runs whose process died.
DAGSTER_YAML = """\
telemetry:
  enabled: false
concurrency:
  pools:
    default_limit: 1
run_monitoring:
  enabled: true
  poll_interval_seconds: 30
"""


def dagster_home(flywheel_root: Path) -> Path:
    """`$DAGSTER_HOME`, else `<data root>/dagster`, created with flywheel's dagster.yaml."""
    home = Path(os.environ.get("DAGSTER_HOME") or flywheel_root / "dagster").resolve()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(DAGSTER_YAML)
    return home


def latest_materialization(
    instance: dg.DagsterInstance, asset: str, partition: str | None = None
) -> dg.EventLogRecord | None:
    """The latest materialization of an asset (of one partition), or None."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None),
        limit=1,
    ).records
    return records[0] if records else None


def latest_timestamp(instance: dg.DagsterInstance, asset: str, partition: str | None = None) -> float:
    """When the asset (one partition of it) was last materialized; 0 when never."""
    record = latest_materialization(instance, asset, partition)
    return record.timestamp if record else 0.0


def labeled_batches(instance: dg.DagsterInstance) -> dict[str, float]:
    """Batch -> when it was last ingested, for the batches whose latest ingestion held labeled rows."""
    batches = {}
    for batch in instance.get_dynamic_partitions("batches"):
        record = latest_materialization(instance, "raw_images", batch)
        labeled = record.asset_materialization.metadata.get("labeled") if record else None
        if labeled is not None and labeled.value:
            batches[batch] = record.timestamp
    return batches


# Tags of every run `flywheel run` executes in its own process, so a later tick can tell whether the
# process behind a run that never finished is gone.
PID_TAG, HOST_TAG = "flywheel/pid", "flywheel/host"
# Set on a run this recovery marked failed: it never got to finish, so it is no failed attempt.
ABANDONED_TAG = "flywheel/abandoned"
UNFINISHED = [dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]


def process_tags() -> dict[str, str]:
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_abandoned_runs(instance: dg.DagsterInstance) -> list[str]:
    """Runs of a `flywheel run` process that died (killed, crashed) stay "started" and keep their
    pool slots, which would block every later run of the pool: mark them failed and free the slots.
    Returns their run ids. (Runs the daemon launches are watched by its run monitoring instead.)"""
    records = instance.get_run_records(
        dg.RunsFilter(statuses=UNFINISHED, tags={HOST_TAG: socket.gethostname()})
    )
    abandoned = []
    for record in records:
        run = record.dagster_run
        pid = int(run.tags[PID_TAG])
        if pid == os.getpid() or _alive(pid):
            continue
        instance.add_run_tags(run.run_id, {ABANDONED_TAG: "true"})
        instance.report_run_failed(run, f"the flywheel run process (pid {pid}) executing this run ended without finishing it")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        abandoned.append(run.run_id)
    return abandoned


GPU_POOL = "gpu"


def set_training_slots(instance: dg.DagsterInstance, flywheel) -> int:
    """Give the `gpu` pool as many slots as the project's `compute` settings let trainings run at once
    (`TrainingCompute.training_slots`); returns them."""
    from orchestration.resources import TrainingCompute
    from orchestration.settings import current_settings

    slots = TrainingCompute.model_validate(current_settings(flywheel).get("compute", {})).training_slots()
    instance.event_log_storage.set_concurrency_slots(GPU_POOL, slots)
    return slots


def get_instance(flywheel_root: Path) -> dg.DagsterInstance:
    os.environ["DAGSTER_HOME"] = str(dagster_home(flywheel_root))
    return dg.DagsterInstance.get()


if __name__ == "__main__":
    # `make dev` asks for the instance folder (created with flywheel's dagster.yaml) to export it.
    from orchestration.resources import FlywheelHome

    from orchestration.project import SettingsError

    flywheel = FlywheelHome()
    with get_instance(flywheel.root) as instance:
        try:
            set_training_slots(instance, flywheel)
        except SettingsError as error:  # the webserver starts anyway and shows the runs' failures
            print(error, file=sys.stderr)
    print(dagster_home(flywheel.root))
