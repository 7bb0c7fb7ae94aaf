"""Ingestion: one landing file -> its accepted rows in `raw_images`, its bad rows in `quarantined_images`."""

import dagster as dg
from pydantic import Field

from orchestration.metadata import markdown_table
from orchestration.partitions import batch_partitions
from orchestration.project import SettingsError
from orchestration.resources import FlywheelHome, TrainingCompute
from transforms import warehouse
from transforms.classes import ClassesError, resolve_classes
from transforms.labels import label_files_signature, read_label_files
from training.ray_data import RayLaunchError
from transforms.landing import (
    LandingFileError, ValidationRules, declared_classes, file_sha256, ingestion_fingerprint, measure_landing_file,
    read_landing_file, validate_batch,
)


class IngestConfig(dg.Config):
    max_pixels: int = Field(
        100_000_000, gt=0, description="Images with more pixels are quarantined as image_too_large (a decompression-bomb "
        "guard); large photos below it (48 MP and more) are accepted and decoded downscaled.",
    )
    force: bool = Field(False, description="Ingest again even when the file and the rules are unchanged.")


def ingestion_rules(flywheel: FlywheelHome, config: IngestConfig) -> ValidationRules:
    """The validation rules of a run: the asset applies them, the landing sensor fingerprints with them."""
    return ValidationRules(classes=tuple(flywheel.project.classes), max_pixels=config.max_pixels)


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            "raw_images",
            description="Accepted images of each landed batch, decoded once, with per-image statistics.",
            group_name="ingestion",
            kinds={"polars", "duckdb"},
            skippable=True,
        ),
        dg.AssetSpec(
            "quarantined_images",
            description="Rows of each batch that failed validation, with a machine-readable reason and a message.",
            group_name="ingestion",
            kinds={"polars", "duckdb"},
            skippable=True,
        ),
    ],
    partitions_def=batch_partitions,
    pool="warehouse",
)
def ingest_batch(context: dg.AssetExecutionContext, config: IngestConfig, flywheel: FlywheelHome, compute: TrainingCompute):
    batch_id = context.partition_key
    rules = ingestion_rules(flywheel, config)
    if compute.launcher == "ray":  # the images are decoded and measured by Ray Data tasks on the cluster
        from training.ray_data import measure_on_ray

        measure = measure_on_ray(compute.ray_address)
    else:
        measure = measure_landing_file
    try:
        path = flywheel.landing_file(batch_id)
        sha256 = file_sha256(path) if path.is_file() else None
        fingerprint = ingestion_fingerprint(sha256, rules)
        with warehouse.connect(flywheel.warehouse) as connection:
            if warehouse.ingested_fingerprint(connection, batch_id) == fingerprint and not config.force:
                # Already stored from these same bytes under these same rules (by another run, or
                # a sensor and a `flywheel run` both asked): no rewrite, and no materialization,
                # so nothing downstream runs again for it.
                context.log.info(f"{path} is unchanged since it was ingested; nothing to do")
                return
            frame = read_landing_file(path)
            classes = resolve_classes(
                warehouse.stored_classes(connection), list(rules.classes), frame["label"], declared_classes(path)
            )
            batch = validate_batch(
                path, frame, rules, classes, lambda ids, hashes: warehouse.existing_keys(connection, batch_id, ids, hashes), measure,
            )
            counts = warehouse.replace_batch(connection, batch, fingerprint)
    except (LandingFileError, ClassesError, SettingsError, RayLaunchError) as error:
        # The file is unusable as a whole (or the cluster that would measure it is unreachable): fail this partition only, touching nothing stored.
        raise dg.Failure(description=str(error), allow_retries=False) from None

    for message in batch.quarantined["message"].head(20):
        context.log.warning(message)
    reasons = batch.quarantined.group_by("reason").len().sort("reason")
    yield dg.MaterializeResult(
        asset_key="raw_images",
        metadata={
            "file": dg.MetadataValue.path(str(path)),
            "file_sha256": sha256,
            # The landing sensor compares it with the file's: equal means there is nothing new to ingest.
            "ingestion_fingerprint": fingerprint,
            "rows_in_file": batch.row_count,
            "decoded_on": f"Ray cluster {compute.ray_address}" if compute.launcher == "ray" else "this machine",
            "accepted": counts.images,
            "labeled": int(batch.images["label"].is_not_null().sum()),
            "classes": len(batch.classes),
            "replaced_rows": counts.replaced_images,
            "dagster/row_count": counts.images,
            "preview": markdown_table(batch.images.drop("metadata").head(5)),
        },
    )
    yield dg.MaterializeResult(
        asset_key="quarantined_images",
        metadata={
            "quarantined": counts.quarantined,
            "dagster/row_count": counts.quarantined,
            "reasons": dg.MetadataValue.json(dict(zip(reasons["reason"], reasons["len"]))),
        },
    )


@dg.asset(
    description="Late labels from landing/labels/*.parquet (image_id, label); the most recently written "
    "file wins for an image. Bad rows go to quarantined_images under batch id labels/<file>.",
    group_name="ingestion",
    kinds={"polars", "duckdb"},
    pool="warehouse",
)
def raw_labels(context: dg.AssetExecutionContext, flywheel: FlywheelHome) -> dg.MaterializeResult:
    signature = label_files_signature(flywheel.labels, flywheel.project.classes)
    with warehouse.connect(flywheel.warehouse) as connection:
        try:
            label_set = read_label_files(flywheel.labels, warehouse.stored_classes(connection), flywheel.project.classes)
        except (ClassesError, SettingsError) as error:
            raise dg.Failure(description=str(error), allow_retries=False) from None
        stored = warehouse.replace_labels(connection, label_set)
        batches = warehouse.late_labeled_batches(connection)
    for message in label_set.quarantined["message"].head(20):
        context.log.warning(message)
    return dg.MaterializeResult(
        metadata={
            "label_files": label_set.files,
            "labeled_images": stored,
            "quarantined_rows": label_set.quarantined.height,
            "dagster/row_count": stored,
            "folder": dg.MetadataValue.path(str(flywheel.labels)),
            "files_signature": signature,
            # The monitoring sensor reports these batches again: their estimate meets their labels.
            "labeled_batches": dg.MetadataValue.json(batches),
        }
    )
