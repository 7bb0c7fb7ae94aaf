"""One tick of the continuous-learning loop, as `flywheel run` performs it: the daemon's own sensors,
evaluated and executed in this process, so the tick and the daemon always decide the same: ingest
what landed, transform, monitor, and retrain / evaluate / export / promote when the retraining
policy and the loop's memory (orchestration.policy) say so."""

import time
from dataclasses import dataclass, field
from typing import Callable

import dagster as dg

from orchestration.automation import drift_sensor, monitoring_sensor
from orchestration.instance import fail_abandoned_runs, latest_timestamp, process_tags
from orchestration.policy import ACTIVE, GATE_CHECKS, REASON_TAG, RetrainingDecision
from orchestration.resources import FlywheelHome
from orchestration.sensors import SETTLE_SECONDS, landing_sensor
from training.registry import Registry, RegistryError
from transforms.landing import LandingFileError, batch_id_of, landed_files


# The tags the daemon puts on a sensor's runs; Dagster runs a run key of a sensor only once.
RUN_KEY_TAG, SENSOR_NAME_TAG = "dagster/run_key", "dagster/sensor_name"
# How long a tick waits for a run someone else launched for a request of its own.
WAIT_FOR_OTHERS_SECONDS = 900
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
    drift_after: dict[str, dict] = field(default_factory=dict)  # against a champion this tick promoted
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


def recover_abandoned_runs(instance: dg.DagsterInstance, registry: Registry, log: Callable[[str], None]) -> None:
    """Runs whose `flywheel run` process died: failed, pool slots freed, unpublished exports removed."""
    for run_id in fail_abandoned_runs(instance):
        registry.discard_staging(run_id)
        log(f"run {run_id} was left unfinished by a flywheel run that died: marked failed, its pool slots freed")


class SensorDriver:
    """Evaluates the daemon's sensors in this process and executes their run requests here, with the
    tags the daemon would give them (sensor name, run key): a request whose run key already ran, from
    the daemon or a tick, is not run again, exactly as the daemon would not. The sensors' cursors are
    kept in the instance."""

    def __init__(self, defs: dg.Definitions, instance: dg.DagsterInstance, resources: dict, tags: dict, logging_config: dict):
        self.defs, self.instance, self.resources = defs, instance, resources
        self.tags, self.logging_config = tags, logging_config

    def evaluate(self, sensor: dg.SensorDefinition) -> tuple[list[dg.RunRequest], str | None]:
        """(run requests, skip reason) of one evaluation; partitions it adds are added."""
        cursor_key = f"flywheel/cursor/{sensor.name}"
        cursor = self.instance.run_storage.get_cursor_values({cursor_key}).get(cursor_key)
        with dg.build_sensor_context(instance=self.instance, cursor=cursor, resources=self.resources, sensor_name=sensor.name) as context:
            result = sensor(context)
        if isinstance(result, dg.SkipReason):
            return [], result.skip_message
        if result.cursor is not None:
            self.instance.run_storage.set_cursor_values({cursor_key: result.cursor})
        for request in result.dynamic_partitions_requests or []:
            self.instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        return list(result.run_requests or []), result.skip_reason.skip_message if result.skip_reason else None

    def earlier_run(self, sensor: dg.SensorDefinition, request: dg.RunRequest) -> dg.DagsterRun | None:
        records = self.instance.get_run_records(
            dg.RunsFilter(tags={RUN_KEY_TAG: request.run_key, SENSOR_NAME_TAG: sensor.name}), limit=1
        ) if request.run_key else []
        return records[0].dagster_run if records else None

    def wait_for(self, run: dg.DagsterRun, log: Callable[[str], None]) -> dg.DagsterRun:
        """The run, once it is no longer queued or running (at most WAIT_FOR_OTHERS_SECONDS)."""
        deadline = time.monotonic() + WAIT_FOR_OTHERS_SECONDS
        if run.status in ACTIVE:
            log(f"waiting for run {run.run_id} ({run.job_name}), launched for the same request, to finish")
        while run.status in ACTIVE and time.monotonic() < deadline:
            time.sleep(1)
            run = self.instance.get_run_by_id(run.run_id)
        return run

    def launch(self, sensor: dg.SensorDefinition, request: dg.RunRequest) -> dg.ExecuteInProcessResult:
        job = self.defs.resolve_job_def(request.job_name or sensor.job_name)
        run_config = {**self.logging_config, **(request.run_config or {})}
        tags = {**request.tags, **self.tags, SENSOR_NAME_TAG: sensor.name}
        if request.run_key:
            tags[RUN_KEY_TAG] = request.run_key
        return job.execute_in_process(
            instance=self.instance, partition_key=request.partition_key, run_config=run_config, tags=tags, raise_on_error=False,
        )


