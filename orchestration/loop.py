"""One tick of the continuous-learning loop, as `flywheel run` performs it: ingest what landed,
transform, monitor, and retrain / evaluate / export / promote when the retraining policy says so."""

from dataclasses import dataclass, field
from typing import Callable

import dagster as dg

from orchestration.instance import latest_materialization
from orchestration.policy import RetrainingDecision, decide
from orchestration.resources import FlywheelHome
from training.registry import Registry
from transforms.labels import label_files_signature
from transforms.landing import LandingFileError, batch_id_of, file_sha256


# Dagster's console logger at INFO: the assets' own messages, without per-event debug lines.
QUIET = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


class TickFailed(Exception):
    """A stage of the tick failed; the message says which and why, and the run is in the Dagster UI."""


@dataclass
class TickReport:
    landed: list[str] = field(default_factory=list)
    ingested: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    drift: dict[str, dict] = field(default_factory=dict)
    decision: RetrainingDecision | None = None
    champion_before: str | None = None
    champion_after: str | None = None
    candidate: dict | None = None


def failure_message(result: dg.ExecuteInProcessResult) -> str:
    for event in result.all_events:
        if event.is_step_failure:
            data = event.step_failure_data
            if data.user_failure_data and data.user_failure_data.description:
                return data.user_failure_data.description
            return data.error.message.strip() if data.error else "step failed"
    return "run failed"


def _last_metadata(instance: dg.DagsterInstance, asset: str, entry: str, partition: str | None = None):
    """A metadata value of the asset's latest materialization (of one partition), or None."""
    record = latest_materialization(instance, asset, partition)
    value = record.asset_materialization.metadata.get(entry) if record else None
    return value.value if value else None


def run_tick(
    defs: dg.Definitions, instance: dg.DagsterInstance, flywheel: FlywheelHome, log: Callable[[str], None] = print
) -> TickReport:
    report = TickReport()
    registry = Registry(flywheel.registry)
    champion = registry.champion()
    report.champion_before = champion.version if champion else None

    for path in sorted(flywheel.landing.glob("*.parquet")):
        try:
            report.landed.append(batch_id_of(path))
        except LandingFileError as error:
            report.failed[path.name] = str(error)
    instance.add_dynamic_partitions("batches", report.landed)
    new = [
        b for b in report.landed
        if _last_metadata(instance, "raw_images", "file_sha256", b) != file_sha256(flywheel.landing_file(b))
    ]

    ingest = defs.resolve_job_def("ingest")
    for batch_id in new:
        log(f"ingesting batch {batch_id}")
        result = ingest.execute_in_process(instance=instance, partition_key=batch_id, raise_on_error=False, run_config=QUIET)
        if result.success:
            report.ingested.append(batch_id)
        else:
            report.failed[batch_id] = failure_message(result)
            log(f"batch {batch_id} was not ingested: {report.failed[batch_id]}")
    labels_changed = label_files_signature(flywheel.labels) != (_last_metadata(instance, "raw_labels", "files_signature") or "")
    if labels_changed:
        log("loading late labels")
        result = defs.resolve_job_def("load_labels").execute_in_process(instance=instance, raise_on_error=False, run_config=QUIET)
        if not result.success:
            raise TickFailed(f"loading labels failed (run {result.run_id}): {failure_message(result)}")
    if report.ingested or labels_changed:
        log("transforming with dbt")
        result = defs.resolve_job_def("transform").execute_in_process(instance=instance, raise_on_error=False, run_config=QUIET)
        if not result.success:
            raise TickFailed(f"dbt build failed (run {result.run_id}): {failure_message(result)}")

    def monitor(batches: list[str]) -> None:
        job = defs.resolve_job_def("monitor")
        for batch_id in batches:
            result = job.execute_in_process(instance=instance, partition_key=batch_id, raise_on_error=False, run_config=QUIET)
            if result.success:
                report.drift[batch_id] = result.output_for_node("drift_report")
            else:
                report.failed[batch_id] = failure_message(result)

    if champion is not None:
        monitor(report.ingested)
    report.decision = decide(champion.card() if champion else None, list(report.drift.values()))
    if report.decision.retrain:
        log(f"retraining: {'; '.join(report.decision.reasons)}")
        result = defs.resolve_job_def("retrain").execute_in_process(instance=instance, raise_on_error=False, run_config=QUIET)
        failed_gates = [c.check_name for c in result.get_asset_check_evaluations() if not c.passed]
        if not result.success and not failed_gates:
            raise TickFailed(f"retraining failed (run {result.run_id}): {failure_message(result)}")
        report.candidate = {"evaluation": result.output_for_node("model_evaluation"), "failed_gates": failed_gates}
        if "evaluation_gate" not in failed_gates:
            report.candidate["export"] = result.output_for_node("exported_model")
        if champion is None:
            # The first champion's view of every batch there is, so the drift history starts complete.
            monitor([b for b in report.landed if b not in report.failed])
    after = registry.champion()
    report.champion_after = after.version if after else None
    return report
