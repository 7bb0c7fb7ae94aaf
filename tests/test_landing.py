import io
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from PIL import Image

from transforms import warehouse
from transforms.classes import DIGITS_CLASSES
from transforms.landing import (
    LandingFileError,
    accepted_image_chunks,
    ValidationRules,
    batch_id_of,
    check_batch_id,
    read_landing_file,
    validate_batch,
)

WHEN = datetime(2026, 1, 1, tzinfo=timezone.utc)
RULES = ValidationRules(classes=(), max_pixels=4096 * 4096)
DIGITS = list(DIGITS_CLASSES)


def png(value: int, size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (size, size), value).save(buffer, format="PNG")
    return buffer.getvalue()


def landing_frame(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(
        rows,
        schema={"image_id": pl.Utf8, "image": pl.Binary, "label": pl.Int64, "captured_at": pl.Datetime("us", "UTC")},
    )


def good(i: int) -> dict:
    return {"image_id": f"good-{i}", "image": png(10 + i), "label": i % 10, "captured_at": WHEN}


def test_bad_rows_are_quarantined_with_reasons_and_good_rows_kept(tmp_path: Path):
    rows = [good(i) for i in range(5)] + [
        {"image_id": None, "image": png(100), "label": 1, "captured_at": WHEN},
        {"image_id": "  ", "image": png(101), "label": 1, "captured_at": WHEN},
        {"image_id": "bad id with spaces", "image": png(102), "label": 1, "captured_at": WHEN},
        {"image_id": "twice", "image": png(103), "label": 1, "captured_at": WHEN},
        {"image_id": "twice", "image": png(104), "label": 1, "captured_at": WHEN},
        {"image_id": "label-high", "image": png(105), "label": 10, "captured_at": WHEN},
        {"image_id": "label-negative", "image": png(106), "label": -1, "captured_at": WHEN},
        {"image_id": "no-bytes", "image": b"", "label": 1, "captured_at": WHEN},
        {"image_id": "not-an-image", "image": b"%PDF-1.4 hello", "label": 1, "captured_at": WHEN},
        {"image_id": "truncated", "image": png(107)[:40], "label": 1, "captured_at": WHEN},
        {"image_id": "huge", "image": png(108, size=300), "label": 1, "captured_at": WHEN},
        {"image_id": "copy-of-good-0", "image": png(10), "label": 0, "captured_at": WHEN},
        {"image_id": "no-time", "image": png(109), "label": 1, "captured_at": None},
        {"image_id": "unlabeled", "image": png(110), "label": None, "captured_at": WHEN},
    ]
    path = tmp_path / "batch-1.parquet"
    landing_frame(rows).write_parquet(path)

    batch = validate_batch(path, read_landing_file(path), ValidationRules(classes=(), max_pixels=256 * 256), DIGITS)

    reasons = dict(zip(batch.quarantined["row_number"], batch.quarantined["reason"]))
    assert reasons == {
        6: "missing_image_id", 7: "missing_image_id", 8: "invalid_image_id",
        9: "duplicate_image_id", 10: "duplicate_image_id",
        11: "unknown_class", 12: "unknown_class", 13: "missing_image",
        14: "undecodable_image", 15: "undecodable_image", 16: "image_too_large",
        17: "duplicate_content", 18: "missing_captured_at",
    }
    assert sorted(batch.images["image_id"]) == sorted([f"good-{i}" for i in range(5)] + ["unlabeled"])
    message = batch.quarantined.filter(pl.col("row_number") == 11)["message"][0]
    assert str(path) in message and "row 11" in message and "label-high" in message
    assert batch.row_count == len(rows)


def test_labels_may_be_class_names_or_indices_and_an_unknown_name_is_quarantined_with_how_to_add_it(tmp_path: Path):
    path = tmp_path / "pets.parquet"
    rows = [good(0), good(1), good(2), good(3)]
    landing_frame(rows).with_columns(pl.Series("label", ["cat", "dog", "1", "zebra"])).write_parquet(path)

    batch = validate_batch(path, read_landing_file(path), RULES, ["cat", "dog"])

    assert dict(zip(batch.images["image_id"], batch.images["label"])) == {"good-0": 0, "good-1": 1, "good-2": 1}
    (message,) = batch.quarantined.filter(pl.col("reason") == "unknown_class")["message"]
    assert message == (
        f"{path}: row 4 (image_id good-3): label 'zebra' is not one of the project's classes (cat, dog); "
        "to add it, append it to `classes` in flywheel.yaml and ingest the batch again"
    )


def test_a_class_name_is_one_class_whether_typed_composed_or_decomposed(tmp_path: Path):
    """macOS and some editors write "é" as "e" and a combining accent: the same class as the composed
    "é" in flywheel.yaml, a manifest or a label file, wherever the name comes from."""
    from orchestration.project import Project
    from transforms.classes import resolve_classes

    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert Project(classes=[decomposed, "th\u00e9"]).classes == [composed, "th\u00e9"]
    assert resolve_classes([], [], pl.Series([decomposed, " th\u00e9 ", composed])) == [composed, "th\u00e9"]
    assert resolve_classes([], [], pl.Series([decomposed]), declared=[decomposed, "th\u00e9"]) == [composed, "th\u00e9"]
    path = tmp_path / "drinks.parquet"
    landing_frame([good(0), good(1), good(2)]).with_columns(pl.Series("label", [decomposed, composed, "the\u0301"])).write_parquet(path)
    batch = validate_batch(path, read_landing_file(path), RULES, [composed, "th\u00e9"])
    assert batch.images["label"].to_list() == [0, 0, 1] and batch.quarantined.is_empty()


def test_ids_and_contents_already_in_other_batches_are_quarantined(tmp_path: Path):
    path = tmp_path / "later.parquet"
    landing_frame([good(0), good(1), good(2)]).write_parquet(path)
    existing = lambda ids, hashes: ({"good-0"}, set())  # noqa: E731
    batch = validate_batch(path, read_landing_file(path), RULES, DIGITS, existing)
    assert batch.quarantined["reason"].to_list() == ["image_id_exists"]


@pytest.mark.parametrize(
    "write, cause",
    [
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_text("image_id,image\n1,2\n"), "not a readable parquet"),
        (lambda p: landing_frame([good(0)]).drop("label").write_parquet(p), "missing required column(s) label"),
        (lambda p: landing_frame([good(0)]).with_columns(pl.col("label").cast(pl.Float64)).write_parquet(p), "label is Float64"),
    ],
)
def test_unreadable_files_fail_with_file_and_cause(tmp_path: Path, write, cause: str):
    path = tmp_path / "broken.parquet"
    write(path)
    with pytest.raises(LandingFileError) as error:
        read_landing_file(path)
    assert str(path) in str(error.value) and cause in str(error.value)


