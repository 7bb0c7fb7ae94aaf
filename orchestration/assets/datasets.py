"""FFCV datasets: one `.beton` shard per batch and split, written once, merged into one file per split."""

import dagster as dg
import polars as pl

from orchestration.metadata import markdown_table
from orchestration.resources import FlywheelHome, TrainingCompute
from transforms import warehouse


@dg.asset(
    deps=["training_examples"],
    description="One FFCV .beton per split (raw uint8 pixels at the training resolution, integer labels), "
    "merged from per-batch shards: a tick encodes only the shards its batches added or changed.",
    group_name="training",
    kinds={"ffcv"},
    pool="warehouse",
)
def ffcv_datasets(context: dg.AssetExecutionContext, flywheel: FlywheelHome, compute: TrainingCompute) -> dg.Output[dict]:
    from training.data import SPLITS, build_datasets  # heavy: imported by the runs that use it (orchestration/__init__.py)

    preprocessing = flywheel.preprocessing
    with warehouse.connect(flywheel.warehouse, read_only=True) as connection:
        decoded_on_ray = 0
        if compute.launcher == "ray":  # the cluster decodes and resizes what no earlier run has, pack by pack
            from training.ray_data import RayLaunchError, decode_on_ray

            packs = warehouse.packs_to_decode(connection, preprocessing)
            try:
                decoded_on_ray = decode_on_ray(compute.ray_address, warehouse.image_store(connection).root, packs, preprocessing)
            except RayLaunchError as error:
                raise dg.Failure(description=str(error), allow_retries=False) from None
        classes = warehouse.stored_classes(connection)
        digests = warehouse.shard_fingerprints(connection)
        missing = [split for split in SPLITS if not any(s == split for s, _ in digests)]
        if missing:
            raise dg.Failure(f"training_examples has no labeled rows in split(s) {', '.join(missing)}: land more labeled data")
        # Only images no earlier dataset or report decoded at this preprocessing are decoded.
        build = build_datasets(
            flywheel.ffcv, preprocessing.tag, digests,
            lambda split, batch_id: warehouse.shard_pixels(connection, split, batch_id, preprocessing),
        )
    value = {
        "dir": str(flywheel.ffcv), "resolution": preprocessing.resolution, "resize": preprocessing.resize,
        "mode": preprocessing.mode, "classes": classes, "splits": build.manifest,
    }
    summary = pl.DataFrame([
        {"split": s, "examples": i["examples"], "batches": len(i["batches"]), "merged": s in build.merged}
        for s, i in build.manifest.items()
    ])
    return dg.Output(
        value,
        metadata={
            "splits": markdown_table(summary),
            "train_examples": build.manifest["train"]["examples"],
            "val_examples": build.manifest["val"]["examples"],
            "test_examples": build.manifest["test"]["examples"],
            "shards_written": dg.MetadataValue.int(len(build.written)),
            "examples_encoded": dg.MetadataValue.int(build.encoded),
            **({"images_decoded_on_ray": dg.MetadataValue.int(decoded_on_ray)} if compute.launcher == "ray" else {}),
            "shards_reused": dg.MetadataValue.int(build.reused),
            "merged": ", ".join(build.merged) or "none (inputs unchanged)",
            "preprocessing": f"{preprocessing.resolution} px, {preprocessing.resize}, {preprocessing.mode}",
            "classes": ", ".join(classes),
            "directory": dg.MetadataValue.path(str(flywheel.ffcv)),
        },
    )
