"""The DuckDB warehouse: raw tables written by ingestion, and the reads later stages make.

dbt owns every table but `raw_images`, `quarantined_images`, `raw_labels`, `ingested_files` and `classes`. DuckDB allows one
writing process at a time, which the orchestrator guarantees with a concurrency pool of 1. The image
bytes live in the image store beside the warehouse file (`transforms.image_store`); `raw_images`
holds where each image is (`image_pack`, `image_row`) and its content hash.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa

from transforms.image_store import GatheredPixels, ImageStore, PackPixels, stored_pixels
from transforms.images import STAT_COLUMNS, STATISTICS_PIXELS, Preprocessing, StatisticsCollector
from transforms.labels import LabelSet
from transforms.landing import ValidatedBatch, accepted_image_chunks

_STAT_DDL = ",\n    ".join(f"{name} DOUBLE NOT NULL" for name in STAT_COLUMNS)
SCHEMA_DDL = f"""
CREATE TABLE IF NOT EXISTS raw_images (
    batch_id VARCHAR NOT NULL,
    image_id VARCHAR NOT NULL,
    row_number BIGINT NOT NULL,
    label BIGINT,
    captured_at TIMESTAMPTZ NOT NULL,
    image_pack VARCHAR NOT NULL,
    image_row BIGINT NOT NULL,
    content_hash VARCHAR NOT NULL,
    format VARCHAR NOT NULL,
    mode VARCHAR NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    {_STAT_DDL},
    metadata VARCHAR,
    ingested_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS raw_labels (
    image_id VARCHAR NOT NULL,
    label BIGINT NOT NULL,
    label_file VARCHAR NOT NULL,
    labeled_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS ingested_files (
    batch_id VARCHAR NOT NULL,
    fingerprint VARCHAR NOT NULL,
    accepted BIGINT NOT NULL,
    quarantined BIGINT NOT NULL,
    ingested_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS classes (
    class_index INTEGER PRIMARY KEY,
    class_name VARCHAR NOT NULL UNIQUE,
    added_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantined_images (
    batch_id VARCHAR NOT NULL,
    image_id VARCHAR,
    row_number BIGINT NOT NULL,
    reason VARCHAR NOT NULL,
    message VARCHAR NOT NULL,
    quarantined_at TIMESTAMPTZ NOT NULL
);
"""


class WarehouseBusy(Exception):
    """Another process kept the warehouse file locked for longer than the caller would wait."""


# Within flywheel the concurrency pool keeps writers apart; this wait covers anything outside it
# (a `dbt build` or a notebook holding the file), which gets a message instead of a lock error.
LOCK_WAIT_SECONDS = 120.0


def _open(path: Path, read_only: bool, wait_seconds: float) -> duckdb.DuckDBPyConnection:
    deadline = time.monotonic() + wait_seconds
    delay = 0.05
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.IOException as error:
            if "lock" not in str(error).lower():
                raise
            if time.monotonic() >= deadline:
                holder = str(error).partition("Conflicting lock is held in ")[2] or str(error)
                raise WarehouseBusy(
                    f"the warehouse {path} stayed locked for {wait_seconds:.0f} s by another process ({holder.strip()}); "
                    "DuckDB allows one process at a time: run again once it has finished"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


@contextmanager
def connect(
    path: Path, read_only: bool = False, wait_seconds: float = LOCK_WAIT_SECONDS
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection to the warehouse file, waiting up to `wait_seconds` while another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if read_only and not path.exists():
        raise FileNotFoundError(f"warehouse {path} does not exist yet: ingest a batch first")
    connection = _open(path, read_only, wait_seconds)
    try:
        if not read_only:
            connection.execute(SCHEMA_DDL)
            move_image_bytes_to_store(connection)
            add_missing_statistics(connection)
        yield connection
    finally:
        connection.close()


def image_store(connection: duckdb.DuckDBPyConnection) -> ImageStore:
    """The store of the warehouse's image bytes: `images/` beside the warehouse file."""
    path = connection.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchone()[0]
    return ImageStore(Path(path).parent / "images")


def prepare(path: Path) -> None:
    """Create the raw tables, or bring an earlier flywheel's up to date, before dbt reads them."""
    with connect(path):
        pass


def _raw_image_columns(connection: duckdb.DuckDBPyConnection) -> set[str]:
    return {row[0] for row in connection.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'raw_images'"
    ).fetchall()}


# Pointing the rows of an earlier flywheel's warehouse at the packs their bytes moved to
# (`move_image_bytes_to_store`): a pack holds its batch's rows in row_number order.
# DuckDB refuses ALTER TABLE after an UPDATE of the same table in one transaction: the table is rebuilt.
ADD_IMAGE_LOCATION = """
CREATE TABLE raw_images_located AS
SELECT r.* EXCLUDE (image), m.image_pack,
    row_number() OVER (PARTITION BY r.batch_id ORDER BY r.row_number) - 1 AS image_row
FROM raw_images AS r JOIN moved_packs AS m USING (batch_id);
DROP TABLE raw_images;
ALTER TABLE raw_images_located RENAME TO raw_images;
"""
# The rebuilt table's constraints, added once nothing is outstanding (after the commit). Statistics
# columns stay as they were: those `add_missing_statistics` adds are nullable until backfilled.
REQUIRED_RAW_IMAGE_COLUMNS = (
    "batch_id", "image_id", "row_number", "captured_at", "image_pack", "image_row", "content_hash",
    "format", "mode", "width", "height", "ingested_at",
)
REQUIRE_RAW_IMAGE_COLUMNS = ";\n".join(
    f"ALTER TABLE raw_images ALTER COLUMN {name} SET NOT NULL" for name in REQUIRED_RAW_IMAGE_COLUMNS
)


def move_image_bytes_to_store(connection: duckdb.DuckDBPyConnection, rows_per_fetch: int = 256) -> int:
    """An earlier flywheel kept the image bytes in `raw_images.image`: write them to the image store,
    one pack per batch (streamed, a few hundred rows at a time), then, in one transaction, rebuild
    `raw_images` pointing at them, without the column. Nothing stored is lost: the bytes are in the
    packs before the column goes. Returns the number of images moved (none on an up-to-date warehouse)."""
    if "image" not in _raw_image_columns(connection):
        return 0
    store = image_store(connection)
    batches = connection.execute(
        "SELECT DISTINCT r.batch_id, coalesce(f.fingerprint, 'moved') FROM raw_images AS r "
        "LEFT JOIN ingested_files AS f USING (batch_id) ORDER BY r.batch_id"
    ).fetchall()
    packs = {}
    for batch_id, fingerprint in batches:
        images = connection.execute(
            "SELECT image_id, content_hash, image FROM raw_images WHERE batch_id = $batch ORDER BY row_number",
            {"batch": batch_id},
        ).fetch_record_batch(rows_per_fetch)
        packs[batch_id] = store.write_pack(batch_id, fingerprint, (pl.from_arrow(chunk) for chunk in images))
    pack_of_batch = pa.table({"batch_id": list(packs), "image_pack": list(packs.values())})  # noqa: F841 - replacement scan
    with transaction(connection):
        connection.execute("CREATE TEMP TABLE moved_packs AS SELECT * FROM pack_of_batch")
        connection.execute(ADD_IMAGE_LOCATION)
        connection.execute("DROP TABLE moved_packs")
        moved = connection.execute("SELECT count(*) FROM raw_images").fetchone()[0]
    connection.execute(REQUIRE_RAW_IMAGE_COLUMNS)
    # The bytes' pages become free for reuse within the file once checkpointed.
    connection.execute("CHECKPOINT")
    return moved


# Bringing a warehouse of an earlier flywheel up to today's statistics (`add_missing_statistics`).
# Constants: column names come from STAT_COLUMNS, never from data.
ADD_STATISTIC_COLUMNS = ";\n".join(f"ALTER TABLE raw_images ADD COLUMN IF NOT EXISTS {name} DOUBLE" for name in STAT_COLUMNS)
CREATE_BACKFILL = f"CREATE TEMP TABLE backfilled (batch_id VARCHAR, image_id VARCHAR, {_STAT_DDL})"
# Only what is missing is filled: statistics already stored keep their values.
APPLY_BACKFILL = (
    "UPDATE raw_images SET "
    + ", ".join(f"{name} = coalesce(raw_images.{name}, c.{name})" for name in STAT_COLUMNS)
    + " FROM backfilled AS c WHERE raw_images.batch_id = c.batch_id AND raw_images.image_id = c.image_id"
)
# dbt's incremental models over raw_images, rebuilt in full by the next dbt build.
DROP_INCREMENTAL_MODELS = "DROP TABLE IF EXISTS int_images; DROP TABLE IF EXISTS batch_image_stats"


def add_missing_statistics(connection: duckdb.DuckDBPyConnection, page_rows: int = 500) -> list[str]:
    """Bring a warehouse written by an earlier flywheel up to today's `STAT_COLUMNS`: add the
    missing columns, compute them from the stored image bytes (a page of rows at a time, in one
    transaction), and drop dbt's incremental models so the next dbt build recomputes them with the
    new columns. Returns the columns added (none on an up-to-date warehouse)."""
    present = _raw_image_columns(connection)
    missing = [name for name in STAT_COLUMNS if name not in present]
    if not missing:
        return []
    with transaction(connection):
        connection.execute(ADD_STATISTIC_COLUMNS)
        connection.execute(CREATE_BACKFILL)
        store = image_store(connection)
        last = ("", -1)
        while not (page := connection.execute(
            "SELECT batch_id, image_id, image_pack, image_row, content_hash FROM raw_images "
            "WHERE (image_pack, image_row) > ($pack, $row) ORDER BY image_pack, image_row LIMIT $rows",
            {"pack": last[0], "row": last[1], "rows": page_rows},
        ).pl()).is_empty():
            statistics = StatisticsCollector()
            for batch_id, image_id, data in zip(page["batch_id"], page["image_id"], store.read(page)):
                statistics.add((batch_id, image_id), stored_pixels(data, STATISTICS_PIXELS))
            values = statistics.values()
            page_statistics = pa.table({  # noqa: F841 - read by DuckDB's replacement scan
                "batch_id": [key[0] for key in values], "image_id": [key[1] for key in values],
                **{name: [float(row[i]) for row in values.values()] for i, name in enumerate(STAT_COLUMNS)},
            })
            connection.execute("INSERT INTO backfilled BY NAME SELECT * FROM page_statistics")
            last = (page["image_pack"][-1], page["image_row"][-1])
        connection.execute(APPLY_BACKFILL)
        connection.execute("DROP TABLE backfilled")
        connection.execute(DROP_INCREMENTAL_MODELS)
    return missing


@contextmanager
def transaction(connection: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """All or nothing: committed when the block ends, rolled back if anything in it fails."""
    connection.execute("BEGIN TRANSACTION")
    try:
        yield
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def existing_keys(
    connection: duckdb.DuckDBPyConnection, batch_id: str, image_ids: list[str], content_hashes: list[str]
) -> tuple[set[str], set[str]]:
    """Image ids and content hashes of this batch's rows that other batches already hold."""
    # Joined as Arrow tables: DuckDB converts a Python list parameter value by value, slowly.
    candidate_ids = pa.table({"image_id": pa.array(image_ids, pa.string())})  # noqa: F841 - replacement scan
    candidate_hashes = pa.table({"content_hash": pa.array(content_hashes, pa.string())})  # noqa: F841
    ids = connection.execute(
        "SELECT DISTINCT image_id FROM raw_images JOIN candidate_ids USING (image_id) WHERE batch_id <> $batch",
        {"batch": batch_id},
    ).fetchall()
    hashes = connection.execute(
        "SELECT DISTINCT content_hash FROM raw_images JOIN candidate_hashes USING (content_hash) WHERE batch_id <> $batch",
        {"batch": batch_id},
    ).fetchall()
    return {row[0] for row in ids}, {row[0] for row in hashes}


@dataclass(frozen=True)
class LoadCounts:
    images: int
    quarantined: int
    replaced_images: int


def ingested_fingerprint(connection: duckdb.DuckDBPyConnection, batch_id: str) -> str | None:
    """The fingerprint of the file the batch's stored rows came from, or None."""
    row = connection.execute("SELECT fingerprint FROM ingested_files WHERE batch_id = $batch", {"batch": batch_id}).fetchone()
    return row[0] if row else None


def stored_classes(connection: duckdb.DuckDBPyConnection) -> list[str]:
    """The project's class names in index order (empty until the first labeled batch decides them)."""
    rows = connection.execute("SELECT class_name FROM classes ORDER BY class_index").fetchall()
    return [row[0] for row in rows]


def _store_classes(connection: duckdb.DuckDBPyConnection, classes: list[str]) -> None:
    """Append the classes beyond the stored ones; a stored index never changes (checked by the caller)."""
    stored = len(stored_classes(connection))
    for index, name in enumerate(classes[stored:], start=stored):
        connection.execute("INSERT INTO classes VALUES ($index, $name, now())", {"index": index, "name": name})


def replace_batch(connection: duckdb.DuckDBPyConnection, batch: ValidatedBatch, fingerprint: str) -> LoadCounts:
    """Replace every row of `batch.batch_id` in one transaction: never duplicated, never half there.
    `fingerprint` (the file's content and the validation rules) is stored with them, and classes the
    batch added are stored with their indices. The accepted images' bytes go to a new pack of the
    image store first (a row group at a time: memory does not grow with the batch); the batch's
    earlier packs are removed once the warehouse no longer points at them."""
    store = image_store(connection)
    pack = store.write_pack(batch.batch_id, fingerprint, accepted_image_chunks(batch)) if batch.images.height else None
    images = batch.images.with_columns(
        pl.lit(pack, pl.Utf8).alias("image_pack"), pl.int_range(batch.images.height, dtype=pl.Int64).alias("image_row")
    ).to_arrow()
    quarantined = batch.quarantined.to_arrow()
    stored_pack = connection.execute(
        "SELECT any_value(image_pack) FROM raw_images WHERE batch_id = $batch", {"batch": batch.batch_id}
    ).fetchone()[0]
    try:
        replaced = _replace_rows(connection, batch, fingerprint, images, quarantined)
    except BaseException:
        store.keep_only(batch.batch_id, stored_pack)
        raise
    store.keep_only(batch.batch_id, pack)
    return LoadCounts(batch.images.height, batch.quarantined.height, replaced)


def _replace_rows(
    connection: duckdb.DuckDBPyConnection, batch: ValidatedBatch, fingerprint: str, images: pa.Table, quarantined: pa.Table,
) -> int:
    """`replace_batch`'s transaction (DuckDB reads `images` and `quarantined` by name); returns how
    many rows it replaced."""
    with transaction(connection):
        _store_classes(connection, batch.classes)
        connection.execute("DELETE FROM ingested_files WHERE batch_id = $batch", {"batch": batch.batch_id})
        connection.execute(
            "INSERT INTO ingested_files VALUES ($batch, $fingerprint, $accepted, $quarantined, now())",
            {"batch": batch.batch_id, "fingerprint": fingerprint, "accepted": batch.images.height,
             "quarantined": batch.quarantined.height},
        )
        replaced = connection.execute(
            "SELECT count(*) FROM raw_images WHERE batch_id = $batch", {"batch": batch.batch_id}
        ).fetchone()[0]
        connection.execute("DELETE FROM raw_images WHERE batch_id = $batch", {"batch": batch.batch_id})
        connection.execute("DELETE FROM quarantined_images WHERE batch_id = $batch", {"batch": batch.batch_id})
        connection.execute("INSERT INTO raw_images BY NAME SELECT *, now() AS ingested_at FROM images")
        connection.execute("INSERT INTO quarantined_images BY NAME SELECT *, now() AS quarantined_at FROM quarantined")
    return replaced


def replace_labels(connection: duckdb.DuckDBPyConnection, labels: LabelSet) -> int:
    """Replace `raw_labels` (and the label files' quarantine rows) in one transaction."""
    rows = labels.labels.to_arrow()  # noqa: F841 - read by DuckDB's replacement scan
    quarantined = labels.quarantined.to_arrow()  # noqa: F841
    with transaction(connection):
        _store_classes(connection, labels.classes)
        connection.execute("DELETE FROM raw_labels")
        connection.execute("DELETE FROM quarantined_images WHERE batch_id LIKE 'labels/%'")
        connection.execute("INSERT INTO raw_labels BY NAME SELECT * FROM rows")
        connection.execute("INSERT INTO quarantined_images BY NAME SELECT *, now() AS quarantined_at FROM quarantined")
    return labels.labels.height


def late_labeled_batches(connection: duckdb.DuckDBPyConnection) -> list[str]:
    """The batches whose images the late label files label."""
    return [row[0] for row in connection.execute(
        "SELECT DISTINCT batch_id FROM raw_images JOIN raw_labels USING (image_id) ORDER BY batch_id"
    ).fetchall()]


# Decoded images: a whole array in memory, or read a few at a time from the image store's cache.
Pixels = np.ndarray | PackPixels | GatheredPixels


@dataclass(frozen=True)
class Records:
    """Images decoded and resized to the training resolution, in a stable order (the image store's:
    pack by pack, row by row)."""

    images: Pixels  # uint8 [N, R, R, 3]: `images[i]` and `images[a:b]` are arrays
    index: pl.DataFrame  # image_id, batch_id, label (nullable) — row i describes images[i]

    @property
    def labels(self) -> np.ndarray:
        return self.index["label"].to_numpy().astype(np.int64)


def shard_fingerprints(connection: duckdb.DuckDBPyConnection) -> dict[tuple[str, str], str]:
    """A digest per split and batch of exactly what that dataset shard holds (ids, labels, image
    bytes), so a shard is written once and again only when its rows changed."""
    rows = connection.execute(
        """
        SELECT e.split, e.batch_id,
               md5(string_agg(e.image_id || ':' || e.label || ':' || r.content_hash, ',' ORDER BY e.image_id))
        FROM training_examples AS e
        JOIN raw_images AS r USING (image_id)
        GROUP BY e.split, e.batch_id
        """
    ).fetchall()
    return {(split, batch_id): digest for split, batch_id, digest in rows}


def split_records(
    connection: duckdb.DuckDBPyConnection, split: str, preprocessing: Preprocessing,
    batch_ids: list[str] | None = None, limit: int | None = None,
) -> Records:
    """One split of `training_examples` (labeled images only) in memory, optionally of some batches
    only and at most `limit` rows (a deterministic sample: the first by image_id hash)."""
    index = connection.execute(
        """
        SELECT * FROM (
            SELECT e.image_id, e.batch_id, e.label, r.image_pack, r.image_row
            FROM training_examples AS e
            JOIN raw_images AS r USING (image_id)
            WHERE e.split = $split AND ($batches IS NULL OR list_contains($batches, e.batch_id))
            ORDER BY CASE WHEN $limit IS NULL THEN 0 ELSE md5_number(e.image_id) END, e.image_id
            LIMIT $limit
        ) ORDER BY image_pack, image_row
        """,
        {"split": split, "batches": batch_ids, "limit": limit},
    ).pl()
    records = _decoded(connection, index, preprocessing)
    return Records(records.images[:], records.index)


# Rows in image store order (pack by pack, ascending).
SHARD_INDEX = (
    "SELECT e.image_id, e.batch_id, e.label, r.image_pack, r.image_row "
    "FROM training_examples AS e JOIN raw_images AS r USING (image_id) "
    "WHERE e.split = $split AND e.batch_id = $batch ORDER BY r.image_pack, r.image_row"
)
# A late label wins over the label the image landed with, as in int_images (monitoring runs on batches
# dbt may not have reached yet, so it reads the raw tables).
BATCH_INDEX = (
    "SELECT r.image_id, r.batch_id, coalesce(l.label, r.label) AS label, r.image_pack, r.image_row "
    "FROM raw_images AS r LEFT JOIN raw_labels AS l USING (image_id) "
    "WHERE r.batch_id = $key ORDER BY r.image_pack, r.image_row"
)
PACK_LOCATIONS = "SELECT image_pack, image_row, content_hash FROM raw_images WHERE image_pack = $pack ORDER BY image_row"


def packs_to_decode(connection: duckdb.DuckDBPyConnection, preprocessing: Preprocessing) -> list[tuple[str, pl.DataFrame]]:
    """The packs with no cache of their images decoded for `preprocessing` yet, with their locations:
    the decoding work a Ray cluster can do ahead of the datasets and reports (`training.ray_data`)."""
    store = image_store(connection)
    packs = [pack for (pack,) in connection.execute(
        "SELECT DISTINCT image_pack FROM raw_images WHERE image_pack IS NOT NULL ORDER BY image_pack"
    ).fetchall()]
    return [
        (pack, connection.execute(PACK_LOCATIONS, {"pack": pack}).pl())
        for pack in packs if not store.decoded_path(pack, preprocessing).exists()
    ]


def shard_pixels(
    connection: duckdb.DuckDBPyConnection, split: str, batch_id: str, preprocessing: Preprocessing
) -> Records:
    """One batch's rows of one split of `training_examples`, read a few images at a time (see `_decoded`)."""
    return _decoded(connection, connection.execute(SHARD_INDEX, {"split": split, "batch": batch_id}).pl(), preprocessing)


def batch_pixels(connection: duckdb.DuckDBPyConnection, batch_id: str, preprocessing: Preprocessing) -> Records:
    """Every accepted image of one batch, labeled or not, read a few at a time (see `_decoded`)."""
    return _decoded(connection, connection.execute(BATCH_INDEX, {"key": batch_id}).pl(), preprocessing)


def _decoded(connection: duckdb.DuckDBPyConnection, index: pl.DataFrame, preprocessing: Preprocessing) -> Records:
    """The images of `index` (rows of `raw_images`, pack by pack) decoded for `preprocessing`: each
    pack's images are decoded once, into the image store's cache, and read from there a few at a
    time, so memory stays bounded however many images there are, and a pack decoded for an earlier
    dataset or report is not decoded again."""
    store = image_store(connection)
    packs = index["image_pack"].unique(maintain_order=True).to_list()
    parts = [store.decoded(pack, connection.execute(PACK_LOCATIONS, {"pack": pack}).pl(), preprocessing) for pack in packs]
    rows = index.select("image_id", "batch_id", "label")
    if len(parts) == 1 and index["image_row"].to_list() == list(range(len(parts[0]))):
        return Records(parts[0], rows)  # a whole pack: its cache as it is
    part = index["image_pack"].replace_strict(packs, list(range(len(packs))), return_dtype=pl.Int32).to_numpy()
    return Records(GatheredPixels(parts, part, index["image_row"].to_numpy(), preprocessing.resolution), rows)


def image_stats(
    connection: duckdb.DuckDBPyConnection, batch_ids: list[str], split: str | None = None
) -> pl.DataFrame:
    """Per-image statistics (the `batch_image_stats` mart) of some batches, optionally one split."""
    return connection.execute(
        "SELECT * FROM batch_image_stats WHERE batch_id IN (SELECT unnest($batches)) "
        "AND ($split IS NULL OR split = $split) ORDER BY image_id",
        {"batches": batch_ids, "split": split},
    ).pl()