def test_truncated_parquet_file_fails_with_file_and_cause(tmp_path: Path):
    path = tmp_path / "cut.parquet"
    landing_frame([good(i) for i in range(20)]).write_parquet(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(LandingFileError, match="ends before the parquet footer .*still being copied"):
        read_landing_file(path)


@pytest.mark.parametrize("bad", ["", "../escape", "a/b", "x" * 65, "semi;colon", "dot.ted"])
def test_batch_ids_outside_the_contract_are_refused(bad: str):
    with pytest.raises(LandingFileError):
        check_batch_id(bad)


def test_batch_id_comes_from_the_file_name():
    assert batch_id_of(Path("/x/landing/cam_7-2026.parquet")) == "cam_7-2026"


def test_replacing_a_batch_never_duplicates_rows(tmp_path: Path):
    path = tmp_path / "b1.parquet"
    landing_frame([good(i) for i in range(4)]).write_parquet(path)
    batch = validate_batch(path, read_landing_file(path), RULES, DIGITS)
    with warehouse.connect(tmp_path / "w.duckdb") as connection:
        first = warehouse.replace_batch(connection, batch, fingerprint="test")
        second = warehouse.replace_batch(connection, batch, fingerprint="test")
        count = connection.execute("SELECT count(*) FROM raw_images").fetchone()[0]
    assert (first.images, first.replaced_images) == (4, 0)
    assert (second.images, second.replaced_images) == (4, 4)
    assert count == 4


def test_a_failed_replacement_keeps_what_was_stored(tmp_path: Path):
    path = tmp_path / "b1.parquet"
    landing_frame([good(i) for i in range(4)]).write_parquet(path)
    batch = validate_batch(path, read_landing_file(path), RULES, DIGITS)
    broken = replace(batch, images=batch.images.with_columns(pl.lit(None, pl.Utf8).alias("format")))
    with warehouse.connect(tmp_path / "w.duckdb") as connection:
        warehouse.replace_batch(connection, batch, fingerprint="test")
        with pytest.raises(Exception, match="NOT NULL"):
            warehouse.replace_batch(connection, broken, fingerprint="test")  # fails after the delete, inside the transaction
        assert connection.execute("SELECT count(*) FROM raw_images WHERE format IS NOT NULL").fetchone()[0] == 4


def test_a_batch_in_many_row_groups_is_validated_and_stored_as_in_one(tmp_path: Path):
    rows = [good(i) for i in range(7)] + [
        {"image_id": "text", "image": b"hello", "label": 1, "captured_at": WHEN},
        {"image_id": "empty", "image": b"", "label": 1, "captured_at": WHEN},
        {"image_id": "copy", "image": png(10), "label": 0, "captured_at": WHEN},  # good-0's bytes
        good(8),
    ]
    stored = {}
    for name, row_group_size in (("one", None), ("many", 2)):
        path = tmp_path / name / "b1.parquet"
        path.parent.mkdir()
        pq.write_table(landing_frame(rows).to_arrow(), path, row_group_size=row_group_size)
        batch = validate_batch(path, read_landing_file(path), RULES, DIGITS)
        streamed = pl.concat(list(accepted_image_chunks(batch, rows=3)))
        assert streamed["image_id"].to_list() == batch.images["image_id"].to_list()
        with warehouse.connect(tmp_path / f"{name}.duckdb") as connection:
            warehouse.replace_batch(connection, batch, fingerprint="test")
            locations = connection.execute(
                "SELECT image_pack, image_row, content_hash FROM raw_images ORDER BY row_number"
            ).pl()
            stored_bytes = list(warehouse.image_store(connection).read(locations))
            stored[name] = (
                connection.execute("SELECT image_id, row_number, image_row, content_hash, width, brightness FROM raw_images ORDER BY row_number").fetchall(),
                connection.execute("SELECT image_id, row_number, reason FROM quarantined_images ORDER BY row_number").fetchall(),
            )
        assert streamed["image"].to_list() == stored_bytes
    assert pq.ParquetFile(tmp_path / "many" / "b1.parquet").metadata.num_row_groups == 6
    assert stored["one"] == stored["many"]
    images, quarantined = stored["many"]
    assert [row[0] for row in images] == [f"good-{i}" for i in range(7)] + ["good-8"]
    assert quarantined == [("text", 8, "undecodable_image"), ("empty", 9, "missing_image"), ("copy", 10, "duplicate_content")]


def test_a_landing_file_replaced_between_validation_and_storing_stores_nothing(tmp_path: Path):
    path = tmp_path / "b1.parquet"
    landing_frame([good(i) for i in range(4)]).write_parquet(path)
    batch = validate_batch(path, read_landing_file(path), RULES, DIGITS)
    landing_frame([{**good(i), "image": png(60 + i)} for i in range(4)]).write_parquet(path)
    with warehouse.connect(tmp_path / "w.duckdb") as connection:
        with pytest.raises(LandingFileError, match="b1.parquet: the file changed while it was ingested"):
            warehouse.replace_batch(connection, batch, fingerprint="test")
        assert connection.execute("SELECT count(*) FROM raw_images").fetchone()[0] == 0
