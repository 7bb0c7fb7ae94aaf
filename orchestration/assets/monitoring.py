"""Monitoring: each batch against the champion's training data — image-statistics drift, embedding
drift (MMD on the champion's penultimate layer), prediction drift and, where the batch is labeled,
the champion's real accuracy on it."""

import dagster as dg
import numpy as np
import polars as pl
from pydantic import Field

from orchestration.checks import DRIFT_CHECK_SPECS, drift_check_results
from orchestration.io_manager import stored_values
from orchestration.metadata import accuracy_text, drift_over_time_png, markdown_image, markdown_table, readable, sample_grid_png
from orchestration.policy import accuracy_drop
from orchestration.partitions import batch_partitions
from orchestration.resources import FlywheelHome, TrainingCompute
from training.calibration import estimate_accuracy, estimate_error
from training.card import ModelCard
from transforms.images import served_preprocessing
from training.registry import ModelVersion, Registry
from transforms import warehouse
from transforms.drift import DriftPolicy, dataset_drift, embedding_drift, prediction_drift
from transforms.images import DRIFT_FEATURES


class DriftConfig(dg.Config):
    ks_p_value: float = Field(0.05, gt=0, lt=1, description="KS / chi-square: drift when p is below this (references <= small_reference rows).")
    distance_threshold: float = Field(0.1, gt=0, description="Normalised Wasserstein / Jensen-Shannon: drift at or above this (larger references).")
    small_reference: int = Field(1000, ge=0, description="Reference size up to which the KS and chi-square tests are used.")
    dataset_drift_share: float = Field(0.5, gt=0, le=1, description="The image statistics drifted when at least this share of features did.")
    embedding_p_value: float = Field(0.01, gt=0, lt=1, description="MMD permutation test: embedding drift when p is below this (stricter: fewer false alarms).")
    reference_rows: int = Field(1000, ge=10, description="Training images sampled as the reference for embeddings and predictions.")


