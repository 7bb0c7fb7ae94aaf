"""The per-image work on a Ray cluster, as Ray Data tasks calling the functions the single-machine
path runs: ingestion's hashing, decoding and statistics (`transforms.landing.measure_images`, a
landing file's row group per task; only the small per-image results come back), and the decoding
and resizing into the image store's cache at the training resolution (`ImageStore.decoded`, a pack
per task). The files are on storage every node mounts, as the data root is for training on Ray.
Here, not in transforms/: transforms are plain data logic, and Ray is training's dependency (DESIGN.md)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from transforms.image_store import ImageStore
from transforms.images import Preprocessing
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


CONNECT_TIMEOUT_S = 5.0


class RayLaunchError(RuntimeError):
    """A Ray Train job that could not run or did not finish; its message is one line."""


def check_reachable(address: str) -> None:
    """Fail in one line, naming the address, when nothing answers there: `ray.init` would otherwise
    wait on the connection for minutes before a traceback."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise RayLaunchError(f"Ray cluster address {address!r} is not host:port or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise RayLaunchError(f"Ray cluster at {address} is unreachable: {error.strerror or error}") from None


@contextmanager
def connected(address: str, log_to_driver: bool = False) -> Iterator[None]:
    """This process as a driver of the cluster at `address`, for the block; an unreachable address
    fails at once in one line (`RayLaunchError`)."""
    import ray


    check_reachable(address)
    ray.init(address=address, logging_level="WARNING", log_to_driver=log_to_driver)
    try:
        yield
    finally:
        ray.shutdown()


def measure_on_ray(address: str) -> Measure:
    """`validate_batch`'s `measure`, run by Ray Data on the cluster at `address`."""

    def measure(path: Path, to_decode: set[int], max_pixels: int) -> Measurements:
        import ray

        with connected(address):
            dataset = ray.data.from_items(row_group_tasks(path, to_decode)).map(
                measure_row_group, fn_kwargs={"max_pixels": max_pixels}, num_cpus=1,
            )
            measured = Measurements()
            for row in dataset.iter_rows():
                measured.update(row["measured"])
            return measured

    return measure


def decode_pack(task: dict, store_root: str, preprocessing: Preprocessing) -> dict:
    """A Ray Data task: one pack's images decoded and resized into its cache file."""
    pixels = ImageStore(Path(store_root)).decoded(task["pack"], pl.DataFrame(task["locations"]), preprocessing)
    return {"pack": task["pack"], "images": len(pixels)}


def decode_on_ray(address: str, store_root: Path, packs: list[tuple[str, pl.DataFrame]], preprocessing: Preprocessing) -> int:
    """Write the decoded caches of `packs` (`warehouse.packs_to_decode`) on the cluster; returns the images decoded."""
    if not packs:
        return 0
    import ray

    tasks = [{"pack": pack, "locations": locations.to_dict(as_series=False)} for pack, locations in packs]
    with connected(address):
        dataset = ray.data.from_items(tasks).map(
            decode_pack, fn_kwargs={"store_root": str(store_root), "preprocessing": preprocessing}, num_cpus=1,
        )
        return sum(row["images"] for row in dataset.iter_rows())
