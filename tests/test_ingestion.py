"""Ingestion and dbt through Dagster, on a real DuckDB file: bad input of every kind, re-runs,
late labels, and the landing sensor."""

import io
import os
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import polars as pl
import pytest
from PIL import Image

from orchestration.definitions import defs
from orchestration.sensors import landing_sensor
from tests.conftest import resources_for
from tests.test_pipeline_e2e import assets
from transforms.simulate import SimulationSpec, simulate_batches

WHEN = datetime(2026, 3, 1, tzinfo=timezone.utc)


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge size (a decompression bomb: 900 MP here)."""
    data = bytearray(png(0))
    data[16:20], data[20:24] = width.to_bytes(4, "big"), height.to_bytes(4, "big")  # IHDR width and height
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # the IHDR chunk's CRC
    return bytes(data)


def png(value: int, size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (size, size), value).save(buffer, format="PNG")
    return buffer.getvalue()


def write_batch(landing: Path, name: str, rows: list[dict]) -> Path:
    landing.mkdir(parents=True, exist_ok=True)
    path = landing / f"{name}.parquet"
    pl.DataFrame(
        rows, schema={"image_id": pl.Utf8, "image": pl.Binary, "label": pl.Int64, "captured_at": pl.Datetime("us", "UTC")}
    ).write_parquet(path)
    return path


def ingest(batch: str, resources: dict, instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    instance.add_dynamic_partitions("batches", [batch])
    return dg.materialize(assets("raw_images"), partition_key=batch, resources=resources, instance=instance, raise_on_error=False)


def query(home: Path, sql: str) -> list[tuple]:
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as connection:
        return connection.execute(sql).fetchall()


GOOD = [{"image_id": f"good-{i}", "image": png(i * 20), "label": i, "captured_at": WHEN} for i in range(6)]
BAD_ROWS = {
    "corrupt bytes": ({"image_id": "corrupt", "image": png(200)[:20] + b"\x00" * 50, "label": 1, "captured_at": WHEN}, "undecodable_image"),
    "non-image bytes": ({"image_id": "text", "image": b"hello, world", "label": 1, "captured_at": WHEN}, "undecodable_image"),
    "null id": ({"image_id": None, "image": png(201), "label": 1, "captured_at": WHEN}, "missing_image_id"),
    "empty id": ({"image_id": "", "image": png(202), "label": 1, "captured_at": WHEN}, "missing_image_id"),
    "label out of range": ({"image_id": "label-99", "image": png(203), "label": 99, "captured_at": WHEN}, "unknown_class"),
    "pixel bomb": ({"image_id": "bomb", "image": png_claiming(30_000, 30_000), "label": 1, "captured_at": WHEN}, "image_too_large"),
    "same bytes, other id": ({"image_id": "copy", "image": png(0), "label": 0, "captured_at": WHEN}, "duplicate_content"),
    "empty bytes": ({"image_id": "nothing", "image": b"", "label": 1, "captured_at": WHEN}, "missing_image"),
}
DUPLICATE_IDS = [
    {"image_id": "dup", "image": png(205), "label": 1, "captured_at": WHEN},
    {"image_id": "dup", "image": png(206), "label": 2, "captured_at": WHEN},
]


def test_bad_rows_are_quarantined_and_good_rows_land_exactly_once(home: Path):
    resources, instance = resources_for(home), dg.DagsterInstance.ephemeral()
    rows = GOOD[:3] + [row for row, _ in BAD_ROWS.values()] + DUPLICATE_IDS + GOOD[3:]
    write_batch(home / "landing", "mixed", rows)

    assert ingest("mixed", resources, instance).success
    assert ingest("mixed", resources, instance).success  # a re-run leaves identical counts

    assert sorted(r[0] for r in query(home, "SELECT image_id FROM raw_images")) == sorted(g["image_id"] for g in GOOD)
    quarantined = dict(query(home, "SELECT row_number, reason FROM quarantined_images WHERE batch_id = 'mixed'"))
    expected = {4 + i: reason for i, (_, reason) in enumerate(BAD_ROWS.values())}
    expected |= {4 + len(BAD_ROWS): "duplicate_image_id", 5 + len(BAD_ROWS): "duplicate_image_id"}
    assert quarantined == expected
    messages = [m for (m,) in query(home, "SELECT message FROM quarantined_images")]
    assert all("mixed.parquet: row " in m for m in messages)


def test_an_already_ingested_id_in_a_new_batch_is_quarantined(home: Path):
    resources, instance = resources_for(home), dg.DagsterInstance.ephemeral()
    write_batch(home / "landing", "first", GOOD[:2])
    write_batch(home / "landing", "second", [GOOD[1] | {"image": png(250)}, {"image_id": "new", "image": png(251), "label": 3, "captured_at": WHEN}])
    assert ingest("first", resources, instance).success and ingest("second", resources, instance).success
    assert query(home, "SELECT reason FROM quarantined_images WHERE batch_id = 'second'") == [("image_id_exists",)]
    assert query(home, "SELECT count(*) FROM raw_images") == [(3,)]


@pytest.mark.parametrize(
    "make_file, cause",
    [
        (lambda p: p.write_bytes(b""), "landing file is empty"),
        (lambda p: p.write_text("image_id,image,label\n"), "not a readable parquet file"),
        (lambda p: p.write_bytes(b"PAR1" + os.urandom(64)), "not a readable parquet file"),
        (lambda p: pl.DataFrame({"image_id": ["a"], "image": [png(1)]}).write_parquet(p), "missing required column(s) label, captured_at"),
        (lambda p: pl.DataFrame({"image_id": [1], "image": ["x"], "label": [1.5], "captured_at": ["2026"]}).write_parquet(p), "wrong column type(s)"),
    ],
    ids=["empty file", "csv named parquet", "corrupt parquet", "missing columns", "wrong column types"],
)
def test_an_unreadable_file_fails_its_partition_and_touches_nothing_else(home: Path, make_file, cause: str):
    resources, instance = resources_for(home), dg.DagsterInstance.ephemeral()
    write_batch(home / "landing", "fine", GOOD)
    assert ingest("fine", resources, instance).success
    make_file(home / "landing" / "broken.parquet")

    result = ingest("broken", resources, instance)

    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure).step_failure_data
    assert "broken.parquet" in failure.user_failure_data.description and cause in failure.user_failure_data.description
    assert query(home, "SELECT count(*) FROM raw_images") == [(len(GOOD),)]


def test_a_truncated_file_fails_with_its_name(home: Path):
    resources, instance = resources_for(home), dg.DagsterInstance.ephemeral()
    path = write_batch(home / "landing", "cut", GOOD * 1)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result = ingest("cut", resources, instance)
    assert not result.success
    assert "cut.parquet: not a readable parquet file" in next(e for e in result.all_events if e.is_step_failure).step_failure_data.user_failure_data.description


def test_a_bad_batch_id_never_reaches_a_path(home: Path):
    resources, instance = resources_for(home), dg.DagsterInstance.ephemeral()
    result = ingest("..%2Fescape", resources, instance)
    assert not result.success
    assert "is not allowed" in next(e for e in result.all_events if e.is_step_failure).step_failure_data.user_failure_data.description
    assert not list(home.parent.glob("escape*"))


def test_late_labels_attach_through_dbt_and_the_split_never_moves(home: Path):
    resources, instance = resources_for(home), dg.DagsterInstance.ephemeral()
    simulate_batches(home / "landing", SimulationSpec(batches=1, batch_size=60, labeled=False, prefix="cam"))
    assert ingest("cam-000", resources, instance).success
    assert dg.materialize(assets("raw_labels", "stg_images"), resources=resources, instance=instance).success
    assert query(home, "SELECT count(*) FROM training_examples") == [(0,)]
    splits_before = dict(query(home, "SELECT image_id, split FROM int_images"))

    labels = home / "landing" / "labels"
    labels.mkdir()
    pl.DataFrame({"image_id": ["cam-000-00000", "cam-000-00001", "cam-000-00002"], "label": [1, 2, 3]}).write_parquet(labels / "vendor-a.parquet")
    time.sleep(0.01)
    pl.DataFrame({"image_id": ["cam-000-00001", "unknown-id", "cam-000-00004"], "label": [7, 4, 42]}).write_parquet(labels / "vendor-b.parquet")
    result = dg.materialize(assets("raw_labels", "stg_images"), resources=resources, instance=instance)
    assert result.success

    # The newer file wins for image 00001; label 42 is quarantined; unknown ids wait for their image.
    assert dict(query(home, "SELECT image_id, label FROM training_examples")) == {
        "cam-000-00000": 1, "cam-000-00001": 7, "cam-000-00002": 3,
    }
    assert query(home, "SELECT reason FROM quarantined_images WHERE batch_id = 'labels/vendor-b'") == [("unknown_class",)]
    assert dict(query(home, "SELECT image_id, split FROM int_images")) == splits_before
    assert query(home, "SELECT DISTINCT label_source FROM training_examples") == [("label_file",)]


def test_landing_sensor_requests_each_new_or_changed_file_until_it_is_ingested(home: Path, monkeypatch: pytest.MonkeyPatch):
    from orchestration import sensors
    from orchestration.definitions import defs

    # A settle window no evaluation outlasts: beside another test file an evaluation once took longer
    # than the default 5 s between writing the unsettled file and reading the clock.
    monkeypatch.setattr(sensors, "SETTLE_SECONDS", 300.0)

    resources = resources_for(home)
    instance = dg.DagsterInstance.ephemeral()
    landed, _ = simulate_batches(home / "landing", SimulationSpec(batches=5, batch_size=5))
    (home / "landing" / "bad name!.parquet").write_bytes(b"")
    old = time.time() - 600  # settled: older than the settle window
    for path in landed:
        os.utime(path, (old, old))

    def evaluate(cursor: str | None) -> dg.SensorResult:
        with dg.build_sensor_context(instance=instance, cursor=cursor, resources={"flywheel": resources["flywheel"]}) as context:
            result = landing_sensor(context)
        for request in result.dynamic_partitions_requests or []:  # as the daemon applies them
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        return result

    def execute(requests: list[dg.RunRequest]) -> None:
        for request in requests:
            job = defs.resolve_job_def(request.job_name)
            assert job.execute_in_process(instance=instance, partition_key=request.partition_key).success

    first = evaluate(None)
    assert sorted(r.partition_key for r in first.run_requests if r.job_name == "ingest") == [p.stem for p in landed]
    assert [r.job_name for r in first.run_requests if r.job_name != "ingest"] == ["load_labels"]  # first tick: raw_labels exists
    assert first.dynamic_partitions_requests[0].partition_keys == [p.stem for p in landed]
    # Not ingested yet: asked again under the same run keys, which Dagster runs once.
    again = evaluate(first.cursor)
    assert {r.run_key for r in again.run_requests} == {r.run_key for r in first.run_requests}
    execute(first.run_requests)
    second = evaluate(again.cursor)
    assert second.run_requests == []

    os.utime(landed[2], (old + 1, old + 1))  # touched, same bytes: nothing new to ingest
    assert evaluate(second.cursor).run_requests == []
    simulate_batches(home / "landing", SimulationSpec(batches=5, batch_size=5, offset=100), overwrite=True)
    for path in landed:
        os.utime(path, (old + 2, old + 2))
    fresh = home / "landing" / "still-copying.parquet"
    fresh.write_bytes(b"PAR1")  # modified just now: not picked up until it settles
    third = evaluate(second.cursor)
    assert sorted(r.partition_key for r in third.run_requests) == [p.stem for p in landed]  # other bytes
    assert len({r.run_key for r in first.run_requests + third.run_requests}) == 11
    execute(third.run_requests)

    labels = home / "landing" / "labels"
    labels.mkdir()
    pl.DataFrame({"image_id": ["x"], "label": [1]}).write_parquet(labels / "l.parquet")
    fourth = evaluate(third.cursor)
    assert [r.job_name for r in fourth.run_requests] == ["load_labels"]
    execute(fourth.run_requests)
    assert evaluate(fourth.cursor).run_requests == []


def test_a_warehouse_of_an_earlier_flywheel_gains_the_new_statistics_from_its_stored_bytes(home: Path):
    """An earlier flywheel stored fewer statistics: the columns are added and computed from the stored
    image bytes, and dbt's incremental models are rebuilt with them. Nothing stored is lost."""
    resources, instance = resources_for(home), dg.DagsterInstance.ephemeral()
    simulate_batches(home / "landing", SimulationSpec(batches=1, batch_size=40, prefix="old", drift="noise", strength=0.3))
    assert ingest("old-000", resources, instance).success
    assert dg.materialize(assets("raw_labels", "stg_images"), resources=resources, instance=instance).success
    newer = ("red_green_contrast", "saturation", "sharpness")
    columns = ", ".join(("image_id", "brightness") + newer)
    expected = query(home, f"SELECT {columns} FROM batch_image_stats ORDER BY image_id")
    labeled = query(home, "SELECT image_id, label, split FROM training_examples ORDER BY image_id")
    with duckdb.connect(str(home / "warehouse.duckdb")) as connection:
        for name in newer:
            connection.execute(f"ALTER TABLE raw_images DROP COLUMN {name}")

    assert dg.materialize(assets("raw_labels", "stg_images"), resources=resources, instance=instance).success
    migrated = query(home, f"SELECT {columns} FROM batch_image_stats ORDER BY image_id")
    assert [row[:2] for row in migrated] == [row[:2] for row in expected] and len(migrated) == 40
    assert all(row[2:] == pytest.approx(before[2:], rel=1e-6) for row, before in zip(migrated, expected))
    assert query(home, "SELECT image_id, label, split FROM training_examples ORDER BY image_id") == labeled


