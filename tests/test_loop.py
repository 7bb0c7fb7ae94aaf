"""The continuous-learning loop end to end, driven by the sensors (Dagster's sensor test utilities
on a real instance): clean batches -> v1; a clean unlabeled batch -> no retraining, its accuracy
estimated before labels and checked when they land late; a drifted labeled batch -> drift detected
-> retraining -> v2 passes the gate and beats v1 on held-out drifted images."""

import json
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import polars as pl
import pytest
import yaml

from orchestration.automation import drift_sensor, monitoring_sensor
from orchestration.definitions import defs
from flywheel.cli import main
from flywheel.summary import print_status
from orchestration.sensors import landing_sensor
from tests.conftest import ADMIT_FIRST_MODEL, FAST_TRAINING
from training.inference import onnx_session, predict_onnx
from training.registry import Registry
from transforms.images import decode_image
from transforms.simulate import SimulationSpec, simulate_batches

pytestmark = pytest.mark.e2e



class Loop:
    def __init__(self, home: Path):
        self.home = home
        self.instance = dg.DagsterInstance.ephemeral()
        self.cursors: dict[str, str | None] = {}
        self.flywheel = defs.resources["flywheel"]
        # The sensors put these settings on the runs they request; the gate keeps its defaults but the first model's floor.
        # The drifted batch's retraining fine-tunes on 735 rows per epoch (175 new ones twice, all 385 of the
        # history replayed) against a full retraining's 560: with as many epochs it would cost more, and be full.
        (home / "flywheel.yaml").write_text(yaml.safe_dump({
            "trained_model": {**FAST_TRAINING, "incremental_epochs": 6}, "model_evaluation": ADMIT_FIRST_MODEL, "labeling_queue": {"budget": 40},
        }))

    def tick(self, sensor) -> list[dg.RunRequest]:
        with dg.build_sensor_context(instance=self.instance, cursor=self.cursors.get(sensor.name), resources={"flywheel": self.flywheel}) as context:
            result = sensor(context)
        if isinstance(result, dg.SkipReason):
            return []
        self.cursors[sensor.name] = result.cursor
        for request in result.dynamic_partitions_requests or []:
            self.instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        return list(result.run_requests or [])

    def execute(self, requests: list[dg.RunRequest], default_job: str) -> None:
        for request in requests:
            job = defs.resolve_job_def(request.job_name or default_job)
            result = job.execute_in_process(
                instance=self.instance, partition_key=request.partition_key, tags=request.tags,
                run_config=request.run_config, raise_on_error=False,
            )
            assert result.success, f"{job.name} failed"

    def land_and_process(self) -> list[str]:
        """Landing sensor -> ingestion -> dbt (the daemon's eager automation) -> monitoring sensor -> reports."""
        requests = self.tick(landing_sensor)
        self.execute(requests, "ingest")
        self.execute([dg.RunRequest()], "transform")
        monitors = self.tick(monitoring_sensor)
        self.execute(monitors, "monitor")
        return [r.partition_key for r in requests if r.job_name == "ingest"]


def held_out_drifted(home: Path) -> tuple[np.ndarray, np.ndarray]:
    (path,), _ = simulate_batches(home / "held_out", SimulationSpec(batches=1, pool="holdout", offset=250, drift="invert", prefix="eval"))
    frame = pl.read_parquet(path)
    images = np.stack([np.asarray(decode_image(b, 10**6).pixels) for b in frame["image"]])
    return images, frame["label"].to_numpy()


def age(paths: list[Path]) -> None:
    import os
    import time

    for path in paths:
        os.utime(path, (time.time() - 60, time.time() - 60))  # settled files, as the sensor expects


