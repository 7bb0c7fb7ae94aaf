"""The image store: image bytes live in per-batch packs beside the warehouse, which holds only where
they are; replacing a batch gives the old pack's space back; a damaged pack is named, not trained on."""

import hashlib
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest

from tests.test_landing import DIGITS, RULES, good, landing_frame, png
from transforms import image_store, warehouse
from transforms.image_store import ImageStore, ImageStoreError
from transforms.images import Preprocessing
from transforms.landing import read_landing_file, validate_batch


def ingest(tmp_path: Path, rows: list[dict], fingerprint: str) -> warehouse.LoadCounts:
    path = tmp_path / "landing" / "b1.parquet"
    path.parent.mkdir(exist_ok=True)
    landing_frame(rows).write_parquet(path)
    batch = validate_batch(path, read_landing_file(path), RULES, DIGITS)
    with warehouse.connect(tmp_path / "warehouse.duckdb") as connection:
        return warehouse.replace_batch(connection, batch, fingerprint)


def stored_bytes(tmp_path: Path) -> dict[str, bytes]:
    with warehouse.connect(tmp_path / "warehouse.duckdb", read_only=True) as connection:
        locations = connection.execute(
            "SELECT image_id, image_pack, image_row, content_hash FROM raw_images ORDER BY image_pack, image_row"
        ).pl()
        return dict(zip(locations["image_id"], warehouse.image_store(connection).read(locations)))


def packs(tmp_path: Path) -> list[str]:
    return sorted(str(path.relative_to(tmp_path / "images")) for path in (tmp_path / "images").rglob("*") if path.is_file())


def test_the_warehouse_keeps_no_image_bytes_and_a_replaced_batch_gives_its_space_back(tmp_path: Path):
    first = [good(i) for i in range(4)]
    ingest(tmp_path, first, fingerprint="a" * 64)
    with warehouse.connect(tmp_path / "warehouse.duckdb", read_only=True) as connection:
        types = dict(connection.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'raw_images'"
        ).fetchall())
    assert "BLOB" not in types.values()
    assert packs(tmp_path) == ["b1/aaaaaaaaaaaaaaaa.parquet"]
    assert stored_bytes(tmp_path) == {row["image_id"]: row["image"] for row in first}

    second = [good(i) for i in range(2, 8)]
    ingest(tmp_path, second, fingerprint="b" * 64)
    assert packs(tmp_path) == ["b1/bbbbbbbbbbbbbbbb.parquet"]
    assert stored_bytes(tmp_path) == {row["image_id"]: row["image"] for row in second}

    # Every row rejected: nothing of the batch is stored, and neither is a pack.
    ingest(tmp_path, [{**good(0), "image": b"not an image"}], fingerprint="c" * 64)
    assert packs(tmp_path) == [] and stored_bytes(tmp_path) == {}


def test_a_failed_replacement_keeps_the_stored_pack_and_leaves_no_new_one(tmp_path: Path):
    rows = [good(i) for i in range(4)]
    ingest(tmp_path, rows, fingerprint="a" * 64)
    path = tmp_path / "landing" / "b1.parquet"
    batch = validate_batch(path, read_landing_file(path), RULES, DIGITS)
    broken = replace(batch, images=batch.images.with_columns(pl.lit(None, pl.Utf8).alias("format")))
    with warehouse.connect(tmp_path / "warehouse.duckdb") as connection:
        with pytest.raises(Exception, match="NOT NULL"):
            warehouse.replace_batch(connection, broken, fingerprint="b" * 64)
    assert packs(tmp_path) == ["b1/aaaaaaaaaaaaaaaa.parquet"]
    assert stored_bytes(tmp_path) == {row["image_id"]: row["image"] for row in rows}


def test_reads_pick_rows_across_row_groups_and_name_a_damaged_pack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(image_store, "STORE_ROW_GROUP_BYTES", 1)  # every image its own row group
    images = [png(i) for i in range(9)]
    frame = pl.DataFrame({
        "image_id": [f"i{i}" for i in range(9)], "content_hash": [hashlib.sha256(b).hexdigest() for b in images],
        "image": images,
    })
    store = ImageStore(tmp_path / "images")
    pack = store.write_pack("b1", "f" * 64, [frame.slice(0, 4), frame.slice(4, 5)])
    wanted = [1, 2, 7]
    locations = pl.DataFrame({
        "image_pack": [pack] * 3, "image_row": wanted, "content_hash": frame["content_hash"].gather(wanted),
    })
    assert list(store.read(locations)) == [images[i] for i in wanted]

    wrong = locations.with_columns(pl.Series("content_hash", ["0" * 64, *locations["content_hash"][1:]]))
    with pytest.raises(ImageStoreError, match=r"b1/f{16}\.parquet: row 1 does not hold the image the warehouse recorded"):
        list(store.read(wrong))
    with pytest.raises(ImageStoreError, match="row 9 is beyond the pack's 9 rows"):
        list(store.read(locations.with_columns(pl.lit(9, pl.Int64).alias("image_row"))))
    (tmp_path / "images" / pack).write_bytes(b"damaged")
    with pytest.raises(ImageStoreError, match=r"b1/f{16}\.parquet: the image pack cannot be read"):
        list(store.read(locations))


def test_a_batch_is_decoded_into_its_packs_cache_which_goes_with_the_pack(tmp_path: Path):
    rows = [good(i) for i in range(6)]
    ingest(tmp_path, rows, fingerprint="a" * 64)
    with warehouse.connect(tmp_path / "warehouse.duckdb", read_only=True) as connection:
        records = warehouse.batch_pixels(connection, "b1", Preprocessing(8, "squash", "grayscale"))
        assert records.index["image_id"].to_list() == [row["image_id"] for row in rows]
        # Each good(i) is a flat grey of value 10 + i.
        assert [int(records.images[i].mean().round()) for i in range(6)] == [10 + i for i in range(6)]
        assert records.images[2:5].shape == (3, 8, 8, 3) and records.images[-1].mean() == 15
    assert packs(tmp_path) == ["b1/aaaaaaaaaaaaaaaa.8px-squash-grayscale.npy", "b1/aaaaaaaaaaaaaaaa.parquet"]
    ingest(tmp_path, rows[:3], fingerprint="b" * 64)
    assert packs(tmp_path) == ["b1/bbbbbbbbbbbbbbbb.parquet"]
