"""The loop's memory and its one decision path, on real runs: a retraining whose candidate failed its
gate is not repeated until something changes (new data, new labels); a first model that failed is
retried once new data lands; the daemon's sensors and `flywheel run` decide the same; a drift
reported while a retraining runs is answered after it."""

import json
import os
import re
import time
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import yaml

from orchestration.automation import drift_sensor, monitoring_sensor
from orchestration.definitions import defs
from orchestration.instance import get_instance
from flywheel.loop import run_tick
from orchestration.policy import REASON_TAG
from orchestration.resources import FlywheelHome
from orchestration.sensors import landing_sensor
from tests.conftest import model_card, write_servable_files
from training.registry import Registry
from transforms.simulate import SimulationSpec, simulate_batches

pytestmark = pytest.mark.e2e

# A first model this weak never reaches the 0.9 floor: every retraining ends in a gate verdict.
WEAK_TRAINING = {"trained_model": {"epochs": 1, "width": 4, "learning_rate": 1e-4, "batch_size": 32}}


def land(home: Path, prefix: str, offset: int) -> None:
    simulate_batches(home / "landing", SimulationSpec(batches=1, batch_size=100, prefix=prefix, offset=offset))
    for path in (home / "landing").glob("*.parquet"):
        os.utime(path, (time.time() - 60, time.time() - 60))  # settled


class Daemon:
    """What the daemon does with the sensors, in this process: evaluate each with its own cursor,
    add the partitions it asks for, launch each run key once, and let dbt's eager condition run the
    transform after new ingestion or labels."""

    def __init__(self, home: Path):
        self.instance = dg.DagsterInstance.ephemeral()
        self.cursors: dict[str, str | None] = {}
        self.launched: set[str] = set()
        self.resources = {"flywheel": FlywheelHome(home=str(home))}

    def evaluate(self, sensor) -> tuple[list[dg.RunRequest], str | None]:
        with dg.build_sensor_context(instance=self.instance, cursor=self.cursors.get(sensor.name), resources=self.resources) as context:
            result = sensor(context)
        if isinstance(result, dg.SkipReason):
            return [], result.skip_message
        self.cursors[sensor.name] = result.cursor
        for request in result.dynamic_partitions_requests or []:
            self.instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        return [r for r in result.run_requests or [] if r.run_key not in self.launched], None

    def run(self, sensor, request: dg.RunRequest) -> dg.ExecuteInProcessResult:
        self.launched.add(request.run_key)
        job = defs.resolve_job_def(request.job_name or sensor.job_name)
        return job.execute_in_process(
            instance=self.instance, partition_key=request.partition_key, run_config=request.run_config,
            tags=request.tags, raise_on_error=False,
        )

    def tick(self) -> str:
        """One pass over the sensors; returns the retraining decision as the tick reports it."""
        ingested = [self.run(landing_sensor, r).success for r in self.evaluate(landing_sensor)[0]]
        if any(ingested):
            assert defs.resolve_job_def("transform").execute_in_process(instance=self.instance).success
        for request in self.evaluate(monitoring_sensor)[0]:
            assert self.run(monitoring_sensor, request).success
        requests, skipped = self.evaluate(drift_sensor)
        for request in requests:
            self.run(drift_sensor, request)
            return f"yes: {request.tags[REASON_TAG]}"
        return f"no: {skipped}"


def cli_tick(home: Path) -> str:
    report = run_tick(defs, get_instance(home), FlywheelHome(home=str(home)), log=lambda _: None)
    assert not report.failed, report.failed
    decision = report.decision
    return f"yes: {decision.reasons[0]}" if decision.retrain else f"no: {decision.reasons[0]}"


def history(home: Path, tick) -> list[str]:
    """A first model that fails its gate, a tick with nothing new, then a new batch."""
    (home / "flywheel.yaml").write_text(yaml.safe_dump(WEAK_TRAINING))
    decisions = []
    land(home, "first", 0)
    decisions.append(tick())
    decisions.append(tick())
    land(home, "second", 100)
    decisions.append(tick())
    return decisions


def same_run(decision: str) -> str:
    """The decision without the run ids, which differ between the two instances."""
    return re.sub(r"run [0-9a-f]{8}", "run <id>", decision)


# Why, and in which mode: a first model is a full training.
FIRST_MODEL = "yes: there is no champion yet. Full retraining: there is no champion to fine-tune"


