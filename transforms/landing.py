"""The landing contract: batch ids, reading a landing file, and row-by-row validation done in bulk.

A batch is `landing/<batch_id>.parquet` with `image_id` utf8, `image` binary (PNG, JPEG, WebP, ...), `label`
a class name or index (nullable) and `captured_at` timestamp; other columns ride along as metadata. A file that
cannot be read at all raises `LandingFileError`; every bad row of a readable file is quarantined
with a machine-readable reason and a message naming the file, the row and the cause.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from transforms.classes import label_index, unknown_label_message
from transforms.images import STAT_COLUMNS, STATISTICS_PIXELS, DecodedImage, ImageRejected, StatisticsCollector, decode_image

BATCH_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
IMAGE_ID_PATTERN = r"^[A-Za-z0-9_.:/-]{1,128}$"
REQUIRED_COLUMNS = ("image_id", "image", "label", "captured_at")
PARQUET_MAGIC = b"PAR1"  # a parquet file starts and ends with it
# flywheel writes a landing file in row groups of about this many image bytes: what reads one (land,
# ingestion, predict) holds a row group at a time, whatever the size of the batch.
ROW_GROUP_BYTES = 16 * 2**20

# Machine-readable quarantine reasons, each with the sentence a person reads.
REASONS = {
    "missing_image_id": "image_id is null or empty",
    "invalid_image_id": "image_id must be 1-128 characters of letters, digits and _ . : / -",
    "duplicate_image_id": "image_id appears more than once in this batch",
    "image_id_exists": "image_id already belongs to another batch",
    "unknown_class": "the label names no class of the project",
    "missing_captured_at": "captured_at is null",
    "missing_image": "the image bytes are empty",
    "undecodable_image": "the bytes are not a readable image",
    "unsupported_format": "the image is not PNG, JPEG, WebP, BMP, GIF or TIFF",
    "unsupported_mode": "the image mode is not L, LA, RGB, RGBA, P, PA or CMYK",
    "image_too_large": "the image has more pixels than the configured limit",
    "duplicate_content": "the same image bytes already appear under another image_id",
}

QUARANTINE_SCHEMA = {
    "batch_id": pl.Utf8,
    "image_id": pl.Utf8,
    "row_number": pl.Int64,
    "reason": pl.Utf8,
    "message": pl.Utf8,
}


class LandingFileError(Exception):
    """A landing file that cannot be ingested at all. The message names the file and the cause."""


def check_batch_id(batch_id: str) -> str:
    """Return `batch_id` if it matches the contract; it is then safe in a path and a query."""
    if not isinstance(batch_id, str) or not BATCH_ID_PATTERN.fullmatch(batch_id):
        raise LandingFileError(
            f"batch id {batch_id!r} is not allowed: it must match [A-Za-z0-9_-]{{1,64}}"
        )
    return batch_id


def landed_files(landing: Path) -> list[Path]:
    """The landing folder's batch files. Names starting with "." are copies in progress (the way
    rsync and `flywheel simulate` write: a hidden name, renamed when complete), never read."""
    return sorted(path for path in landing.glob("*.parquet") if not path.name.startswith("."))


def batch_id_of(path: Path) -> str:
    if path.suffix != ".parquet":
        raise LandingFileError(f"{path}: landing files must end in .parquet")
    return check_batch_id(path.stem)


@dataclass(frozen=True)
class ValidationRules:
    """What decides which rows are accepted, beside the data: with the file's bytes, the fingerprint
    of an ingestion. `classes` are the configured ones (empty: discovered, see transforms.classes)."""

    classes: tuple[str, ...]
    max_pixels: int


@dataclass(frozen=True)
class ValidatedBatch:
    batch_id: str
    path: Path  # the landing file: `accepted_image_chunks` reads the accepted images' bytes from it
    images: pl.DataFrame  # one row per accepted image, for raw_images but its bytes; `label` is the class index
    quarantined: pl.DataFrame  # QUARANTINE_SCHEMA
    classes: list[str]  # the project's classes after this batch (indices are positions)

    @property
    def row_count(self) -> int:
        return self.images.height + self.quarantined.height


CLASSES_METADATA_KEY = b"flywheel.classes"


def declare_classes(classes: list[str]) -> dict[bytes, bytes]:
    """Parquet key-value metadata by which a landing file names every class of its landing (all its
    files), so the first labeled landing decides the classes as a whole, not batch file by batch file."""
    return {CLASSES_METADATA_KEY: json.dumps(classes).encode()} if classes else {}


def declared_classes(path: Path) -> list[str]:
    """The class names a landing file declares (none for files flywheel did not write)."""
    metadata = pq.read_schema(path).metadata or {}
    try:
        names = json.loads(metadata.get(CLASSES_METADATA_KEY, b"[]"))
    except ValueError:
        return []
    return [name for name in names if isinstance(name, str)] if isinstance(names, list) else []


class ParquetFileWriter:
    """A parquet file written row group by row group as its rows arrive: under a hidden name, fsynced,
    then renamed into place complete by `commit`, so a reader sees the whole file or none. Memory holds
    one row group (about `row_group_bytes` of images), whatever the size of the file; a writer left
    without `commit` removes its partial file, so a failure leaves nothing half written behind."""

    def __init__(self, path: Path, schema: pa.Schema, row_group_bytes: int = ROW_GROUP_BYTES):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._partial = path.with_name(f".{path.name}.partial")
        self.schema = schema
        self._row_group_bytes = row_group_bytes
        self._writer = pq.ParquetWriter(self._partial, self.schema)
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        """Append rows, in row groups of about `row_group_bytes` of images each."""
        table = table.cast(self.schema)
        size = table.column("image").nbytes if "image" in table.column_names else table.nbytes
        self._writer.write_table(table, row_group_size=max(1, table.num_rows * self._row_group_bytes // max(size, 1)))
        self.rows += table.num_rows

    def commit(self) -> Path:
        self._writer.close()
        with open(self._partial, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(self._partial, self.path)
        return self.path

    def abort(self) -> None:
        self._writer.close()
        self._partial.unlink(missing_ok=True)

    def __enter__(self) -> ParquetFileWriter:
        return self

    def __exit__(self, error_type, *_) -> None:
        if error_type is not None:
            self.abort()


class LandingFileWriter(ParquetFileWriter):
    """A landing batch `landing/<batch_id>.parquet`, written the way the landing sensor expects: it
    sees the file only once complete (see ParquetFileWriter)."""

    def __init__(self, landing: Path, batch_id: str, schema: pa.Schema, classes: list[str] | None = None):
        path = landing / f"{check_batch_id(batch_id)}.parquet"
        super().__init__(path, schema.with_metadata({**(schema.metadata or {}), **declare_classes(classes or [])}))


def write_landing_file(landing: Path, batch_id: str, frame: pl.DataFrame, classes: list[str] | None = None) -> Path:
    """Write a whole frame as `landing/<batch_id>.parquet` (see LandingFileWriter)."""
    table = frame.to_arrow()
    with LandingFileWriter(landing, batch_id, table.schema, classes) as writer:
        writer.write(table)
        return writer.commit()


def read_landing_file(path: Path) -> pl.DataFrame:
    """Read a landing file and check its columns, or raise LandingFileError naming file and cause."""
    if not path.is_file():
        raise LandingFileError(f"{path}: landing file does not exist")
    if not path.resolve().is_relative_to(path.parent.resolve()):
        raise LandingFileError(f"{path}: links to {path.resolve()}, outside the landing folder; refusing to read it")
    size = path.stat().st_size
    if size == 0:
        raise LandingFileError(f"{path}: landing file is empty (0 bytes)")
    with open(path, "rb") as handle:
        head = handle.read(4)
        handle.seek(max(0, size - 4))
        tail = handle.read(4)
    if head == PARQUET_MAGIC and tail != PARQUET_MAGIC:
        raise LandingFileError(
            f"{path}: not a readable parquet file: it ends before the parquet footer (damaged, or still being "
            "copied? It is ingested once complete; copy under a name starting with '.' and rename it to avoid this)"
        )
    try:
        schema = pq.read_schema(path)
    except Exception as error:  # pyarrow raises several types for damaged files
        raise LandingFileError(f"{path}: not a readable parquet file ({type(error).__name__}: {error})") from None
    missing = [column for column in REQUIRED_COLUMNS if column not in schema.names]
    if missing:
        raise LandingFileError(
            f"{path}: missing required column(s) {', '.join(missing)}; "
            f"a landing file needs {', '.join(REQUIRED_COLUMNS)}"
        )
    image_type = schema.field("image").type
    if not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type) or pa.types.is_null(image_type)
            or image_type == pa.binary_view()):
        raise LandingFileError(f"{path}: wrong column type(s): image is {image_type}, expected binary")
    try:
        frame = pl.read_parquet(path, columns=[name for name in schema.names if name != "image"])
    except Exception as error:  # polars raises several types for damaged files
        raise LandingFileError(f"{path}: not a readable parquet file ({type(error).__name__}: {error})") from None
    return _conform_types(path, frame)


def image_chunks(path: Path, rows: int | None = None) -> Iterator[list[bytes | None]]:
    """The `image` column of a landing file in row order, a row group (or `rows` of it) at a time:
    memory holds one row group (flywheel writes row groups of ROW_GROUP_BYTES)."""
    try:
        parquet = pq.ParquetFile(path)
        # Row group by row group: `iter_batches` reads ahead across row groups, holding several.
        for group in range(parquet.num_row_groups):
            column = parquet.read_row_group(group, columns=["image"], use_threads=False).column(0)
            step = rows or max(len(column), 1)
            for start in range(0, len(column), step):
                yield column.slice(start, step).to_pylist()
            del column
    except (pa.ArrowException, OSError) as error:
        raise LandingFileError(f"{path}: the image column cannot be read ({type(error).__name__}: {error})") from None


def row_group_images(path: Path, group: int) -> list[bytes | None]:
    """The `image` column of one row group of a landing file (a Ray Data task reads its own)."""
    try:
        return pq.ParquetFile(path).read_row_group(group, columns=["image"], use_threads=False).column(0).to_pylist()
    except (pa.ArrowException, OSError) as error:
        raise LandingFileError(f"{path}: the image column cannot be read ({type(error).__name__}: {error})") from None


def _conform_types(path: Path, frame: pl.DataFrame) -> pl.DataFrame:
    schema = frame.schema
    problems = []
    casts = []
    if schema["image_id"] in (pl.Utf8, pl.Null) or isinstance(schema["image_id"], pl.Categorical):
        casts.append(pl.col("image_id").cast(pl.Utf8))
    else:
        problems.append(f"image_id is {schema['image_id']}, expected a string")
    if schema["label"].is_integer() or schema["label"] in (pl.Utf8, pl.Null) or isinstance(schema["label"], pl.Categorical):
        casts.append(pl.col("label").cast(pl.Utf8))
    else:
        problems.append(f"label is {schema['label']}, expected a class name or an integer index")
    captured = schema["captured_at"]
    if isinstance(captured, pl.Datetime):
        as_utc = (
            pl.col("captured_at").dt.replace_time_zone("UTC")
            if captured.time_zone is None
            else pl.col("captured_at").dt.convert_time_zone("UTC")
        )
        casts.append(as_utc.dt.cast_time_unit("us"))
    elif captured in (pl.Date, pl.Null):
        casts.append(pl.col("captured_at").cast(pl.Datetime("us", "UTC")))
    else:
        problems.append(f"captured_at is {captured}, expected a timestamp")
    if problems:
        raise LandingFileError(f"{path}: wrong column type(s): {'; '.join(problems)}")
    return frame.with_columns(casts)


# (image ids, content hashes) of a batch -> those of them that other batches already hold.
ExistingKeys = Callable[[list[str], list[str]], tuple[set[str], set[str]]]


def _nothing_exists(image_ids: list[str], content_hashes: list[str]) -> tuple[set[str], set[str]]:
    return set(), set()


@dataclass
class Measurements:
    """What one pass over a landing file's image bytes yields, by row number: each decoded image's facts
    (its pixels dropped), content hash and statistics, or why it was rejected; and the rows read."""

    decoded: dict[int, DecodedImage] = field(default_factory=dict)
    content_hashes: dict[int, str] = field(default_factory=dict)
    statistics: dict[int, np.ndarray] = field(default_factory=dict)
    rejected: dict[int, tuple[str, str | None]] = field(default_factory=dict)  # row -> (reason, message; None: the reason's sentence)
    rows: int = 0

    def update(self, other: "Measurements") -> None:
        for name in ("decoded", "content_hashes", "statistics", "rejected"):
            getattr(self, name).update(getattr(other, name))
        self.rows += other.rows


def measure_images(images: list[bytes | None], first_row: int, to_decode: set[int], max_pixels: int) -> Measurements:
    """Hash, decode and measure the images of consecutive rows from `first_row` (1-based) that are in
    `to_decode`: the per-image work of ingestion, on one machine or as a Ray Data task."""
    measured = Measurements(rows=len(images))
    statistics = StatisticsCollector()
    for row_number, data in enumerate(images, start=first_row):
        if row_number not in to_decode:
            continue
        if not data:
            measured.rejected[row_number] = ("missing_image", None)
            continue
        try:
            image = decode_image(data, max_pixels, fit_pixels=STATISTICS_PIXELS)
        except ImageRejected as failure:
            measured.rejected[row_number] = (failure.reason, failure.message)
            continue
        measured.content_hashes[row_number] = _sha256(data)
        statistics.add(row_number, image.pixels)
        measured.decoded[row_number] = replace(image, pixels=None)
    measured.statistics = statistics.values()
    return measured


def measure_landing_file(path: Path, to_decode: set[int], max_pixels: int) -> Measurements:
    """`measure_images` over the whole file in this process, a row group at a time."""
    measured = Measurements()
    for chunk in image_chunks(path):
        measured.update(measure_images(chunk, measured.rows + 1, to_decode, max_pixels))
    return measured


Measure = Callable[[Path, set[int], int], Measurements]


def validate_batch(
    path: Path, frame: pl.DataFrame, rules: ValidationRules, classes: list[str], existing: ExistingKeys = _nothing_exists,
    measure: Measure = measure_landing_file,
) -> ValidatedBatch:
    """Split a conformed landing frame into accepted images (decoded, with statistics) and quarantine.

    Each row gets the first reason that applies; checks that need no decoding run in bulk first, so
    only rows that can still be accepted are decoded, by `measure` (here, or on a Ray cluster:
    `training.ray_data`). Labels (names or indices) become indices of `classes`. `existing` looks
    up ids and image contents that earlier batches already hold.
    """
    batch_id = batch_id_of(path)
    extra_columns = [column for column in frame.columns if column not in REQUIRED_COLUMNS]
    rows = frame.with_row_index("row_number", offset=1).with_columns(
        pl.col("row_number").cast(pl.Int64),
        pl.col("label").alias("label_as_landed"),
        label_index(pl.col("label"), classes).alias("label"),
    )
    ids_in_other_batches, _ = existing(rows["image_id"].drop_nulls().to_list(), [])
    image_id = pl.col("image_id")
    reason = (
        pl.when(image_id.is_null() | (image_id.str.strip_chars() == ""))
        .then(pl.lit("missing_image_id"))
        .when(~image_id.str.contains(IMAGE_ID_PATTERN))
        .then(pl.lit("invalid_image_id"))
        .when(image_id.is_duplicated())
        .then(pl.lit("duplicate_image_id"))
        .when(image_id.is_in(list(ids_in_other_batches)))
        .then(pl.lit("image_id_exists"))
        .when(pl.col("label_as_landed").is_not_null() & pl.col("label").is_null())
        .then(pl.lit("unknown_class"))
        .when(pl.col("captured_at").is_null())
        .then(pl.lit("missing_captured_at"))
        .otherwise(pl.lit(None, dtype=pl.Utf8))
    )
    rows = rows.with_columns(reason.alias("reason"))
    unknown = rows.filter(pl.col("reason") == "unknown_class")["label_as_landed"].unique().to_list()
    rows = rows.with_columns(
        pl.when(pl.col("reason") == "unknown_class")
        .then(pl.col("label_as_landed").replace_strict({label: unknown_label_message(label, classes) for label in unknown}, default=None))
        .otherwise(pl.lit(None, dtype=pl.Utf8))
        .alias("detail")
    )

    to_decode = set(rows.filter(pl.col("reason").is_null())["row_number"].to_list())
    measured = measure(path, to_decode, rules.max_pixels)
    if measured.rows != rows.height:
        raise LandingFileError(f"{path}: {rows.height} rows but {measured.rows} images; the file changed while it was read")
    decoded, content_hashes, rejected = measured.decoded, measured.content_hashes, measured.rejected
    if rejected:
        failures = pl.DataFrame(
            {
                "row_number": list(rejected),
                "decode_reason": [reason for reason, _ in rejected.values()],
                "decode_detail": [detail for _, detail in rejected.values()],
            },
            schema={"row_number": pl.Int64, "decode_reason": pl.Utf8, "decode_detail": pl.Utf8},
        )
        rows = (
            rows.join(failures, on="row_number", how="left", maintain_order="left")
            .with_columns(
                pl.coalesce("reason", "decode_reason").alias("reason"),
                pl.coalesce("detail", "decode_detail").alias("detail"),
            )
            .drop("decode_reason", "decode_detail")
        )
    hashes = pl.DataFrame(
        {"row_number": list(content_hashes), "content_hash": list(content_hashes.values())},
        schema={"row_number": pl.Int64, "content_hash": pl.Utf8},
    )
    rows = rows.join(hashes, on="row_number", how="left", maintain_order="left")
    _, hashes_in_other_batches = existing([], list(content_hashes.values()))

    # Same bytes under two ids: the first accepted occurrence wins.
    ok = pl.col("reason").is_null()
    first_of_content = pl.col("row_number") == pl.col("row_number").filter(ok).min().over("content_hash")
    rows = rows.with_columns(
        pl.when(ok & (pl.col("content_hash").is_in(list(hashes_in_other_batches)) | ~first_of_content))
        .then(pl.lit("duplicate_content"))
        .otherwise(pl.col("reason"))
        .alias("reason")
    )

    quarantined = rows.filter(pl.col("reason").is_not_null()).select(
        pl.lit(batch_id).alias("batch_id"),
        "image_id",
        "row_number",
        "reason",
        pl.format(
            "{}: row {} (image_id {}): {}",
            pl.lit(str(path)),
            "row_number",
            pl.col("image_id").fill_null("<null>"),
            pl.coalesce("detail", pl.col("reason").replace_strict(REASONS, default=pl.col("reason"))),
        ).alias("message"),
    )
    accepted = rows.filter(pl.col("reason").is_null()).sort("row_number")
    return ValidatedBatch(
        batch_id=batch_id,
        path=path,
        images=_accepted_images(batch_id, accepted, decoded, measured.statistics, extra_columns),
        quarantined=quarantined.cast(QUARANTINE_SCHEMA),
        classes=classes,
    )


def accepted_image_chunks(batch: ValidatedBatch, rows: int | None = None) -> Iterator[pl.DataFrame]:
    """The accepted images with their bytes (the `image` column), read again from the landing file a
    row group (or `rows`) at a time. Bytes that no longer match the validated content hash (the file was replaced
    meanwhile) raise LandingFileError: nothing unvalidated is stored."""
    row_numbers = batch.images["row_number"].to_numpy()
    first = 0  # row numbers start at 1
    for chunk in image_chunks(batch.path, rows):
        low, high = np.searchsorted(row_numbers, [first + 1, first + len(chunk) + 1])
        part = batch.images.slice(low, high - low)
        data = [chunk[row - first - 1] for row in part["row_number"]]
        if [_sha256(image) for image in data] != part["content_hash"].to_list():
            raise LandingFileError(f"{batch.path}: the file changed while it was ingested; ingest it again")
        first += len(chunk)
        yield part.with_columns(pl.Series("image", data, dtype=pl.Binary))


def ingestion_fingerprint(file_sha256: str | None, rules: ValidationRules) -> str:
    """What ingesting a file yields depends on: its bytes (their sha256) and the validation rules."""
    return hashlib.sha256(f"{file_sha256}|{json.dumps(asdict(rules), sort_keys=True)}".encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """Content digest of a landing file: a batch is re-ingested only when this changes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha256(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def _accepted_images(
    batch_id: str, accepted: pl.DataFrame, decoded: dict[int, DecodedImage], statistics: dict, extra_columns: list[str],
) -> pl.DataFrame:
    images = [decoded[row] for row in accepted["row_number"]]
    stats = np.array([statistics[row] for row in accepted["row_number"]]).reshape(-1, len(STAT_COLUMNS))

    metadata = (
        pl.struct([pl.col(c).cast(pl.Utf8, strict=False) for c in extra_columns]).struct.json_encode()
        if extra_columns
        else pl.lit(None, dtype=pl.Utf8)
    )
    return accepted.select(
        pl.lit(batch_id).alias("batch_id"),
        "image_id",
        "row_number",
        "label",
        "captured_at",
        "content_hash",
        pl.Series("format", [image.format for image in images], dtype=pl.Utf8),
        pl.Series("mode", [image.mode for image in images], dtype=pl.Utf8),
        pl.Series("width", [image.width for image in images], dtype=pl.Int32),
        pl.Series("height", [image.height for image in images], dtype=pl.Int32),
        *[pl.Series(name, stats[:, i], dtype=pl.Float64) for i, name in enumerate(STAT_COLUMNS)],
        metadata.alias("metadata"),
    )
