"""`flywheel land SOURCE`: a user's images into landing batches (DESIGN.md's landing contract).

A source is
- an ImageFolder tree, `SOURCE/<class name>/**/<image>` (torchvision's convention), labels taken
  from the class folders' names, or a folder of images landed unlabeled;
- a CSV or Parquet manifest with a `path_or_uri` column and optionally `label`, `image_id` and
  `captured_at`; a path is relative to the manifest's folder, a URI (`s3://`, `gs://`, `file://`,
  ...) is opened through fsspec.

An image's `image_id`, unless the manifest gives one, is derived from its bytes, so landing the same
files again adds nothing: ids already in the landing folder are skipped. Items are streamed: a batch file
is written a row group (ROW_GROUP_BYTES of images) at a time, so memory is bounded whatever the
batch size and the source's size, under a hidden name renamed into place when the batch is complete. A bad item (a missing file, an unreachable URI, bytes that are not an image,
the same path twice, a class folder name that is not allowed) is reported in one line naming it and
skipped; the good items land.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Literal

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from transforms.classes import class_name, class_name_problem, label_text
from transforms.images import IMAGE_SUFFIXES
from transforms.landing import ROW_GROUP_BYTES, LandingFileWriter, check_batch_id, landed_files

MANIFEST_PATH_COLUMN = "path_or_uri"
LANDING_SCHEMA = pa.schema([
    ("image_id", pa.large_string()), ("image", pa.large_binary()), ("label", pa.large_string()),
    ("captured_at", pa.timestamp("us", tz="UTC")), ("source", pa.large_string()),
])

Labels = Literal["folders", "manifest", "none"]


class LandError(Exception):
    """A source that cannot be landed at all; the message names it and the cause."""


@dataclass(frozen=True)
class SourceItem:
    location: str  # a local path or a URI
    where: str  # how a person finds it: the path, or "<manifest>: row <n>"
    label: str | None = None
    image_id: str | None = None
    captured_at: datetime | None = None


@dataclass
class LandReport:
    written: list[Path] = field(default_factory=list)
    landed: int = 0
    already_landed: int = 0
    problems: list[str] = field(default_factory=list)  # one line per skipped item


# --- sources --------------------------------------------------------------------------------------

def _images_under(folder: Path) -> Iterator[Path]:
    """Image files under `folder`, depth first, in name order; hidden files and folders are skipped."""
    with os.scandir(folder) as listing:
        entries = sorted((e for e in listing if not e.name.startswith(".")), key=lambda e: e.name)
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _images_under(Path(entry.path))
        elif entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
            yield Path(entry.path)


def folder_items(source: Path, labels: Labels, problems: list[str]) -> Iterator[SourceItem]:
    """The images of a folder: labeled by their class folder (`labels="folders"`) or unlabeled."""
    if labels == "none":
        for path in _images_under(source):
            yield SourceItem(str(path), str(path), captured_at=_mtime(path))
        return
    with os.scandir(source) as listing:
        entries = sorted((e for e in listing if not e.name.startswith(".")), key=lambda e: e.name)
    for entry in entries:
        if entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
            problems.append(f"{entry.path}: not inside a class folder, so it has no label: skipped (SOURCE/<class>/<image>)")
        if not entry.is_dir(follow_symlinks=False):
            continue
        name = class_name(entry.name)
        problem = class_name_problem(name)
        if problem:
            problems.append(f"{entry.path}: {problem}: its images were skipped; rename the folder")
            continue
        for path in _images_under(Path(entry.path)):
            yield SourceItem(str(path), str(path), label=name, captured_at=_mtime(path))


def _mtime(path: Path) -> datetime:
    return datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc)


def _manifest_batches(manifest: Path) -> Iterator[pa.RecordBatch]:
    suffix = manifest.suffix.lower()
    try:
        if suffix == ".parquet":
            yield from pq.ParquetFile(manifest).iter_batches(batch_size=4096)
        elif suffix == ".csv":
            # Every column as text: labels like "007" and ids keep their spelling.
            reader = pa_csv.open_csv(manifest, convert_options=pa_csv.ConvertOptions(
                column_types={name: pa.string() for name in (MANIFEST_PATH_COLUMN, "label", "image_id", "captured_at")},
            ))
            yield from reader
        else:
            raise LandError(f"{manifest}: a manifest must be a .csv or .parquet file")
    except (pa.ArrowInvalid, OSError) as error:
        raise LandError(f"{manifest}: not a readable manifest ({str(error).splitlines()[0]})") from None


def manifest_items(manifest: Path, labels: Labels, problems: list[str]) -> Iterator[SourceItem]:
    """The rows of a manifest, one item each, in order; a path relative to the manifest's folder."""
    row = 0
    seen: dict[str, int] = {}
    for batch in _manifest_batches(manifest):
        columns = batch.schema.names
        if MANIFEST_PATH_COLUMN not in columns:
            raise LandError(f"{manifest}: no {MANIFEST_PATH_COLUMN!r} column (it has {', '.join(columns)})")
        if labels == "manifest" and "label" not in columns:
            raise LandError(f"{manifest}: no 'label' column; land with --labels none to land the images unlabeled")
        frame = pl.from_arrow(batch)
        for record in frame.iter_rows(named=True):
            row += 1
            where = f"{manifest}: row {row}"
            location = record[MANIFEST_PATH_COLUMN]
            if not location:
                problems.append(f"{where}: {MANIFEST_PATH_COLUMN} is empty: skipped")
                continue
            location = str(location)
            if "://" not in location and not Path(location).is_absolute():
                location = str(manifest.parent / location)
            if location in seen:
                problems.append(f"{where}: {location} is the same as row {seen[location]}: skipped")
                continue
            seen[location] = row
            label = record.get("label") if labels == "manifest" else None
            try:
                captured = _timestamp(record.get("captured_at"))
            except ValueError:
                problems.append(f"{where}: captured_at {record.get('captured_at')!r} is not a timestamp: skipped")
                continue
            yield SourceItem(
                location, f"{where} ({location})", label=None if label is None else class_name(str(label)) or None,
                image_id=record.get("image_id") or None, captured_at=captured,
            )