def test_a_warehouse_that_kept_the_image_bytes_moves_them_to_the_image_store(home: Path):
    """An earlier flywheel kept each image's bytes in `raw_images.image`: the first writer moves them to
    packs in the image store and drops the column; every image decodes exactly as before."""
    from transforms import warehouse
    from transforms.images import Preprocessing

    resources, instance = resources_for(home), dg.DagsterInstance.ephemeral()
    simulate_batches(home / "landing", SimulationSpec(batches=2, batch_size=30, prefix="kept"))
    for batch in ("kept-000", "kept-001"):
        assert ingest(batch, resources, instance).success
    assert dg.materialize(assets("raw_labels", "stg_images"), resources=resources, instance=instance).success
    preprocessing = Preprocessing(16, "squash", "rgb")
    with warehouse.connect(home / "warehouse.duckdb", read_only=True) as connection:
        before = warehouse.split_records(connection, "train", preprocessing)
        locations = connection.execute("SELECT image_id, image_pack, image_row, content_hash FROM raw_images").pl()
        kept_bytes = pl.DataFrame(  # noqa: F841 - read by DuckDB's replacement scan
            {"image_id": locations["image_id"], "image": list(warehouse.image_store(connection).read(locations))}
        )
    with duckdb.connect(str(home / "warehouse.duckdb")) as connection:
        connection.execute("ALTER TABLE raw_images ADD COLUMN image BLOB")
        connection.execute("UPDATE raw_images SET image = k.image FROM kept_bytes AS k WHERE raw_images.image_id = k.image_id")
        connection.execute("ALTER TABLE raw_images DROP COLUMN image_pack")
        connection.execute("ALTER TABLE raw_images DROP COLUMN image_row")
    for path in sorted((home / "images").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()

    assert dg.materialize(assets("raw_labels", "stg_images"), resources=resources, instance=instance).success
    columns = {row[0]: row[2] for row in query(home, "DESCRIBE raw_images")}
    assert "image" not in columns and columns["image_pack"] == columns["content_hash"] == "NO"  # NOT NULL kept
    assert sorted(path.parent.name for path in (home / "images").rglob("*.parquet")) == ["kept-000", "kept-001"]
    with warehouse.connect(home / "warehouse.duckdb", read_only=True) as connection:
        after = warehouse.split_records(connection, "train", preprocessing)
    assert after.index.sort("image_id").equals(before.index.sort("image_id")) and before.index.height > 20
    order_before, order_after = before.index["image_id"].arg_sort(), after.index["image_id"].arg_sort()
    assert np.array_equal(after.images[order_after.to_numpy()], before.images[order_before.to_numpy()])


def test_a_split_is_decoded_once_into_the_cache_and_read_back_exactly(home: Path):
    from transforms import warehouse
    from transforms.image_store import stored_pixels
    from transforms.images import Preprocessing

    resources, instance = resources_for(home), dg.DagsterInstance.ephemeral()
    simulate_batches(home / "landing", SimulationSpec(batches=1, batch_size=120, prefix="disk"))
    assert ingest("disk-000", resources, instance).success
    assert dg.materialize(assets("raw_labels", "stg_images"), resources=resources, instance=instance).success
    preprocessing = Preprocessing(24, "center_crop", "rgb")
    with warehouse.connect(home / "warehouse.duckdb", read_only=True) as connection:
        store = warehouse.image_store(connection)
        for split in ("train", "test"):
            lazy = warehouse.shard_pixels(connection, split, "disk-000", preprocessing)
            in_memory = warehouse.split_records(connection, split, preprocessing)
            assert lazy.images.shape == (in_memory.index.height, 24, 24, 3) and in_memory.index.height > 10
            assert lazy.index.equals(in_memory.index)
            assert np.array_equal(np.stack([lazy.images[i] for i in range(len(lazy.images))]), in_memory.images)
            # Against a decode of the stored bytes that skips the cache.
            ids = in_memory.index.select("image_id")  # noqa: F841 - read by DuckDB's replacement scan
            locations = connection.execute(
                "SELECT r.image_pack, r.image_row, r.content_hash FROM ids JOIN raw_images AS r USING (image_id) "
                "ORDER BY r.image_pack, r.image_row"
            ).pl()
            direct = np.stack([preprocessing(stored_pixels(data, preprocessing.decode_pixels)) for data in store.read(locations)])
            assert np.array_equal(in_memory.images, direct)
        (cache,) = (home / "images" / "disk-000").glob("*.24px-center_crop-rgb.npy")
        written = cache.stat().st_mtime_ns
        warehouse.shard_pixels(connection, "val", "disk-000", preprocessing)
        warehouse.batch_pixels(connection, "disk-000", preprocessing)
        assert cache.stat().st_mtime_ns == written  # decoded once, for every split and the batch
        grey = warehouse.batch_pixels(connection, "disk-000", Preprocessing(16, "squash", "grayscale"))
        assert grey.images.shape == (120, 16, 16, 3) and len(list((home / "images" / "disk-000").glob("*.npy"))) == 2