def check_history(decisions: list[str]) -> None:
    first, unchanged, new_data = decisions
    assert first == FIRST_MODEL, decisions
    assert unchanged.startswith("no: retraining wanted (there is no champion yet), not launched: this retraining already ran")
    assert "failed the evaluation_gate: waiting for new data, labels, settings or code" in unchanged, decisions
    assert new_data == FIRST_MODEL, decisions  # retried: the data changed


def test_the_daemons_sensors_and_flywheel_run_decide_the_same_and_remember_gate_failures(tmp_path: Path, monkeypatch):
    daemon_home, cli_home = tmp_path / "daemon", tmp_path / "cli"
    for home in (daemon_home, cli_home):
        home.mkdir()

    monkeypatch.setenv("FLYWHEEL_HOME", str(daemon_home))
    daemon = Daemon(daemon_home)
    through_sensors = history(daemon_home, daemon.tick)

    monkeypatch.setenv("FLYWHEEL_HOME", str(cli_home))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    through_cli = history(cli_home, lambda: cli_tick(cli_home))

    check_history(through_sensors)
    assert [same_run(d) for d in through_cli] == [same_run(d) for d in through_sensors]
    assert Registry(cli_home / "registry").champion() is None

    # New labels for images already landed: the training data changed, so the failed retraining is tried again.
    labels = cli_home / "landing" / "labels"
    labels.mkdir()
    first = pl.read_parquet(cli_home / "landing" / "first-000.parquet")
    pl.DataFrame({"image_id": first["image_id"][:10], "label": (first["label"][:10] + 1) % 10}).write_parquet(labels / "fix.parquet")
    assert cli_tick(cli_home) == FIRST_MODEL
    assert cli_tick(cli_home).startswith("no: ")


def champion_with_drift_report(home: Path, instance: dg.DagsterInstance) -> None:
    """A served champion (tiny real ONNX files), a batch it never trained on, and that batch's drift report."""
    registry = Registry(home / "registry")
    staging = registry.staging_dir("test")
    write_servable_files(staging)
    registry.promote(registry.publish(staging, model_card(training_batches=("old",), test_accuracy=0.98)).version, reason="test")
    instance.add_dynamic_partitions("batches", ["new"])
    folder = home / "values" / "drift_report"
    folder.mkdir(parents=True)
    report = {
        "batch_id": "new", "champion": "v0001", "drifted": True, "drifted_share": 0.6,
        "embedding": {"p_value": 0.001}, "champion_accuracy": None,
    }
    (folder / "new.json").write_text(json.dumps(report))
    instance.report_runless_asset_event(dg.AssetMaterialization("training_examples"))


def test_a_drift_reported_while_a_retraining_runs_is_answered_after_it(home: Path):
    instance = dg.DagsterInstance.ephemeral()
    champion_with_drift_report(home, instance)
    resources = {"flywheel": FlywheelHome(home=str(home))}

    def evaluate():
        with dg.build_sensor_context(instance=instance, resources=resources) as context:
            return drift_sensor(context)

    retrain_job = defs.resolve_job_def("retrain")
    running = instance.create_run_for_job(retrain_job, status=dg.DagsterRunStatus.STARTED)
    waiting = evaluate()
    assert isinstance(waiting, dg.SkipReason) and "already queued or running" in waiting.skip_message
    assert "batch new drifted" in waiting.skip_message

    instance.report_run_failed(running)  # the retraining that was running ends (here: without answering it)
    answered = evaluate()
    assert len(answered.run_requests) == 1
    assert "batch new drifted" in answered.run_requests[0].tags[REASON_TAG]


def test_monitoring_reports_only_the_batches_the_champion_did_not_train_on(home: Path):
    """A promotion re-reports the batches since the champion's training, not the whole history."""
    instance = dg.DagsterInstance.ephemeral()
    champion_with_drift_report(home, instance)  # trained on "old"; "new" has no report in the instance
    instance.add_dynamic_partitions("batches", ["old"])
    for batch in ("old", "new"):
        instance.report_runless_asset_event(dg.AssetMaterialization("raw_images", partition=batch))
    instance.report_runless_asset_event(dg.AssetMaterialization("batch_image_stats"))
    with dg.build_sensor_context(instance=instance, resources={"flywheel": FlywheelHome(home=str(home))}) as context:
        result = monitoring_sensor(context)
    assert [request.partition_key for request in result.run_requests] == ["new"]