def _timestamp(value: object) -> datetime | None:
    if value is None or value == "":
        return None
    stamp = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)


# --- reading and checking one item ----------------------------------------------------------------

def read_item(location: str) -> bytes:
    """The bytes of a local file or of a URI through fsspec; OSError (and fsspec's own errors) on failure."""
    if "://" not in location:
        return Path(location).read_bytes()
    with fsspec.open(location, "rb") as handle:
        return handle.read()


def image_problem(data: bytes) -> str | None:
    """Why the bytes are not an image PIL can open (the header only: ingestion decodes in full)."""
    if not data:
        return "the file is empty"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        return f"not a readable image ({str(error).splitlines()[0] if str(error) else type(error).__name__})"
    return None


def content_image_id(data: bytes) -> str:
    return "img-" + hashlib.sha256(data).hexdigest()[:32]


# --- writing batches --------------------------------------------------------------------------------

def landed_image_ids(landing: Path) -> set[str]:
    """Image ids of every batch already in the landing folder (only that column is read; a file
    that cannot be read is ingestion's to report, not a reason to stop landing)."""
    ids: set[str] = set()
    for path in landed_files(landing) if landing.is_dir() else []:
        try:
            ids.update(pl.read_parquet(path, columns=["image_id"])["image_id"].drop_nulls().cast(pl.Utf8).to_list())
        except Exception:  # noqa: BLE001 - damaged or foreign files of any kind
            continue
    return ids


def next_batch_ids(landing: Path, prefix: str) -> Iterator[str]:
    """`<prefix>-000`, `<prefix>-001`, ... after the highest number already landed with that prefix."""
    check_batch_id(f"{prefix}-000")
    numbers = [int(p.stem.rsplit("-", 1)[1]) for p in landed_files(landing) if re.fullmatch(re.escape(prefix) + r"-\d+", p.stem)]
    number = max(numbers, default=-1) + 1
    while True:
        yield check_batch_id(f"{prefix}-{number:03d}")
        number += 1


