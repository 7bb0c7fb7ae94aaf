"""The loop under the daemon (and under `flywheel run`, which evaluates these same sensors):
monitoring after ingestion, retraining on drift and on a schedule, and a record of failed runs.
Every retraining decision goes through `orchestration.policy`."""

import json
import os
from datetime import datetime, timezone

import dagster as dg

from orchestration.assets.transformation import dbt_models
from orchestration.instance import latest_materialization, latest_timestamp
from orchestration.io_manager import stored_values
from orchestration.jobs import freshness_job, monitor_job, retrain_job
from orchestration.metadata import code_version
from orchestration.policy import (
    MODE_TAG, REASON_TAG, RETRAINING_KEY_TAG, RetrainingDecision, RetrainingPolicy, decide, recall, retraining_active,
    retraining_key, training_mode,
)
from orchestration.resources import FlywheelHome
from orchestration.settings import run_settings
from training.registry import Registry

# Sensors and the schedule start running with the daemon unless FLYWHEEL_AUTOMATION=stopped (a UI
# demo or test that drives runs by hand); either way they can be switched in the UI.
AUTOMATION_RUNNING = os.environ.get("FLYWHEEL_AUTOMATION", "running") != "stopped"
SENSOR_STATUS = dg.DefaultSensorStatus.RUNNING if AUTOMATION_RUNNING else dg.DefaultSensorStatus.STOPPED
SCHEDULE_STATUS = dg.DefaultScheduleStatus.RUNNING if AUTOMATION_RUNNING else dg.DefaultScheduleStatus.STOPPED


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
    description="Requests a drift report for every batch ingested (and transformed by dbt) that the champion did "
    "not train on, whose latest report is older than its ingestion or its late labels, or was made against another champion.",
)
def monitoring_sensor(context: dg.SensorEvaluationContext, flywheel: FlywheelHome) -> dg.SensorResult | dg.SkipReason:
    champion = Registry(flywheel.registry).champion()
    if champion is None:
        return dg.SkipReason("no champion yet: drift is measured against the champion's training data")
    # A batch the champion trained on is part of its reference: a report would compare it with itself,
    # and the policy ignores it. Skipping them keeps a promotion's monitoring to the batches since the
    # champion's training, instead of the whole history.
    trained_on = set(champion.card().lineage.training_batches)
    transformed_at = latest_timestamp(context.instance, "batch_image_stats")
    # Late labels: a batch they label is reported again once dbt has taken them in, so its accuracy
    # estimated before labels meets the accuracy they show (and the policy sees the real accuracy).
    labels = latest_materialization(context.instance, "raw_labels")
    labels_at, late_labeled = 0.0, set()
    if labels and labels.timestamp <= transformed_at:
        labels_at = labels.timestamp
        late_labeled = set(labels.asset_materialization.metadata.get("labeled_batches", dg.MetadataValue.json([])).value)
    run_config = run_settings(flywheel, monitor_job.name)
    requests = []
    for batch_id in context.instance.get_dynamic_partitions("batches"):
        if batch_id in trained_on:
            continue
        ingested_at = latest_timestamp(context.instance, "raw_images", batch_id)
        if not 0 < ingested_at <= transformed_at:
            continue
        report = latest_materialization(context.instance, "drift_report", batch_id)
        against = report.asset_materialization.metadata.get("champion") if report else None
        relabeled = batch_id in late_labeled and report is not None and report.timestamp < labels_at
        if report is None or report.timestamp < ingested_at or against is None or against.value != champion.version or relabeled:
            requests.append(dg.RunRequest(
                partition_key=batch_id,
                run_key=f"monitor-{batch_id}-{ingested_at}-{champion.version}" + (f"-labels-{labels_at}" if relabeled else ""),
                run_config=run_config,
            ))
    return dg.SensorResult(run_requests=requests)


def latest_drift_reports(instance: dg.DagsterInstance, flywheel: FlywheelHome) -> list[dict]:
    """The stored report of each batch that is still a partition."""
    batches = set(instance.get_dynamic_partitions("batches"))
    return [r for r in stored_values(flywheel, "drift_report") if r["batch_id"] in batches]


