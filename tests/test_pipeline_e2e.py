"""The whole asset graph materialized in-process on a small sample, with real DuckDB, dbt, FFCV,
Lightning (torchrun through Pipes), ONNX Runtime and offline W&B."""

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from orchestration.checks import evaluation_gate, export_gate, served_model_gate
from orchestration.definitions import defs
from tests.conftest import FAST_TRAINING, resources_for
from training.inference import onnx_session, predict_onnx
from training.registry import Registry
from transforms.simulate import SimulationSpec, simulate_batches

pytestmark = pytest.mark.e2e

DESIGN_ASSET_KEYS = {
    "raw_images", "quarantined_images", "stg_images", "int_images", "training_examples", "batch_image_stats",
    "ffcv_datasets", "trained_model", "model_evaluation", "exported_model", "champion_model", "drift_report",
}


def assets(*names: str) -> list:
    by_key = {key.to_user_string(): a for a in defs.assets for key in a.keys}
    return list({id(by_key[n]): by_key[n] for n in names}.values())


def test_definitions_hold_every_design_asset():
    keys = {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}
    assert DESIGN_ASSET_KEYS <= keys
    for job in ("ingest", "transform", "retrain", "monitor"):
        assert defs.resolve_job_def(job) is not None


def test_whole_graph_materializes_on_a_small_sample(home: Path):
    landed, _ = simulate_batches(home / "landing", SimulationSpec(batches=2, batch_size=180, seed=1))
    batches = [p.stem for p in landed]
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("batches", batches)
    resources = resources_for(home)

    for batch in batches:
        result = dg.materialize(assets("raw_images"), partition_key=batch, resources=resources, instance=instance)
        assert result.success
        metadata = result.asset_materializations_for_node("ingest_batch")[0].metadata
        assert metadata["accepted"].value == 180

    transform = dg.materialize(assets("stg_images"), resources=resources, instance=instance)
    assert transform.success
    checks = transform.get_asset_check_evaluations()
    assert checks and all(c.passed for c in checks), [c.check_name for c in checks if not c.passed]

    retrain = assets("ffcv_datasets", "trained_model", "model_evaluation", "exported_model", "champion_model")
    loop = dg.materialize(
        [*retrain, evaluation_gate, export_gate, served_model_gate],
        resources=resources,
        instance=instance,
        run_config={"ops": {"trained_model": {"config": FAST_TRAINING}}},
    )
    assert loop.success
    assert {c.check_name: c.passed for c in loop.get_asset_check_evaluations()} == {
        "evaluation_gate": True, "export_gate": True, "served_model_gate": True,
    }
    trained = loop.output_for_node("trained_model")
    assert trained["epochs_completed"] == FAST_TRAINING["epochs"]
    assert trained["training_batches"] == batches

    registry = Registry(home / "registry")
    champion = registry.champion()
    assert champion is not None and champion.version == "v0001"
    card = champion.card()
    assert card.metrics.test_accuracy >= 0.8, card.metrics
    assert card.gates.all_passed
    assert card.lineage.training_batches == batches
    assert card.lineage.wandb_run_id
    assert card.class_names == [str(c) for c in range(10)]
    # card.json as other tools read it (DESIGN.md's model contract).
    stored = json.loads((champion.path / "card.json").read_text())
    assert stored["version"] == "v0001"
    assert stored["input"] == {
        "name": "image", "dtype": "uint8", "layout": "NHWC", "height": 32, "width": 32, "channels": 3,
        "resize": "squash", "mode": "rgb",
    }

    # The ONNX contract: uint8 NHWC in, float32 logits out, any batch size.
    session = onnx_session(champion.int8)
    (image_input,) = session.get_inputs()
    assert (image_input.name, image_input.type) == ("image", "tensor(uint8)")
    for n in (1, 5):
        logits = predict_onnx(session, np.zeros((n, 32, 32, 3), np.uint8))
        assert logits.shape == (n, 10) and logits.dtype == np.float32
    assert champion.weights.exists() and champion.fp32.exists()

    # W&B ran offline under the data root and kept the training metrics.
    offline_runs = list((home / "wandb").glob(f"offline-run-*-{card.lineage.wandb_run_id}"))
    assert len(offline_runs) == 1

    drift = dg.materialize(assets("drift_report"), partition_key=batches[0], resources=resources, instance=instance)
    assert drift.success
    report = drift.output_for_node("drift_report")
    assert report["champion"] == "v0001"
    assert report["drifted"] is False  # the champion was trained on this very batch
    assert report["champion_accuracy"] > 0.8
    stored = json.loads((home / "values" / "drift_report" / f"{batches[0]}.json").read_text())
    assert stored["batch_id"] == batches[0]
    (materialization,) = drift.get_asset_materialization_events()
    predicted = materialization.materialization.metadata["predicted_classes"].value
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in predicted.splitlines()]
    assert rows[0] == ["class", "reference share", "batch share", "change"]
    assert sorted(row[0] for row in rows[2:]) == [str(c) for c in range(10)]  # every class, by name

    # A deliberately worse candidate: the blocking evaluation gate stops it before export, and the
    # champion stays.
    worse = dg.materialize(
        [*retrain, evaluation_gate, export_gate, served_model_gate],
        resources=resources,
        instance=instance,
        run_config={"ops": {"trained_model": {"config": {"epochs": 1, "width": 4, "learning_rate": 1e-4}}}},
        raise_on_error=False,
    )
    assert not worse.success
    gates = {c.check_name: c.passed for c in worse.get_asset_check_evaluations()}
    assert gates == {"evaluation_gate": False}
    evaluation = worse.output_for_node("model_evaluation")
    assert evaluation["champion_version"] == "v0001"
    assert evaluation["candidate"]["accuracy"] < evaluation["champion"]["accuracy"]
    assert not evaluation["gate"]["passed"]
    assert registry.champion().version == "v0001" and [v.version for v in registry.versions()] == ["v0001"]
