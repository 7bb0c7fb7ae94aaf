"""Sensors. The landing sensor turns new or changed landing files into batch partitions and
ingestion runs; its cursor remembers each file's signature, so nothing is ingested twice and
nothing is skipped when many files land at once."""

import json
import time

import dagster as dg

from orchestration.automation import SENSOR_STATUS
from orchestration.jobs import ingest_job, labels_job
from orchestration.partitions import batch_partitions
from orchestration.resources import FlywheelHome
from transforms.labels import label_files_signature
from transforms.landing import LandingFileError, batch_id_of, landed_files

# A file modified this recently may still be being copied in; it is picked up on a later tick.
SETTLE_SECONDS = 5.0


def _signature(stat) -> str:
    return f"{stat.st_mtime_ns}:{stat.st_size}"


def scan_landing(flywheel: FlywheelHome, cursor: dict, now: float) -> tuple[list[tuple[str, str]], list[str], dict]:
    """(new or changed batches with their signature, skipped files with the reason, the next cursor).

    Pure of Dagster so the rule can be tested alone."""
    changed, skipped = [], []
    seen = dict(cursor.get("batches", {}))
    for path in landed_files(flywheel.landing):
        try:
            batch_id = batch_id_of(path)
        except LandingFileError as error:
            skipped.append(str(error))
            continue
        stat = path.stat()
        if now - stat.st_mtime < SETTLE_SECONDS:
            skipped.append(f"{path}: modified {now - stat.st_mtime:.1f}s ago, waiting for it to settle")
            continue
        signature = _signature(stat)
        if seen.get(batch_id) != signature:
            changed.append((batch_id, signature))
            seen[batch_id] = signature
    return changed, skipped, {"batches": seen, "labels": label_files_signature(flywheel.labels)}


@dg.sensor(
    jobs=[ingest_job, labels_job],
    minimum_interval_seconds=30,
    default_status=SENSOR_STATUS,
    description="Registers each new or changed landing/<batch_id>.parquet as a partition and requests its "
    "ingestion; requests a label load when landing/labels/ changes.",
)
def landing_sensor(context: dg.SensorEvaluationContext, flywheel: FlywheelHome) -> dg.SensorResult:
    cursor = json.loads(context.cursor) if context.cursor else {}
    changed, skipped, next_cursor = scan_landing(flywheel, cursor, time.time())
    for reason in skipped:
        context.log.info(reason)
    run_requests = [
        dg.RunRequest(job_name=ingest_job.name, partition_key=batch_id, run_key=f"{batch_id}@{signature}")
        for batch_id, signature in changed
    ]
    # Also on the very first tick, label files or not: the dbt models wait for raw_labels to exist.
    if next_cursor["labels"] != cursor.get("labels"):
        run_requests.append(dg.RunRequest(job_name=labels_job.name, run_key=f"labels@{next_cursor['labels']}"))
    return dg.SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[batch_partitions.build_add_request([b for b, _ in changed])] if changed else [],
        cursor=json.dumps(next_cursor),
    )