def transform_needed(instance: dg.DagsterInstance) -> bool:
    """The dbt models' eager condition: ingestion or a label load landed since dbt last built them."""
    upstream = max(latest_timestamp(instance, "raw_images"), latest_timestamp(instance, "raw_labels"))
    return upstream > min(latest_timestamp(instance, "training_examples"), latest_timestamp(instance, "batch_image_stats"))


def run_tick(
    defs: dg.Definitions, instance: dg.DagsterInstance, flywheel: FlywheelHome, log: Callable[[str], None] = print,
) -> TickReport:
    """One tick: the landing, monitoring and drift sensors the daemon runs, evaluated and executed here
    in order, with dbt run when ingestion or labels landed since its last build, as the models' eager
    condition runs it under the daemon.
    `flywheel.settings` is the run settings file the sensors put on their requests."""
    report = TickReport()
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

    youngest = max((path.stat().st_mtime for path in landed_files(flywheel.landing)), default=0.0)
    if time.time() - youngest < SETTLE_SECONDS:
        # The landing sensor leaves files this young for a later tick (they may still be copied in).
        log(f"waiting {SETTLE_SECONDS:.0f} s for files that just landed to settle")
        time.sleep(SETTLE_SECONDS - (time.time() - youngest) + 0.1)
    resources = {**defs.resources, "flywheel": flywheel}
    driver = SensorDriver(defs, instance, resources, process_tags(), QUIET)

    requests, _ = driver.evaluate(landing_sensor)
    for request in requests:
        batch_id = request.partition_key
        earlier = driver.earlier_run(landing_sensor, request)
        if earlier is not None:
            # The daemon (or another tick) launched this very request: its outcome is this tick's.
            earlier = driver.wait_for(earlier, log)
            if earlier.status != dg.DagsterRunStatus.SUCCESS:
                what = f"batch {batch_id}" if batch_id else "late labels"
                report.failed[batch_id or "labels"] = (
                    f"{what}: run {earlier.run_id} for these same bytes ended {earlier.status.value}; replace the file to try again"
                )
            continue
        log(f"ingesting batch {batch_id}" if batch_id else "loading late labels")
        result = driver.launch(landing_sensor, request)
        if result.success and batch_id:
            report.ingested.append(batch_id)
        elif batch_id:
            report.failed[batch_id] = failure_message(result)
            log(f"batch {batch_id} was not ingested: {report.failed[batch_id]}")
        elif not result.success:
            raise TickFailed(f"loading labels failed (run {result.run_id}): {failure_message(result)}")
    if transform_needed(instance):
        log("transforming with dbt")
        job = defs.resolve_job_def("transform")
        result = job.execute_in_process(instance=instance, raise_on_error=False, run_config=QUIET, tags=process_tags())
        if not result.success:
            raise TickFailed(f"dbt build failed (run {result.run_id}): {failure_message(result)}")

    def monitor(reports: dict[str, dict]) -> None:
        requests, _ = driver.evaluate(monitoring_sensor)
        for request in requests:
            if driver.earlier_run(monitoring_sensor, request) is not None:
                continue
            result = driver.launch(monitoring_sensor, request)
            if result.success:
                reports[request.partition_key] = result.output_for_node("drift_report")
            else:
                report.failed[request.partition_key] = failure_message(result)

    monitor(report.drift)
    requests, waiting = driver.evaluate(drift_sensor)
    if not requests:
        report.decision = RetrainingDecision(False, [waiting] if waiting else [])
    for request in requests:
        report.decision = RetrainingDecision(True, [request.tags[REASON_TAG]])
        log(f"retraining: {request.tags[REASON_TAG]}")
        result = driver.launch(drift_sensor, request)
        # The gates only: the champion's freshness checks run in the same job and are reported by `flywheel status`.
        failed_gates = [c.check_name for c in result.get_asset_check_evaluations() if c.check_name in GATE_CHECKS and not c.passed]
        if not result.success and not failed_gates:
            raise TickFailed(f"retraining failed (run {result.run_id}): {failure_message(result)}")
        report.candidate = {"evaluation": result.output_for_node("model_evaluation"), "failed_gates": failed_gates}
        if "evaluation_gate" not in failed_gates:
            report.candidate["export"] = result.output_for_node("exported_model")
        # The new champion's view of the batches it did not train on: the drift history follows the champion.
        monitor(report.drift_after)
    after = registry.champion()
    report.champion_after = after.version if after else None
    return report