def land(
    source: Source, landing: Path, prefix: str, batch_size: int, problems: list[str],
    progress: Callable[[int], None] = lambda _: None,
) -> LandReport:
    """Stream the source's items into landing batches of at most `batch_size` new images each."""
    if batch_size < 1:
        raise LandError(f"batch size must be at least 1, got {batch_size}")
    report = LandReport(problems=problems)
    known = landed_image_ids(landing)
    batch_ids = next_batch_ids(landing, prefix)
    writer: LandingFileWriter | None = None
    rows: list[dict] = []  # the row group being gathered
    row_bytes = 0
    landed_at = datetime.now(timezone.utc)

    def flush() -> None:
        nonlocal row_bytes
        writer.write(pa.Table.from_pylist(rows, schema=LANDING_SCHEMA))
        rows.clear()
        row_bytes = 0

    def commit() -> None:
        nonlocal writer
        report.written.append(writer.commit())
        report.landed += writer.rows
        writer = None

    try:
        for item in source.items:
            progress(1)
            data = _checked_bytes(item, problems)
            if data is None:
                continue
            image_id = item.image_id or content_image_id(data)
            if image_id in known:
                report.already_landed += 1
                continue
            known.add(image_id)
            if writer is None:
                writer = LandingFileWriter(landing, next(batch_ids), LANDING_SCHEMA, source.classes)
            rows.append({
                "image_id": image_id, "image": data, "label": item.label,
                "captured_at": item.captured_at or landed_at, "source": item.location,
            })
            row_bytes += len(data)
            if row_bytes >= ROW_GROUP_BYTES or writer.rows + len(rows) == batch_size:
                flush()
            if writer.rows == batch_size:
                commit()
        if writer is not None:
            if rows:
                flush()
            commit()
    finally:
        if writer is not None:
            writer.abort()
    return report


def _checked_bytes(item: SourceItem, problems: list[str]) -> bytes | None:
    """The item's bytes if it can land; otherwise None, and one line in `problems` saying why."""
    if item.label is not None and (problem := class_name_problem(item.label)):
        problems.append(f"{item.where}: {problem}: skipped")
        return None
    try:
        data = read_item(item.location)
    except FileNotFoundError as error:
        # fsspec says which part is missing (the bucket, the object); a local file is just missing.
        detail = f"not found ({error})" if "://" in item.location and str(error) else "file not found"
        problems.append(f"{item.where}: {detail}: skipped")
        return None
    except Exception as error:  # fsspec backends raise their own types for unreachable URIs
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        problems.append(f"{item.where}: cannot be read ({type(error).__name__}: {reason}): skipped")
        return None
    if problem := image_problem(data):
        problems.append(f"{item.where}: {problem}: skipped")
        return None
    return data


@dataclass(frozen=True)
class Source:
    items: Iterator[SourceItem]
    total: int | None  # known for a folder (for the progress bar)
    classes: list[str]  # every class name the source labels with, sorted: the landing declares them


def open_source(source: str, labels: Labels | None, problems: list[str]) -> Source:
    """SOURCE (a folder or a manifest) as items. `labels` None: class folders for a folder, the
    manifest's `label` column when it has one. Counting and collecting the class names is a first,
    cheap pass (names and one column, no image bytes)."""
    path = Path(source)
    if path.is_dir():
        labels = labels or "folders"
        if labels == "manifest":
            raise LandError(f"{source}: a folder has no manifest column; use --labels folders or none")
        count, classes = 0, set()
        for item in folder_items(path, labels, []):
            count += 1
            if item.label is not None:
                classes.add(item.label)
        if count == 0:
            raise LandError(
                f"{source}: no images found ({', '.join(sorted(IMAGE_SUFFIXES))})"
                + (" inside class folders (SOURCE/<class>/<image>)" if labels == "folders" else "")
            )
        return Source(folder_items(path, labels, problems), count, sorted(classes))
    if path.is_file():
        if labels == "folders":
            raise LandError(f"{source}: a manifest has no class folders; use --labels manifest or none")
        if labels is None:
            labels = "manifest" if "label" in _manifest_columns(path) else "none"
        classes = _manifest_label_names(path) if labels == "manifest" else []
        return Source(manifest_items(path, labels, problems), None, classes)
    raise LandError(f"{source}: no such folder or manifest file")


def _manifest_label_names(manifest: Path) -> list[str]:
    names: set[str] = set()
    for batch in _manifest_batches(manifest):
        if "label" in batch.schema.names:
            column = label_text(pl.from_arrow(batch.select(["label"]))["label"]).drop_nulls()
            names.update(name for name in column.to_list() if name and class_name_problem(name) is None)
    return sorted(names)


def _manifest_columns(manifest: Path) -> list[str]:
    for batch in _manifest_batches(manifest):
        return batch.schema.names
    return []


def default_prefix(source: str) -> str:
    """A batch id prefix from the source's name: its letters, digits, _ and -."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(source.rstrip("/")).stem).strip("-")
    return (name or "landed")[:48]
