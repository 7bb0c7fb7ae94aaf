"""The labeling queue: per batch, the unlabeled images most worth a label, exported for Label Studio
(tasks with the champion's predictions as pre-annotations) and as a CSV. The labels come back through
`landing/labels/` (`flywheel labels import` turns a Label Studio export into a label file)."""

import dagster as dg
import numpy as np
import polars as pl
from pydantic import Field

from orchestration.metadata import image_grid_png, markdown_image, markdown_table, readable
from orchestration.partitions import batch_partitions
from orchestration.resources import FlywheelHome
from training.registry import Registry
from transforms import warehouse
from transforms.images import served_preprocessing


class LabelingConfig(dg.Config):
    budget: int = Field(50, ge=0, description="Images queued for labeling per batch (0: no queue).")
    candidate_factor: float = Field(
        4.0, ge=1, description="The diversity pick chooses among this many times the budget of the most uncertain images.",
    )
    image_url_root: str = Field(
        "/data/local-files/?d=", description="Prefix of each task's image URL, before its path under the labeling folder: "
        "Label Studio's local files, with LOCAL_FILES_DOCUMENT_ROOT set to $FLYWHEEL_HOME/labeling.",
    )


@dg.asset(
    deps=["batch_image_stats", "champion_model"],
    partitions_def=batch_partitions,
    description="The batch's unlabeled images most worth labeling (the champion's smallest margins, balanced over "
    "its predicted classes, spread over its embedding space), as Label Studio tasks with pre-annotations and a CSV.",
    group_name="monitoring",
    kinds={"duckdb", "onnx"},
    pool="warehouse",
)
def labeling_queue(context: dg.AssetExecutionContext, config: LabelingConfig, flywheel: FlywheelHome) -> dg.Output[dict]:
    from training.active import QueueItem, queue_for_labeling, write_queue  # heavy: imported by the runs that use it
    from training.inference import embed_and_predict, load_classifier, predict_onnx

    batch_id = context.partition_key
    champion = Registry(flywheel.registry).champion()
    if champion is None:
        raise dg.Failure("the labeling queue ranks images by the champion's uncertainty, and there is no champion yet: train one first")
    card = champion.card()
    session, network = champion.inference_session(), load_classifier(champion.weights, card.model)
    with warehouse.connect(flywheel.warehouse, read_only=True) as connection:
        records = warehouse.batch_pixels(connection, batch_id, served_preprocessing(card))
        unlabeled = np.flatnonzero(records.index["label"].is_null().to_numpy())

        def images_of(rows: np.ndarray) -> np.ndarray:
            positions = unlabeled[rows]
            if len(positions) and np.all(np.diff(positions) == 1):  # consecutive rows: one slice of the cache
                return np.asarray(records.images[int(positions[0]):int(positions[-1]) + 1])
            return np.stack([records.images[row] for row in positions])

        selection, probabilities = queue_for_labeling(
            len(unlabeled), images_of, lambda images: predict_onnx(session, images),
            lambda images: embed_and_predict(network, images)[0],
            card.calibration.temperature if card.calibration else 1.0, config.budget, config.candidate_factor,
        )
        images = images_of(selection.rows) if len(selection.rows) else None
    image_ids = records.index["image_id"].to_numpy()[unlabeled]
    items = [
        QueueItem(str(image_ids[row]), batch_id, image, card.class_names[int(probabilities[row].argmax())],
                  float(probabilities[row].max()), float(margin))
        for row, image, margin in zip(selection.rows.tolist(), images if images is not None else [], selection.margin)
    ]
    paths = write_queue(flywheel.labeling / batch_id, items, card.class_names, champion.version, config.image_url_root)
    queue = pl.read_csv(paths["csv"], schema_overrides={"image_id": pl.Utf8, "batch_id": pl.Utf8, "predicted": pl.Utf8})
    context.log.info(f"batch {batch_id}: {len(items)} of {len(unlabeled)} unlabeled images queued for labeling ({paths['tasks']})")
    metadata = {
        "batch": batch_id,
        "champion": champion.version,
        "unlabeled_images": len(unlabeled),
        "queued_images": len(items),
        "candidates": selection.candidates,
        "label_studio_tasks": dg.MetadataValue.path(str(paths["tasks"])),
        "label_studio_config": dg.MetadataValue.path(str(paths["config"])),
        "csv": dg.MetadataValue.path(str(paths["csv"])),
        "median_margin": float(np.median(selection.margin)) if len(items) else float("nan"),
        "predicted_classes": markdown_table(queue.group_by("predicted").len("queued").sort("queued", descending=True)) if len(items) else "none",
    }
    if items:
        grid = image_grid_png(
            np.stack([item.image for item in items[:16]]), [f"{item.predicted} {100 * item.probability:.0f}%" for item in items[:16]],
            flywheel.reports / "labeling" / f"{batch_id}.png", f"batch {batch_id}: the first {min(16, len(items))} images to label",
        )
        metadata["first_images"] = markdown_image(grid, f"the first images to label in batch {batch_id}")
    return dg.Output(
        {"batch_id": batch_id, "champion": champion.version, "queued": queue.to_dicts(), **{k: str(v) for k, v in paths.items()}},
        metadata=readable(metadata),
    )
