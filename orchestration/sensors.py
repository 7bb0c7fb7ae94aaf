"""The landing sensor: a batch needs ingestion when the fingerprint of its file under the validation
rules (`transforms.landing.ingestion_fingerprint`, the one the ingestion asset stores) differs from
the fingerprint its latest `raw_images` materialization recorded; late labels need loading when the
label files' signature differs from the one `raw_labels` recorded. The decision reads the instance,
so the daemon and `flywheel run` (which evaluates this sensor) decide the same; the cursor only
caches each file's sha256 by its mtime and size, so an unchanged file is not hashed again."""

import json
import time

import dagster as dg

from orchestration.assets.ingestion import IngestConfig, ingestion_rules
from orchestration.automation import SENSOR_STATUS
from orchestration.instance import latest_materialization
from orchestration.jobs import ingest_job, labels_job
from orchestration.partitions import batch_partitions
from orchestration.resources import FlywheelHome
from orchestration.settings import run_settings
from transforms.labels import label_files_signature
from transforms.landing import LandingFileError, batch_id_of, file_sha256, ingestion_fingerprint, landed_files

# A file modified this recently may still be being copied in; it is picked up on a later tick.
SETTLE_SECONDS = 5.0


def recorded(instance: dg.DagsterInstance, asset: str, entry: str, partition: str | None = None):
    """A metadata value of the asset's latest materialization (of one partition), or None."""
    record = latest_materialization(instance, asset, partition)
    value = record.asset_materialization.metadata.get(entry) if record else None
    return value.value if value else None


def scan_landing(flywheel: FlywheelHome, cursor: dict, now: float) -> tuple[dict[str, str], list[str], dict]:
    """({batch id: sha256 of its settled file}, skipped files with the reason, the next cursor)."""
    files, skipped = {}, []
    hashes = dict(cursor.get("sha256", {}))
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
        signature = f"{stat.st_mtime_ns}:{stat.st_size}"
        if hashes.get(batch_id, [None])[0] != signature:
            hashes[batch_id] = [signature, file_sha256(path)]
        files[batch_id] = hashes[batch_id][1]
    return files, skipped, {"sha256": {b: hashes[b] for b in files}}


@dg.sensor(
    jobs=[ingest_job, labels_job],
    minimum_interval_seconds=30,
    default_status=SENSOR_STATUS,
    description="Registers each new or changed landing/<batch_id>.parquet as a partition and requests its "
    "ingestion; requests a label load when landing/labels/ changes.",
)
def landing_sensor(context: dg.SensorEvaluationContext, flywheel: FlywheelHome) -> dg.SensorResult:
    cursor = json.loads(context.cursor) if context.cursor else {}
    files, skipped, next_cursor = scan_landing(flywheel, cursor, time.time())
    for reason in skipped:
        context.log.info(reason)
    ingest_config = run_settings(flywheel, ingest_job.name)
    rules = ingestion_rules(flywheel, IngestConfig.model_validate(ingest_config.get("ops", {}).get("ingest_batch", {}).get("config", {})))
    run_requests = []
    for batch_id, sha256 in files.items():
        fingerprint = ingestion_fingerprint(sha256, rules)
        if recorded(context.instance, "raw_images", "ingestion_fingerprint", batch_id) != fingerprint:
            run_requests.append(dg.RunRequest(
                job_name=ingest_job.name, partition_key=batch_id, run_key=f"{batch_id}@{fingerprint[:16]}", run_config=ingest_config,
            ))
    # Also before any label file exists: the dbt models wait for raw_labels to exist.
    labels = label_files_signature(flywheel.labels, flywheel.project.classes)
    if recorded(context.instance, "raw_labels", "files_signature") != labels:
        run_requests.append(dg.RunRequest(job_name=labels_job.name, run_key=f"labels@{labels}", run_config=run_settings(flywheel, labels_job.name)))
    new_batches = [b for b in files if not context.instance.has_dynamic_partition("batches", b)]
    return dg.SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[batch_partitions.build_add_request(new_batches)] if new_batches else [],
        cursor=json.dumps(next_cursor),
    )
