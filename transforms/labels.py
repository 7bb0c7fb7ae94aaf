"""Late labels: `landing/labels/<name>.parquet` files with `image_id` and `label` (a class name or
index) attach labels to
images that landed earlier. When several files label the same image, the most recently written
file wins. Bad rows (and unreadable files) are quarantined under batch id `labels/<name>`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from transforms.classes import label_index, resolve_classes, unknown_label_message
from transforms.landing import IMAGE_ID_PATTERN, QUARANTINE_SCHEMA, landed_files

LABELS_SCHEMA = {"image_id": pl.Utf8, "label": pl.Int64, "label_file": pl.Utf8, "labeled_at": pl.Datetime("us", "UTC")}


@dataclass(frozen=True)
class LabelSet:
    labels: pl.DataFrame  # LABELS_SCHEMA, one row per image_id; `label` is the class index
    quarantined: pl.DataFrame  # QUARANTINE_SCHEMA
    files: int
    classes: list[str]  # the project's classes after these files (indices are positions)


def label_files_signature(folder: Path, configured_classes: list[str]) -> str:
    """Names, times and sizes of the label files, and the configured classes: it changes whenever a file
    is added, replaced or removed, or a class is added (a label it quarantined may now be accepted)."""
    files = landed_files(folder) if folder.is_dir() else []
    if not files:
        return ""
    return ",".join(f"{p.name}={p.stat().st_mtime_ns}:{p.stat().st_size}" for p in files) + f"|classes={configured_classes}"


def _problem(quarantine_id: str, path: Path, row: int, image_id: str | None, reason: str, text: str) -> dict:
    return {
        "batch_id": quarantine_id, "image_id": image_id, "row_number": row, "reason": reason,
        "message": f"{path}: " + (f"row {row} (image_id {image_id}): " if row else "") + text,
    }


def read_label_files(folder: Path, stored_classes: list[str], configured_classes: list[str]) -> LabelSet:
    """Every label file, the latest winning per image; the classes are resolved over all their labels
    (`transforms.classes.resolve_classes`), so label files may be the first to name them."""
    files = sorted(landed_files(folder), key=lambda p: (p.stat().st_mtime_ns, p.name))
    readable, problems = [], []
    for order, path in enumerate(files):
        quarantine_id = f"labels/{path.stem}"
        try:
            frame = pl.read_parquet(path, columns=["image_id", "label"])
        except Exception as error:  # damaged or foreign files of any kind
            problems.append(_problem(quarantine_id, path, 0, None, "unreadable_label_file", f"not a readable label file with image_id and label ({error})"))
            continue
        label_type = frame.schema["label"]
        if not ((label_type.is_integer() or label_type == pl.Utf8) and frame.schema["image_id"] == pl.Utf8):
            problems.append(_problem(quarantine_id, path, 0, None, "unreadable_label_file",
                                     f"image_id must be a string and label a class name or index, got {frame.schema['image_id']} and {label_type}"))
            continue
        readable.append((order, path, frame.with_columns(pl.col("label").cast(pl.Utf8).alias("label_as_landed"))))
    classes = resolve_classes(
        stored_classes, configured_classes,
        pl.concat([frame["label_as_landed"] for _, _, frame in readable]) if readable else pl.Series([], dtype=pl.Utf8),
    )
    frames = []
    for order, path, frame in readable:
        quarantine_id = f"labels/{path.stem}"
        frame = frame.with_row_index("row_number", offset=1).with_columns(
            label_index(pl.col("label_as_landed"), classes).alias("label"),
        ).with_columns(
            pl.when(pl.col("image_id").is_null() | ~pl.col("image_id").str.contains(IMAGE_ID_PATTERN))
            .then(pl.lit("invalid_image_id"))
            .when(pl.col("label_as_landed").is_null())
            .then(pl.lit("missing_label"))
            .when(pl.col("label").is_null())
            .then(pl.lit("unknown_class"))
            .alias("reason"),
        )
        for row in frame.filter(pl.col("reason").is_not_null()).iter_rows(named=True):
            text = {"invalid_image_id": "image_id is missing or malformed", "missing_label": "label is null"}.get(row["reason"])
            text = text or unknown_label_message(row["label_as_landed"], classes)
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
    return LabelSet(labels.cast(LABELS_SCHEMA), pl.DataFrame(problems, schema=QUARANTINE_SCHEMA), len(files), classes)


class LabelStudioExportError(ValueError):
    """A Label Studio export that cannot be read at all (one line, naming the file)."""


def label_studio_labels(path: Path) -> tuple[pl.DataFrame, list[str]]:
    """`image_id`, `label` (a class name) from a Label Studio JSON export of the labeling queue's tasks:
    each task's latest annotation that was not cancelled, with one choice. Tasks without one are left
    for later; tasks that cannot be read are listed as problems (`<file>: task N: why`)."""
    import json

    try:
        tasks = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LabelStudioExportError(f"{path}: not a readable Label Studio JSON export ({error})") from None
    if not isinstance(tasks, list):
        raise LabelStudioExportError(f"{path}: a Label Studio JSON export is a list of tasks, got {type(tasks).__name__}")
    rows, problems = [], []
    for number, task in enumerate(tasks, start=1):
        image_id = task.get("data", {}).get("image_id") if isinstance(task, dict) else None
        if not isinstance(image_id, str):
            problems.append(f"{path}: task {number}: no data.image_id (tasks come from flywheel's labeling queue)")
            continue
        done = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        choices = [r["value"]["choices"] for r in (done[-1].get("result") or []) if r.get("type") == "choices"] if done else []
        if not done:
            continue  # not labeled yet
        if len(choices) != 1 or len(choices[0]) != 1:
            problems.append(f"{path}: task {number} (image_id {image_id}): expected one chosen class, got {choices}")
            continue
        rows.append({"image_id": image_id, "label": str(choices[0][0])})
    return pl.DataFrame(rows, schema={"image_id": pl.Utf8, "label": pl.Utf8}), problems
