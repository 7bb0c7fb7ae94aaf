"""FFCV datasets: one `.beton` per split of `training_examples`, rewritten only when its rows changed."""

import json
import os

import dagster as dg
import polars as pl

from orchestration.metadata import markdown_table
from orchestration.resources import FlywheelHome
from training.data import SPLITS, write_beton
from transforms import warehouse


@dg.asset(
    deps=["training_examples"],
    description="One FFCV .beton per split (raw uint8 pixels at the training resolution, integer labels).",
    group_name="training",
    kinds={"ffcv"},
    pool="warehouse",
)
def ffcv_datasets(context: dg.AssetExecutionContext, flywheel: FlywheelHome) -> dg.Output[dict]:
    manifest_path = flywheel.ffcv / "manifest.json"
    previous = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    preprocessing = flywheel.preprocessing
    with warehouse.connect(flywheel.warehouse, read_only=True) as connection:
        classes = warehouse.stored_classes(connection)
        fingerprints = warehouse.split_fingerprints(connection)
        missing = [split for split in SPLITS if split not in fingerprints]
        if missing:
            raise dg.Failure(f"training_examples has no labeled rows in split(s) {', '.join(missing)}: land more labeled data")
        splits = {}
        for split in SPLITS:
            beton = flywheel.ffcv / f"{split}.beton"
            index_path = flywheel.ffcv / f"{split}.index.parquet"
            fingerprint = f"{fingerprints[split]}@{preprocessing}"
            unchanged = previous.get(split, {}).get("fingerprint") == fingerprint and beton.exists() and index_path.exists()
            if unchanged:
                splits[split] = previous[split] | {"rewritten": False}
                continue
            # Only images no earlier dataset decoded at this preprocessing are decoded now.
            records = warehouse.split_pixels(connection, split, preprocessing)
            write_beton(beton, records.images, records.labels)
            records.index.write_parquet(index_path)
            splits[split] = {
                "path": str(beton),
                "index": str(index_path),
                "fingerprint": fingerprint,
                "examples": len(records.labels),
                "batches": sorted(records.index["batch_id"].unique().to_list()),
                "rewritten": True,
            }
    manifest = {split: {k: v for k, v in info.items() if k != "rewritten"} for split, info in splits.items()}
    partial = manifest_path.with_name(f".{manifest_path.name}.partial")
    partial.write_text(json.dumps(manifest, indent=2))
    os.replace(partial, manifest_path)
    value = {
        "dir": str(flywheel.ffcv), "resolution": preprocessing.resolution, "resize": preprocessing.resize,
        "mode": preprocessing.mode, "classes": classes, "splits": manifest,
    }
    summary = pl.DataFrame(
        [{"split": s, "examples": i["examples"], "batches": len(i["batches"]), "rewritten": i["rewritten"]} for s, i in splits.items()]
    )
    return dg.Output(
        value,
        metadata={
            "splits": markdown_table(summary),
            "train_examples": splits["train"]["examples"],
            "val_examples": splits["val"]["examples"],
            "test_examples": splits["test"]["examples"],
            "rewritten": ", ".join(s for s, i in splits.items() if i["rewritten"]) or "none (inputs unchanged)",
            "preprocessing": f"{preprocessing.resolution} px, {preprocessing.resize}, {preprocessing.mode}",
            "classes": ", ".join(classes),
            "directory": dg.MetadataValue.path(str(flywheel.ffcv)),
        },
    )
