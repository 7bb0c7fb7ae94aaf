"""Ingestion's per-image work on a Ray cluster: each row group of a landing file is hashed, decoded
and measured by `transforms.landing.measure_images` (the function the single-machine path runs) as a
Ray Data task on some node, and only the small per-image results come back. The landing file must
be on storage every node mounts, as the data root is for training on Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from transforms.landing import Measure, Measurements, measure_images, row_group_images


def row_group_tasks(path: Path, to_decode: set[int]) -> list[dict]:
    """One task per row group: where its rows start (1-based) and which of them to decode."""
    metadata = pq.ParquetFile(path).metadata
    wanted = np.array(sorted(to_decode), dtype=np.int64)
    tasks, first = [], 1
    for group in range(metadata.num_row_groups):
        rows = metadata.row_group(group).num_rows
        low, high = np.searchsorted(wanted, [first, first + rows])
        tasks.append({"path": str(path), "group": group, "first_row": first, "to_decode": wanted[low:high].tolist()})
        first += rows
    return tasks


def measure_row_group(task: dict, max_pixels: int) -> dict:
    """A Ray Data task: `measure_images` over one row group."""
    images = row_group_images(Path(task["path"]), task["group"])
    measured = measure_images(images, task["first_row"], set(task["to_decode"]), max_pixels)
    return {"group": task["group"], "measured": measured}


def measure_on_ray(address: str) -> Measure:
    """`validate_batch`'s `measure`, run by Ray Data on the cluster at `address`."""

    def measure(path: Path, to_decode: set[int], max_pixels: int) -> Measurements:
        import ray

        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        try:
            dataset = ray.data.from_items(row_group_tasks(path, to_decode)).map(
                measure_row_group, fn_kwargs={"max_pixels": max_pixels}, num_cpus=1,
            )
            measured = Measurements()
            for row in dataset.iter_rows():
                measured.update(row["measured"])
            return measured
        finally:
            ray.shutdown()

    return measure