def _reference(flywheel: FlywheelHome, champion: ModelVersion, card: ModelCard, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The champion's embeddings and predictions on a sample of its training images, computed once
    per champion and kept beside the monitoring reports (plain .npy, never pickled)."""
    from training.inference import embed_and_predict, load_classifier  # heavy: imported by the runs that use it (orchestration/__init__.py)

    folder = flywheel.root / "monitoring" / champion.version
    embeddings_path, predictions_path = folder / "reference_embeddings.npy", folder / "reference_predictions.npy"
    if embeddings_path.exists() and predictions_path.exists():
        return np.load(embeddings_path, allow_pickle=False), np.load(predictions_path, allow_pickle=False)
    with warehouse.connect(flywheel.warehouse, read_only=True) as connection:
        records = warehouse.split_records(
            connection, "train", served_preprocessing(card), batch_ids=card.lineage.training_batches, limit=rows
        )
    network = load_classifier(champion.weights, card.model)
    embeddings, predictions = embed_and_predict(network, records.images)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(embeddings_path, embeddings)
    np.save(predictions_path, predictions)
    return embeddings, predictions


@dg.asset(
    deps=["batch_image_stats", "champion_model"],
    partitions_def=batch_partitions,
    description="One batch against the champion's training data: per-feature and dataset drift of the image "
    "statistics, embedding drift (MMD), prediction drift, the champion's accuracy on the batch's labels, "
    "and the drift-over-time plot.",
    group_name="monitoring",
    kinds={"duckdb", "onnx", "wandb"},
    pool="warehouse",
    check_specs=DRIFT_CHECK_SPECS,
)
def drift_report(
    context: dg.AssetExecutionContext, config: DriftConfig, flywheel: FlywheelHome, compute: TrainingCompute,
):
    from training.inference import embed_and_predict, load_classifier, predict_onnx  # heavy: imported by the runs that use it (orchestration/__init__.py)
    from training.tracking import log_monitoring

    batch_id = context.partition_key
    champion = Registry(flywheel.registry).champion()
    if champion is None:
        raise dg.Failure("drift is measured against the champion's training data, and there is no champion yet: train one first")
    card = champion.card()
    policy = DriftPolicy(config.ks_p_value, config.distance_threshold, config.small_reference, config.dataset_drift_share)
    reference_embeddings, reference_predictions = _reference(flywheel, champion, card, config.reference_rows)
    # The batch's pixels are read from the image store's decoded cache a few hundred at a time:
    # memory does not grow with the batch.
    with warehouse.connect(flywheel.warehouse, read_only=True) as connection:
        reference_stats = warehouse.image_stats(connection, card.lineage.training_batches, split="train")
        current_stats = warehouse.image_stats(connection, [batch_id])
        if current_stats.is_empty():
            raise dg.Failure(f"batch {batch_id} has no accepted images in the warehouse: nothing to monitor")
        records = warehouse.batch_pixels(connection, batch_id, served_preprocessing(card))
        reference_samples = warehouse.split_records(
            connection, "train", served_preprocessing(card), batch_ids=card.lineage.training_batches, limit=16,
        ).images[:16]
        # What is served is the int8 file: its predictions are the ones that count.
        if compute.launcher == "ray":  # the batch's pass over both models runs on the cluster
            from training.ray_data import RayLaunchError
            from training.ray_inference import embed_and_score_on_ray

            try:
                embeddings, logits = embed_and_score_on_ray(compute.ray_address, records.images, champion.weights, card.model, champion.int8)
            except RayLaunchError as error:
                raise dg.Failure(description=str(error), allow_retries=False) from None
        else:
            embeddings, _ = embed_and_predict(load_classifier(champion.weights, card.model), records.images)
            logits = predict_onnx(champion.inference_session(), records.images)
        index = records.index
    predictions = logits.argmax(axis=1)
    features = dataset_drift(reference_stats, current_stats, list(DRIFT_FEATURES), policy)
    embedding = embedding_drift(reference_embeddings, embeddings, config.embedding_p_value)
    classes = prediction_drift(reference_predictions, predictions, card.model.num_classes, policy)
    labeled = index["label"].is_not_null().to_numpy()
    labels = index["label"].fill_null(-1).to_numpy()
    champion_accuracy = float((predictions[labeled] == labels[labeled]).mean()) if labeled.any() else None
    drifted = features.dataset_drift or embedding.drifted
    # Accuracy before labels, from the served model's calibrated confidences; where labels exist, the
    # same estimate on the labeled rows is checked against the accuracy they show.
    estimate = estimate_accuracy(logits, card.calibration) if card.calibration else None
    estimate_check = (
        estimate_error(estimate_accuracy(logits[labeled], card.calibration), champion_accuracy)
        if card.calibration and labeled.any() else None
    )

    # Under covariate shift a network stays confident on images it gets wrong (bench/estimate.py: off by
    # 30-90 points on every drifted kind but the mildest), so an estimate is trusted only without drift.
    untrusted = " (not trusted: the batch drifted, and confidences do not fall with accuracy under covariate shift)" if drifted else ""
    value = {
        "batch_id": batch_id,
        "champion": champion.version,
        "reference_batches": card.lineage.training_batches,
        **features.to_dict(),
        "embedding": embedding.__dict__,
        "predictions": classes.__dict__,
        "drifted": drifted,
        "labeled_rows": int(labeled.sum()),
        "champion_accuracy": champion_accuracy,
        "champion_test_accuracy": card.metrics.test_accuracy_int8,
        "estimated_accuracy": estimate.to_dict() if estimate else None,
        "estimate_trusted": not drifted,
        "estimate_check": estimate_check,
    }
    drop = accuracy_drop(value, card, flywheel.project.retraining)
    value["accuracy_drop_p_value"] = drop.p_value if drop else None
    history = [r for r in stored_values(flywheel, "drift_report") if r["batch_id"] != batch_id] + [value]
    plot = drift_over_time_png(history, flywheel.reports / "drift_over_time.png")
    samples = sample_grid_png(
        records.images[:16], reference_samples, flywheel.reports / "drift_samples" / f"{batch_id}.png", batch_id,
        f"champion {champion.version}'s training images",
    )
    wandb_run = log_monitoring(value, flywheel.root, images={"drift/samples": samples, "drift/over_time": plot})
    context.log.info(
        f"batch {batch_id}: {'DRIFT' if drifted else 'no drift'} — {100 * features.drifted_share:.0f}% of image "
        f"statistics drifted, embedding MMD p={embedding.p_value:.3f}, prediction {classes.method}={classes.statistic:.3g}; "
        f"champion accuracy on its labels: {champion_accuracy}; estimated before labels: {estimate.text() + untrusted if estimate else 'no calibration'}"
    )
    yield dg.Output(
        value,
        metadata=readable({
            "drifted": drifted,
            "dataset_drift": features.dataset_drift,
            "drifted_share": features.drifted_share,
            "embedding_mmd2": embedding.mmd2,
            "embedding_p_value": embedding.p_value,
            "prediction_drift": classes.drifted,
            "champion": champion.version,
            "champion_accuracy": accuracy_text(champion_accuracy, int(labeled.sum())) if champion_accuracy is not None else "unlabeled",
            "labeled_rows": int(labeled.sum()),
            "estimated_accuracy": estimate.text() + untrusted if estimate else "no calibration in the champion's card",
            "estimate_error": (
                f"{100 * estimate_check['error']:+.1f} points on {estimate_check['images']} labeled images "
                f"(interval {'covers' if estimate_check['covered'] else 'misses'} the real accuracy)"
                if estimate_check else "no labels yet"
            ),
            "accuracy_drop_p_value": drop.p_value if drop else float("nan"),
            "current_rows": features.current_rows,
            "reference_rows": features.reference_rows,
            # Each feature is a column of the dbt mart batch_image_stats (models/marts/batch_image_stats.sql).
            "features": markdown_table(
                features.table().select("feature", "method", "statistic", "threshold", "drifted", "reference_mean", "current_mean")
                .with_columns(("batch_image_stats." + pl.col("feature")).alias("dbt model.column"))
            ),
            # Which classes the champion now sees more or less often, by name, the largest change first.
            "predicted_classes": markdown_table(
                pl.DataFrame({
                    "class": card.class_names, "reference share": classes.reference_share, "batch share": classes.current_share,
                }).with_columns((pl.col("batch share") - pl.col("reference share")).round(4).alias("change"))
                .sort(pl.col("change").abs(), descending=True)
            ),
            "batch": batch_id,
            "samples": markdown_image(samples, f"batch {batch_id} beside the champion's training images"),
            "drift_over_time": markdown_image(plot, "drift over time"),
            "wandb_run": wandb_run,
        }),
    )
    yield from drift_check_results(value, drop)
