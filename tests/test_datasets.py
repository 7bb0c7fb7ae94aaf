"""FFCV datasets: per-batch shards merged into one file per split, on real `.beton` files, a real
DuckDB warehouse and dbt, through Dagster."""

import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest

from tests.conftest import resources_for
from tests.test_ingestion import ingest, query
from tests.test_pipeline_e2e import assets
from training.data import beton_length, make_loader, merge_betons, read_beton, write_beton
from transforms.simulate import SimulationSpec, simulate_batches


def test_merged_shards_read_back_as_their_concatenation(tmp_path: Path):
    rng = np.random.default_rng(0)
    # 224 px raw images are 150 KB: 30 of them span three 2 MiB pages, so pointers move across pages.
    shapes = [(5, 224), (30, 224), (1, 224)]
    images = [rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8) for n, side in shapes]
    labels = [rng.integers(0, 10, n) for n, _ in shapes]
    shards = [write_beton(tmp_path / f"shard-{i}.beton", x, y) for i, (x, y) in enumerate(zip(images, labels))]

    merged = merge_betons(shards, tmp_path / "split.beton")

    read_images, read_labels = read_beton(merged, batch_size=7)
    assert beton_length(merged) == 36
    assert np.array_equal(read_images, np.concatenate(images)) and np.array_equal(read_labels, np.concatenate(labels))
    # Training's loader (random order, a ragged last batch dropped) sees each example once (copies: it reuses its buffers).
    seen = np.concatenate([y.numpy().copy() for _, y in make_loader(merged, 4, 1, train=True, seed=3)])
    assert len(seen) == 36 and sorted(seen.tolist()) == sorted(read_labels.tolist())
    assert not list(tmp_path.glob(".*partial"))


def _compiled(loader) -> bool:
    """Whether FFCV compiled the loader's pipeline: its stage code calls numba dispatchers, not functions."""
    from numba.core.registry import CPUDispatcher

    stage = loader.code[0][0][0]
    operations = [value for name, value in stage.__globals__.items() if name.startswith("code_")]
    assert operations
    return all(isinstance(operation, CPUDispatcher) for operation in operations)


def test_a_loader_is_compiled_only_when_it_delivers_enough_images_and_loads_the_same_either_way(tmp_path: Path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8), rng.integers(0, 10, 40)
    path = write_beton(tmp_path / "split.beton", images, labels)

    as_python = make_loader(path, 8, 1, train=False, epochs=5, compile_min_images=201)
    compiled = make_loader(path, 8, 1, train=False, epochs=5, compile_min_images=200)  # 40 examples x 5 epochs

    assert not _compiled(as_python) and _compiled(compiled)
    for loader in (as_python, compiled):
        read = [(x.numpy().copy(), y.numpy().copy()) for x, y in loader]
        assert np.array_equal(np.concatenate([x for x, _ in read]), images)
        assert np.array_equal(np.concatenate([y for _, y in read]), labels)


def test_shards_of_another_resolution_are_refused_with_both_names(tmp_path: Path):
    small = write_beton(tmp_path / "a.beton", np.zeros((2, 8, 8, 3), np.uint8), np.array([0, 1]))
    large = write_beton(tmp_path / "b.beton", np.zeros((2, 16, 16, 3), np.uint8), np.array([0, 1]))
    with pytest.raises(ValueError, match=f"cannot merge {large} into .*split.beton: its fields, image sizes or page size differ from {small}'s"):
        merge_betons([small, large], tmp_path / "split.beton")
    assert not (tmp_path / "split.beton").exists()


def shard_files(home: Path) -> dict[str, int]:
    return {str(p.relative_to(home / "ffcv" / "shards")): p.stat().st_mtime_ns for p in (home / "ffcv" / "shards").rglob("*.beton")}


def test_a_tick_encodes_only_the_shards_its_rows_changed(home: Path):
    resources, instance = resources_for(home), dg.DagsterInstance.ephemeral()
    simulate_batches(home / "landing", SimulationSpec(batches=3, batch_size=150, prefix="tick"))
    datasets = assets("raw_labels", "stg_images", "ffcv_datasets")

    def tick() -> dict:
        result = dg.materialize(datasets, resources=resources, instance=instance)
        assert result.success
        return result.asset_materializations_for_node("ffcv_datasets")[0].metadata

    for batch in ("tick-000", "tick-001"):
        assert ingest(batch, resources, instance).success
    first = tick()
    before = shard_files(home)
    assert first["shards_written"].value == len(before) == 6  # two batches x three splits

    assert ingest("tick-002", resources, instance).success
    second = tick()
    after = shard_files(home)
    assert second["shards_written"].value == 3 and second["shards_reused"].value == 6
    assert {name: after[name] for name in before} == before  # the older shards are not rewritten
    new = sorted((name.split("/")[1], name.split("/")[2].split(".")[0]) for name in set(after) - set(before))
    assert new == [("test", "tick-002"), ("train", "tick-002"), ("val", "tick-002")]

    # Each split's file is its shards in batch order, and its index describes it row for row.
    for split in ("train", "val", "test"):
        images, labels = read_beton(home / "ffcv" / f"{split}.beton")
        index = pl.read_parquet(home / "ffcv" / f"{split}.index.parquet")
        parts = [read_beton(p) for p in sorted((home / "ffcv" / "shards").rglob(f"{split}/*.beton"))]
        assert np.array_equal(images, np.concatenate([x for x, _ in parts]))
        assert np.array_equal(labels, index["label"].to_numpy()) and index["batch_id"].is_sorted()
        assert dict(query(home, f"SELECT image_id, label FROM training_examples WHERE split = '{split}'")) == dict(index.select("image_id", "label").iter_rows())

    # Nothing changed: nothing encoded, nothing merged.
    unchanged = tick()
    assert unchanged["shards_written"].value == 0 and unchanged["merged"].value == "none (inputs unchanged)"

    # A late label changes one row of one batch's train shard: that shard alone is encoded again.
    train_row = query(home, "SELECT image_id, label FROM training_examples WHERE split = 'train' AND batch_id = 'tick-001' LIMIT 1")[0]
    labels_dir = home / "landing" / "labels"
    labels_dir.mkdir()
    pl.DataFrame({"image_id": [train_row[0]], "label": [(train_row[1] + 1) % 10]}).write_parquet(labels_dir / "fix.parquet")
    time.sleep(0.01)
    relabeled = tick()
    final = shard_files(home)
    assert relabeled["shards_written"].value == 1 and relabeled["merged"].value == "train"
    changed = sorted(set(final) ^ set(after))
    assert len(changed) == 2 and all("/train/tick-001." in f"/{name}" for name in changed)  # old one removed


def test_importing_ffcv_through_training_skips_numbas_typed_dict():
    """FFCV's image-mode table is built as a plain dict (no ~6.5 s numba compilation per process),
    with FFCV's values, and numba's typed dict is numba's again afterwards."""
    probe = (
        "import training.data, numba.typed, ffcv.fields.rgb_image as rgb;"
        "from numba.typed.typeddict import Dict;"
        "print(type(rgb.IMAGE_MODES).__name__, sorted(rgb.IMAGE_MODES.items()), numba.typed.Dict is Dict)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.split("\n")[0] == "dict [('jpg', 0), ('raw', 1)] True"
