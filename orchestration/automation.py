"""The loop under the daemon: monitoring after ingestion, retraining on drift, on a schedule, and a
record of failed runs. Every retraining decision goes through `orchestration.policy.decide`."""

import json
import os
from datetime import datetime, timezone

import dagster as dg

from orchestration.assets.transformation import dbt_models
from orchestration.instance import latest_materialization
from orchestration.io_manager import stored_values
from orchestration.jobs import monitor_job, retrain_job
from orchestration.policy import decide
from orchestration.resources import FlywheelHome
from training.registry import Registry

ACTIVE = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]
# When the scheduled retraining runs; cron, overridable per deployment.
RETRAIN_CRON = os.environ.get("FLYWHEEL_RETRAIN_CRON", "0 3 * * 1")
# Sensors and the schedule start running with the daemon unless FLYWHEEL_AUTOMATION=stopped (a UI
# demo or test that drives runs by hand); either way they can be switched in the UI.
AUTOMATION_RUNNING = os.environ.get("FLYWHEEL_AUTOMATION", "running") != "stopped"
SENSOR_STATUS = dg.DefaultSensorStatus.RUNNING if AUTOMATION_RUNNING else dg.DefaultSensorStatus.STOPPED
SCHEDULE_STATUS = dg.DefaultScheduleStatus.RUNNING if AUTOMATION_RUNNING else dg.DefaultScheduleStatus.STOPPED


def retraining_active(instance: dg.DagsterInstance) -> bool:
    """A retraining queued or running: never queue a second one."""
    return bool(instance.get_run_records(dg.RunsFilter(job_name=retrain_job.name, statuses=ACTIVE), limit=1))


def _latest_timestamp(instance: dg.DagsterInstance, asset: str, partition: str | None = None) -> float:
    record = latest_materialization(instance, asset, partition)
    return record.timestamp if record else 0.0


# Evaluates the dbt models' eager automation conditions: they rebuild once ingestion has landed rows.
transform_on_ingestion = dg.AutomationConditionSensorDefinition(
    "transform_on_ingestion",
    target=dg.AssetSelection.assets(dbt_models),
    default_status=SENSOR_STATUS,
    minimum_interval_seconds=30,
    description="Runs dbt (the transform step) after ingestion or a label load, through the models' eager conditions.",
)


@dg.sensor(
    job=monitor_job,
    minimum_interval_seconds=30,
    default_status=SENSOR_STATUS,
    description="Requests a drift report for every batch ingested (and transformed by dbt) since its last report.",
)
def monitoring_sensor(context: dg.SensorEvaluationContext, flywheel: FlywheelHome) -> dg.SensorResult | dg.SkipReason:
    if Registry(flywheel.registry).champion() is None:
        return dg.SkipReason("no champion yet: drift is measured against the champion's training data")
    transformed_at = _latest_timestamp(context.instance, "batch_image_stats")
    requests = []
    for batch_id in context.instance.get_dynamic_partitions("batches"):
        ingested_at = _latest_timestamp(context.instance, "raw_images", batch_id)
        if 0 < ingested_at <= transformed_at and _latest_timestamp(context.instance, "drift_report", batch_id) < ingested_at:
            requests.append(dg.RunRequest(partition_key=batch_id, run_key=f"monitor-{batch_id}-{ingested_at}"))
    return dg.SensorResult(run_requests=requests)


@dg.sensor(
    job=retrain_job,
    minimum_interval_seconds=30,
    default_status=SENSOR_STATUS,
    description="Applies the retraining policy to new drift reports (and to having no champion) and requests a "
    "retraining when it says so, unless one is already queued or running.",
)
def drift_sensor(context: dg.SensorEvaluationContext, flywheel: FlywheelHome) -> dg.SensorResult | dg.SkipReason:
    after = int(context.cursor) if context.cursor else 0
    new = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("drift_report"), after_storage_id=after), limit=1000, ascending=True
    ).records
    cursor = str(max([after] + [r.storage_id for r in new]))
    champion = Registry(flywheel.registry).champion()
    new_batches = {r.partition_key for r in new}
    reports = [r for r in stored_values(flywheel, "drift_report") if r["batch_id"] in new_batches]
    has_data = bool(context.instance.get_dynamic_partitions("batches")) and _latest_timestamp(context.instance, "training_examples") > 0
    if champion is None and not has_data:
        return dg.SkipReason("no champion and no transformed data yet")
    decision = decide(champion.card() if champion else None, reports)
    if not decision.retrain:
        return dg.SensorResult(skip_reason=f"no retraining needed ({len(reports)} new drift report(s))", cursor=cursor)
    if retraining_active(context.instance):
        return dg.SensorResult(skip_reason="a retraining is already queued or running", cursor=cursor)
    reason = "; ".join(decision.reasons)
    context.log.info(f"requesting a retraining: {reason}")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"retrain-{cursor}-{champion.version if champion else 'none'}", tags={"flywheel/reason": reason[:1000]})],
        cursor=cursor,
    )


@dg.schedule(
    job=retrain_job,
    cron_schedule=RETRAIN_CRON,
    default_status=SCHEDULE_STATUS,
    description="Retrains on all labeled data on a fixed cadence (weekly by default; FLYWHEEL_RETRAIN_CRON).",
)
def retraining_schedule(context: dg.ScheduleEvaluationContext, flywheel: FlywheelHome):
    champion = Registry(flywheel.registry).champion()
    decision = decide(champion.card() if champion else None, [], schedule_due=True)
    if retraining_active(context.instance):
        return dg.SkipReason("a retraining is already queued or running")
    return dg.RunRequest(tags={"flywheel/reason": "; ".join(decision.reasons)})


@dg.run_failure_sensor(
    default_status=SENSOR_STATUS,
    description="Appends every failed run to $FLYWHEEL_HOME/monitoring/run_failures.jsonl.",
)
def run_failure_recorder(context: dg.RunFailureSensorContext, flywheel: FlywheelHome) -> None:
    path = flywheel.root / "monitoring" / "run_failures.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "at": datetime.now(timezone.utc).isoformat(),
        "run_id": context.dagster_run.run_id,
        "job": context.dagster_run.job_name,
        "partition": context.dagster_run.tags.get("dagster/partition"),
        "message": context.failure_event.message,
    }
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    context.log.warning(f"run {record['run_id']} of {record['job']} failed: {record['message']}")
