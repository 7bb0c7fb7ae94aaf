"""One tick of the continuous-learning loop, as `flywheel run` performs it: ingest what landed,
transform, monitor, and retrain / evaluate / export / promote when the retraining policy says so."""

from dataclasses import dataclass, field
from typing import Callable

import dagster as dg

from orchestration.io_manager import stored_values
from orchestration.instance import fail_abandoned_runs, latest_materialization, process_tags
from orchestration.policy import RetrainingDecision, decide
from orchestration.resources import FlywheelHome
from orchestration.settings import run_config
from training.registry import Registry, RegistryError
from transforms.labels import label_files_signature
from transforms.landing import LandingFileError, batch_id_of, file_sha256, landed_files


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
    idle: str | None = None
    champion_before: str | None = None
    champion_after: str | None = None
    candidate: dict | None = None


def failure_message(result: dg.ExecuteInProcessResult) -> str:
    for event in result.all_events:
        if event.is_step_failure:
            data = event.step_failure_data
            if data.user_failure_data and data.user_failure_data.description:
                return data.user_failure_data.description
            if data.error is None:
                return "step failed"
            # The innermost cause is the user's problem; the outer layers are Dagster's wrappers.
            error = data.error
            while error.cause is not None:
                error = error.cause
            return error.message.strip()
    return "run failed"


def _last_metadata(instance: dg.DagsterInstance, asset: str, entry: str, partition: str | None = None):
    """A metadata value of the asset's latest materialization (of one partition), or None."""
    record = latest_materialization(instance, asset, partition)
    value = record.asset_materialization.metadata.get(entry) if record else None
    return value.value if value else None


def recover_abandoned_runs(instance: dg.DagsterInstance, registry: Registry, log: Callable[[str], None]) -> None:
    """Runs whose `flywheel run` process died: failed, pool slots freed, unpublished exports removed."""
    for run_id in fail_abandoned_runs(instance):
        registry.discard_staging(run_id)
        log(f"run {run_id} was left unfinished by a flywheel run that died: marked failed, its pool slots freed")


def run_tick(
    defs: dg.Definitions, instance: dg.DagsterInstance, flywheel: FlywheelHome,
    log: Callable[[str], None] = print, settings: dict[str, dict] | None = None,
) -> TickReport:
    """`settings`: per-op config (orchestration.settings), applied to every job of the tick that runs the op."""
    report = TickReport()
    tags = process_tags()

    def config(job: dg.JobDefinition) -> dict:
        return run_config(job, settings or {}, QUIET)

    registry = Registry(flywheel.registry)
    recover_abandoned_runs(instance, registry, log)
    champion = registry.champion()
    if champion is not None:
        try:
            champion.verify()
        except RegistryError as error:
            raise TickFailed(f"{error}. Nothing was changed; restore a good champion with `flywheel rollback --to VERSION`") from None
    report.champion_before = champion.version if champion else None

    for path in landed_files(flywheel.landing):
        try:
            report.landed.append(batch_id_of(path))
        except LandingFileError as error:
            report.failed[path.name] = str(error)
    if not report.landed and not flywheel.warehouse.exists():
        report.idle = f"nothing has landed in {flywheel.landing} yet: put batch files there (`flywheel simulate` writes some)"
        return report
    instance.add_dynamic_partitions("batches", report.landed)
    new = [
        b for b in report.landed
        if _last_metadata(instance, "raw_images", "file_sha256", b) != file_sha256(flywheel.landing_file(b))
    ]

    ingest = defs.resolve_job_def("ingest")
    for batch_id in new:
        log(f"ingesting batch {batch_id}")
        result = ingest.execute_in_process(
            instance=instance, partition_key=batch_id, raise_on_error=False, run_config=config(ingest), tags=tags
        )
        if result.success:
            report.ingested.append(batch_id)
        else:
            report.failed[batch_id] = failure_message(result)
            log(f"batch {batch_id} was not ingested: {report.failed[batch_id]}")
    labels_changed = label_files_signature(flywheel.labels) != (_last_metadata(instance, "raw_labels", "files_signature") or "")
    if labels_changed:
        log("loading late labels")
        job = defs.resolve_job_def("load_labels")
        result = job.execute_in_process(instance=instance, raise_on_error=False, run_config=config(job), tags=tags)
        if not result.success:
            raise TickFailed(f"loading labels failed (run {result.run_id}): {failure_message(result)}")
    if report.ingested or labels_changed:
        log("transforming with dbt")
        job = defs.resolve_job_def("transform")
        result = job.execute_in_process(instance=instance, raise_on_error=False, run_config=config(job), tags=tags)
        if not result.success:
            raise TickFailed(f"dbt build failed (run {result.run_id}): {failure_message(result)}")

    def monitor(batches: list[str]) -> None:
        job = defs.resolve_job_def("monitor")
        for batch_id in batches:
            result = job.execute_in_process(
                instance=instance, partition_key=batch_id, raise_on_error=False, run_config=config(job), tags=tags
            )
            if result.success:
                report.drift[batch_id] = result.output_for_node("drift_report")
            else:
                report.failed[batch_id] = failure_message(result)

    if champion is not None:
        monitor(report.ingested)
    # Every batch's latest report, not only this tick's: a drift that an earlier tick's retraining
    # failed to answer (killed, crashed) is answered now.
    report.decision = decide(champion.card() if champion else None, stored_values(flywheel, "drift_report"))
    if report.decision.retrain:
        log(f"retraining: {'; '.join(report.decision.reasons)}")
        job = defs.resolve_job_def("retrain")
        result = job.execute_in_process(
            instance=instance, raise_on_error=False, run_config=config(job),
            tags={**tags, "flywheel/reason": "; ".join(report.decision.reasons)},
        )
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