def test_the_loop_retrains_on_drift_and_not_on_clean_data(home: Path, capsys):
    loop = Loop(home)
    registry = Registry(home / "registry")

    landed, _ = simulate_batches(home / "landing", SimulationSpec(batches=2, batch_size=200, seed=1))
    age(landed)
    assert sorted(loop.land_and_process()) == ["digits-000", "digits-001"]
    assert loop.tick(monitoring_sensor) == []  # no champion: nothing to monitor against
    first = loop.tick(drift_sensor)
    assert len(first) == 1 and "no champion" in first[0].tags["flywheel/reason"]
    loop.execute(first, "retrain")
    assert registry.champion().version == "v0001"

    # The first champion trained on both batches: they are its reference, nothing to report or retrain.
    assert loop.tick(monitoring_sensor) == []
    assert loop.tick(drift_sensor) == []

    # The served model's temperature, fitted on the validation split, is in the card.
    calibration = registry.champion().card().calibration
    assert calibration is not None and 0.05 < calibration.temperature < 20 and calibration.ece_after <= calibration.ece_before + 0.01

    # A clean batch the champion has never seen, landed unlabeled: no false alarm, and its accuracy
    # estimated before labels.
    (labeled_clean,), _ = simulate_batches(home / "unlabeled", SimulationSpec(batches=1, batch_size=150, pool="main", offset=400, prefix="clean", seed=2))
    truth = pl.read_parquet(labeled_clean)
    truth.with_columns(pl.lit(None, pl.Int64).alias("label")).write_parquet(home / "landing" / "clean-000.parquet")
    age([home / "landing" / "clean-000.parquet"])
    assert loop.land_and_process() == ["clean-000"]
    report = pl.read_json(home / "values" / "drift_report" / "clean-000.json").to_dicts()[0]
    assert report["drifted"] is False, report
    assert report["champion_accuracy"] is None and report["estimate_check"] is None
    assert report["estimated_accuracy"]["images"] == 150 and 0.8 < report["estimated_accuracy"]["accuracy"] <= 1
    assert loop.tick(drift_sensor) == []

    # Its labeling queue: the budget's worth (flywheel.yaml's) of its unlabeled images, as Label Studio tasks.
    tasks = json.loads((home / "labeling" / "clean-000" / "tasks.json").read_text())
    assert len(tasks) == 40 and {t["data"]["image_id"] for t in tasks} <= set(truth["image_id"])
    print_status(loop.flywheel)  # flywheel status: the estimate beside the drift signals, and the queue
    status = capsys.readouterr().out
    assert "estimated before labels" in status and "batch clean-000: 40 image(s) to label" in status
    # A labeler answers the queue in Label Studio; its export comes back through `flywheel labels import`.
    truth_of = dict(zip(truth["image_id"], truth["label"]))
    export = [task | {"annotations": [{"was_cancelled": False, "result": [{
        "from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [str(truth_of[task["data"]["image_id"]])]},
    }]}]} for task in tasks]
    (home / "export.json").write_text(json.dumps(export))
    main(["labels", "import", str(home / "export.json"), "--name", "queue-clean-000"])
    # ...and the rest of the batch's labels arrive late too, as a plain label file.
    queued = {t["data"]["image_id"] for t in tasks}
    truth.filter(~pl.col("image_id").is_in(queued)).select("image_id", "label").write_parquet(home / "landing" / "labels" / "clean-000.parquet")
    age(list((home / "landing" / "labels").glob("*.parquet")))
    loop.execute(loop.tick(landing_sensor), "load_labels")
    loop.execute([dg.RunRequest()], "transform")
    monitors = loop.tick(monitoring_sensor)
    assert [r.partition_key for r in monitors] == ["clean-000"]
    loop.execute(monitors, "monitor")
    report = pl.read_json(home / "values" / "drift_report" / "clean-000.json").to_dicts()[0]
    check = report["estimate_check"]
    assert check["images"] == 150 and check["real"] == report["champion_accuracy"]
    assert abs(check["error"]) < 0.1, check  # a clean batch: the calibrated confidences are close
    metadata = loop.instance.get_latest_materialization_event(dg.AssetKey("drift_report")).asset_materialization.metadata
    assert "points on 150 labeled images" in metadata["estimate_error"].value
    assert loop.tick(monitoring_sensor) == []  # answered once
    assert loop.tick(drift_sensor) == []
    # The queued images' labels reached the warehouse through the label file, and nothing is left to queue.
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as connection:
        sources = dict(connection.execute("SELECT image_id, label_source FROM int_images WHERE batch_id = 'clean-000'").fetchall())
    assert {sources[image_id] for image_id in queued} == {"label_file"}
    assert json.loads((home / "labeling" / "clean-000" / "tasks.json").read_text()) == []

    # A drifted, labeled batch: inverted polarity, digits no earlier batch contained.
    drifted, _ = simulate_batches(home / "landing", SimulationSpec(batches=1, batch_size=250, pool="holdout", drift="invert", prefix="invert"))
    age(drifted)
    assert loop.land_and_process() == ["invert-000"]
    report = pl.read_json(home / "values" / "drift_report" / "invert-000.json").to_dicts()[0]
    assert report["drifted"] and report["embedding"]["drifted"] and report["champion_accuracy"] < 0.5
    # The report's pictures: the batch beside the champion's training images, in the materialization too.
    assert (home / "reports" / "drift_samples" / "invert-000.png").exists()
    metadata = loop.instance.get_latest_materialization_event(dg.AssetKey("drift_report")).asset_materialization.metadata
    assert metadata["batch"].value == "invert-000" and metadata["samples"].value.startswith("![batch invert-000 beside")
    assert "batch_image_stats.brightness" in metadata["features"].value
    # The champion stays confident on inverted digits it gets wrong: its estimate is shown, not trusted.
    assert not report["estimate_trusted"] and "not trusted: the batch drifted" in metadata["estimated_accuracy"].value
    print_status(loop.flywheel)
    assert "drifted: not trusted" in capsys.readouterr().out
    retrain = loop.tick(drift_sensor)
    assert len(retrain) == 1 and "invert-000 drifted" in retrain[0].tags["flywheel/reason"]
    # Same code and network as the champion: fine-tuned on the batches it has not seen and a replay sample.
    assert "Incremental retraining" in retrain[0].tags["flywheel/reason"]
    assert retrain[0].run_config["ops"]["trained_model"]["config"]["mode"] == "incremental"
    loop.execute(retrain, "retrain")

    v2 = registry.champion()
    assert v2.version == "v0002"
    card = v2.card()
    assert card.gates.all_passed and card.lineage.parent_champion == "v0001"
    assert "invert-000" in card.lineage.training_batches and card.lineage.training_mode == "incremental"

    images, labels = held_out_drifted(home)
    accuracy = {
        version: float((predict_onnx(onnx_session(registry.get(version).int8), images).argmax(axis=1) == labels).mean())
        for version in ("v0001", "v0002")
    }
    assert accuracy["v0002"] >= accuracy["v0001"] + 0.10, accuracy
    # The retrained champion trained on every batch, the drifted one included: nothing is reported
    # again, and the older report (against v0001) no longer asks for more.
    assert loop.tick(monitoring_sensor) == []
    assert loop.tick(drift_sensor) == []
