"""Monitoring: each batch against the champion's training reference — image-statistics drift and,
where the batch is labeled, the champion's real accuracy on it."""

import dagster as dg
from pydantic import Field
import numpy as np

from orchestration.metadata import markdown_table
from orchestration.partitions import batch_partitions
from orchestration.resources import FlywheelHome
from training.evaluate import onnx_session, predict_onnx
from training.registry import Registry
from transforms import warehouse
from transforms.drift import DriftPolicy, dataset_drift
from transforms.images import STAT_COLUMNS


class DriftConfig(dg.Config):
    ks_p_value: float = Field(0.05, description="KS test: a feature drifted when p is below this (references <= small_reference rows).")
    distance_threshold: float = Field(0.1, description="Normalised Wasserstein: a feature drifted at or above this (larger references).")
    small_reference: int = Field(1000, description="Reference size up to which the KS test is used.")
    dataset_drift_share: float = Field(0.5, description="The batch drifted when at least this share of features did.")


@dg.asset(
    deps=["batch_image_stats", "champion_model"],
    partitions_def=batch_partitions,
    description="Per-feature and dataset drift of one batch's image statistics against the champion's "
    "training reference, the champion's predictions on the batch and, when labeled, its accuracy there.",
    group_name="monitoring",
    kinds={"duckdb", "onnx"},
    pool="warehouse",
)
def drift_report(context: dg.AssetExecutionContext, config: DriftConfig, flywheel: FlywheelHome) -> dg.Output[dict]:
    batch_id = context.partition_key
    champion = Registry(flywheel.registry).champion()
    if champion is None:
        raise dg.Failure("drift is measured against the champion's training data, and there is no champion yet: train one first")
    card = champion.card()
    reference_batches = card["lineage"]["training_batches"]
    policy = DriftPolicy(config.ks_p_value, config.distance_threshold, config.small_reference, config.dataset_drift_share)
    with warehouse.connect(flywheel.warehouse, read_only=True) as connection:
        reference = warehouse.image_stats(connection, reference_batches, split="train")
        current = warehouse.image_stats(connection, [batch_id])
        records = warehouse.batch_records(connection, batch_id, card["input"]["height"])
    if current.is_empty():
        raise dg.Failure(f"batch {batch_id} has no accepted images in the warehouse: nothing to monitor")
    result = dataset_drift(reference, current, list(STAT_COLUMNS), policy)

    predictions = predict_onnx(onnx_session(champion.int8), records.images).argmax(axis=1)
    labeled = records.index["label"].is_not_null().to_numpy()
    labels = records.index["label"].fill_null(-1).to_numpy()
    champion_accuracy = float((predictions[labeled] == labels[labeled]).mean()) if labeled.any() else None
    class_share = np.bincount(predictions, minlength=flywheel.num_classes) / max(1, len(predictions))

    value = {
        "batch_id": batch_id,
        "champion": champion.version,
        "reference_batches": reference_batches,
        **result.to_dict(),
        "labeled_rows": int(labeled.sum()),
        "champion_accuracy": champion_accuracy,
        "champion_test_accuracy": card["metrics"]["test_accuracy"],
        "predicted_class_share": class_share.round(4).tolist(),
    }
    context.log.info(
        f"batch {batch_id}: {100 * result.drifted_share:.0f}% of features drifted -> "
        f"{'DRIFT' if result.dataset_drift else 'no drift'}; champion accuracy on its labels: {champion_accuracy}"
    )
    return dg.Output(
        value,
        metadata={
            "dataset_drift": result.dataset_drift,
            "drifted_share": result.drifted_share,
            "champion": champion.version,
            "champion_accuracy": champion_accuracy if champion_accuracy is not None else float("nan"),
            "labeled_rows": int(labeled.sum()),
            "current_rows": result.current_rows,
            "reference_rows": result.reference_rows,
            "features": markdown_table(result.table().select("feature", "method", "statistic", "threshold", "drifted", "reference_mean", "current_mean")),
        },
    )