def retraining_request(
    instance: dg.DagsterInstance, flywheel: FlywheelHome, policy: RetrainingPolicy, decision: RetrainingDecision,
    occasion: str = "",
) -> dg.RunRequest | str:
    """The retraining run the decision asks for, or why none is launched now (the loop's memory)."""
    champion = Registry(flywheel.registry).champion()
    data = latest_materialization(instance, "training_examples")
    mode, why = training_mode(champion.card() if champion else None, policy, code_version(), decision.scheduled)
    settings = run_settings(flywheel, retrain_job.name)
    ops = settings.get("ops", {})
    training = ops.get("trained_model", {}).get("config", {})
    run_config = {**settings, "ops": {**ops, "trained_model": {"config": {**training, "mode": mode}}}}
    key = retraining_key(
        champion.version if champion else None, str(data.storage_id) if data else "none", run_config, code_version(), occasion,
    )
    if retraining_active(instance, retrain_job.name):
        return "a retraining is already queued or running; what it does not answer is answered after it"
    memory = recall(instance, key, policy.max_attempts)
    if not memory.launch:
        return memory.reason
    reason = f"{'; '.join(decision.reasons)}. {mode.capitalize()} retraining: {why}"
    return dg.RunRequest(
        run_key=f"retrain-{key}-{memory.attempt}", run_config=run_config,
        tags={RETRAINING_KEY_TAG: key, REASON_TAG: reason[:1000], MODE_TAG: mode, "flywheel/attempt": str(memory.attempt)},
    )


@dg.sensor(
    job=retrain_job,
    minimum_interval_seconds=30,
    default_status=SENSOR_STATUS,
    description="Applies the retraining policy to the latest drift report of every batch (and to having no "
    "champion) and requests a retraining when it says so, unless the same retraining already ran or is running.",
)
def drift_sensor(context: dg.SensorEvaluationContext, flywheel: FlywheelHome) -> dg.SensorResult | dg.SkipReason:
    champion = Registry(flywheel.registry).champion()
    has_data = latest_materialization(context.instance, "training_examples") is not None
    if champion is None and not has_data:
        return dg.SkipReason("no champion and no transformed data yet")
    reports = latest_drift_reports(context.instance, flywheel)
    retraining_policy = flywheel.project.retraining
    decision = decide(champion.card() if champion else None, reports, retraining_policy)
    if not decision.retrain:
        return dg.SkipReason(f"no retraining needed ({len(reports)} drift report(s) against {champion.version})")
    request = retraining_request(context.instance, flywheel, retraining_policy, decision)
    if isinstance(request, str):
        return dg.SkipReason(f"retraining wanted ({'; '.join(decision.reasons)}), not launched: {request}")
    context.log.info(f"requesting a retraining: {request.tags[REASON_TAG]}")
    return dg.SensorResult(run_requests=[request])


@dg.schedule(
    job=retrain_job,
    # Read when the code location loads: after editing it, reload the location (or restart the daemon).
    cron_schedule=FlywheelHome().project.retraining.schedule,
    execution_timezone="UTC",
    default_status=SCHEDULE_STATUS,
    description="Retrains on all labeled data on a fixed cadence: `retraining.schedule` in flywheel.yaml, weekly by default.",
)
def retraining_schedule(context: dg.ScheduleEvaluationContext, flywheel: FlywheelHome):
    retraining_policy = flywheel.project.retraining
    champion = Registry(flywheel.registry).champion()
    decision = decide(champion.card() if champion else None, [], retraining_policy, schedule_due=True)
    occasion = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else ""
    request = retraining_request(context.instance, flywheel, retraining_policy, decision, occasion)
    return dg.SkipReason(request) if isinstance(request, str) else request


@dg.schedule(
    job=freshness_job,
    cron_schedule=FlywheelHome().project.retraining.freshness_schedule,
    execution_timezone="UTC",
    default_status=SCHEDULE_STATUS,
    description="Runs the champion's freshness checks (`retraining.freshness_schedule`, hourly by default; limits: "
    "champion_max_age_hours and labeled_batch_max_wait_hours); a failure is a warning and a line in monitoring/freshness_alerts.jsonl.",
)
def freshness_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    return dg.RunRequest()


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
