"""Late labels: `landing/labels/<name>.parquet` files with `image_id` and `label` attach labels to
images that landed earlier. When several files label the same image, the most recently written
file wins. Bad rows (and unreadable files) are quarantined under batch id `labels/<name>`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from transforms.landing import IMAGE_ID_PATTERN, QUARANTINE_SCHEMA, landed_files

LABELS_SCHEMA = {"image_id": pl.Utf8, "label": pl.Int64, "label_file": pl.Utf8, "labeled_at": pl.Datetime("us", "UTC")}


@dataclass(frozen=True)
class LabelSet:
    labels: pl.DataFrame  # LABELS_SCHEMA, one row per image_id
    quarantined: pl.DataFrame  # QUARANTINE_SCHEMA
    files: int


def label_files_signature(folder: Path) -> str:
    """Names, times and sizes of the label files: it changes whenever a file is added, replaced or removed."""
    if not folder.is_dir():
        return ""
    return ",".join(f"{p.name}={p.stat().st_mtime_ns}:{p.stat().st_size}" for p in landed_files(folder))


def _problem(quarantine_id: str, path: Path, row: int, image_id: str | None, reason: str, text: str) -> dict:
    return {
        "batch_id": quarantine_id, "image_id": image_id, "row_number": row, "reason": reason,
        "message": f"{path}: " + (f"row {row} (image_id {image_id}): " if row else "") + text,
    }


def read_label_files(folder: Path, num_classes: int) -> LabelSet:
    files = sorted(landed_files(folder), key=lambda p: (p.stat().st_mtime_ns, p.name))
    frames, problems = [], []
    for order, path in enumerate(files):
        quarantine_id = f"labels/{path.stem}"
        try:
            frame = pl.read_parquet(path, columns=["image_id", "label"])
        except Exception as error:  # damaged or foreign files of any kind
            problems.append(_problem(quarantine_id, path, 0, None, "unreadable_label_file", f"not a readable label file with image_id and label ({error})"))
            continue
        if not (frame.schema["label"].is_integer() and frame.schema["image_id"] == pl.Utf8):
            problems.append(_problem(quarantine_id, path, 0, None, "unreadable_label_file",
                                     f"image_id must be a string and label an integer, got {frame.schema['image_id']} and {frame.schema['label']}"))
            continue
        frame = frame.with_row_index("row_number", offset=1).with_columns(
            pl.col("label").cast(pl.Int64),
            pl.when(pl.col("image_id").is_null() | ~pl.col("image_id").str.contains(IMAGE_ID_PATTERN))
            .then(pl.lit("invalid_image_id"))
            .when(pl.col("label").is_null())
            .then(pl.lit("missing_label"))
            .when((pl.col("label") < 0) | (pl.col("label") >= num_classes))
            .then(pl.lit("label_out_of_range"))
            .alias("reason"),
        )
        for row in frame.filter(pl.col("reason").is_not_null()).iter_rows(named=True):
            text = {"invalid_image_id": "image_id is missing or malformed", "missing_label": "label is null",
                    "label_out_of_range": f"label {row['label']} is outside 0..{num_classes - 1}"}[row["reason"]]
            problems.append(_problem(quarantine_id, path, row["row_number"], row["image_id"], row["reason"], text))
        labeled_at = datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc)
        frames.append(
            frame.filter(pl.col("reason").is_null()).select(
                "image_id", "label", pl.lit(path.name).alias("label_file"),
                pl.lit(labeled_at).cast(pl.Datetime("us", "UTC")).alias("labeled_at"), pl.lit(order).alias("order"),
            )
        )
    labels = (
        pl.concat(frames).sort("order").unique("image_id", keep="last", maintain_order=True).drop("order")
        if frames else pl.DataFrame(schema=LABELS_SCHEMA)
    )
    return LabelSet(labels.cast(LABELS_SCHEMA), pl.DataFrame(problems, schema=QUARANTINE_SCHEMA), len(files))
