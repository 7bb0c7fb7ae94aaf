"""Ingestion benchmark: does the cost of a new batch follow the batch, not the history?

Measures, side by side in one run:
  1. ingest + dbt build of one new batch with 1 vs 20 batches already in the warehouse (target <= 1.3x);
  2. ingestion throughput (read, validate, decode, statistics, load) against the bare cost of
     decoding the same images with PIL (target >= 0.5x);
  3. the peak resident memory of ingesting one landing file of RGB photos (written by `flywheel
     land`) in a fresh process, at two sizes (target: flat; the image bytes are streamed), and the
     warehouse file's bytes per image after dbt built its models (target <= 1 KB; the bytes live
     in the image store).
Prints a table, then one JSON line with the figures.

    .venv/bin/python bench/ingest.py [--batch-size 360] [--repeats 3] [--memory-sizes 1000 10000]
"""

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image
from tqdm import tqdm

from transforms import warehouse
from transforms.classes import DIGITS_CLASSES
from transforms.landing import ValidationRules, read_landing_file, validate_batch
from transforms.simulate import SimulationSpec, simulate_batches

REPO = Path(__file__).resolve().parent.parent
DBT = [str(Path(sys.executable).parent / "dbt"), "build", "--quiet", "--project-dir", str(REPO / "dbt_project"),
       "--profiles-dir", str(REPO / "dbt_project")]


def land(home: Path, prefix: str, batches: int, size: int, seed: int) -> list[Path]:
    # A touch of noise makes every image's bytes unique, so no row is a duplicate of another batch's.
    spec = SimulationSpec(batches=batches, batch_size=size, pool="all", drift="noise", strength=0.02, prefix=prefix, seed=seed)
    return simulate_batches(home / "landing", spec)[0]


def ingest(home: Path, path: Path) -> None:
    with warehouse.connect(home / "warehouse.duckdb") as connection:
        batch = validate_batch(
            path, read_landing_file(path), ValidationRules(classes=(), max_pixels=4096 * 4096), list(DIGITS_CLASSES),
            lambda ids, hashes: warehouse.existing_keys(connection, path.stem, ids, hashes),
        )
        warehouse.replace_batch(connection, batch, fingerprint="bench")


def dbt_build(home: Path) -> None:
    subprocess.run(DBT, check=True, env={"FLYWHEEL_HOME": str(home), "PATH": "/usr/bin:/bin"}, capture_output=True)


def new_batch_cost(history: int, size: int, repeats: int) -> float:
    """Median seconds to ingest and transform one new batch on top of `history` batches."""
    with tempfile.TemporaryDirectory() as folder:
        home = Path(folder)
        for path in tqdm(land(home, "history", history, size, seed=1), desc=f"history of {history}", leave=False):
            ingest(home, path)
        dbt_build(home)
        timings = []
        for repeat in range(repeats):
            (path,) = land(home, f"new{repeat}", 1, size, seed=100 + repeat)
            started = time.perf_counter()
            ingest(home, path)
            dbt_build(home)
            timings.append(time.perf_counter() - started)
        return statistics.median(timings)


def throughput(size: int) -> tuple[float, float]:
    """(ingestion images/s, bare PIL decode images/s) on the same batch. Both are warmed up first,
    and the warehouse connection is opened outside the timing: this measures the per-image work."""
    with tempfile.TemporaryDirectory() as folder:
        home = Path(folder)
        (path,) = land(home, "big", 1, size, seed=7)
        (warmup,) = land(home, "warmup", 1, 200, seed=8)
        images = pl.read_parquet(path)["image"].to_list()

        def decode_all(batch: list[bytes]) -> None:
            for data in batch:
                np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

        decode_all(images[:200])
        started = time.perf_counter()
        decode_all(images)
        decode = len(images) / (time.perf_counter() - started)

        with warehouse.connect(home / "warehouse.duckdb") as connection:
            for landing_file in (warmup, path):
                started = time.perf_counter()
                batch = validate_batch(
                    landing_file, read_landing_file(landing_file), ValidationRules(classes=(), max_pixels=4096 * 4096), list(DIGITS_CLASSES),
                    lambda ids, hashes: warehouse.existing_keys(connection, landing_file.stem, ids, hashes),
                )
                warehouse.replace_batch(connection, batch, fingerprint="bench")
                elapsed = time.perf_counter() - started
        return len(images) / elapsed, decode


INGEST_CHILD = """
import resource, sys
from pathlib import Path
from transforms import warehouse
from transforms.landing import ValidationRules, declared_classes, read_landing_file, validate_batch
path = Path(sys.argv[1])
with warehouse.connect(Path(sys.argv[2])) as connection:
    batch = validate_batch(path, read_landing_file(path), ValidationRules(classes=(), max_pixels=4096 * 4096), declared_classes(path))
    warehouse.replace_batch(connection, batch, fingerprint="bench")
print(batch.images.height, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def ingestion_peak(count: int) -> tuple[float, float]:
    """(peak resident MiB, warehouse bytes per image) of ingesting one landing file of `count` 256 px
    JPEG photos, in a fresh process."""
    from land import make_folder  # bench/land.py: the same generated photos

    from transforms.land import land as land_folder
    from transforms.land import open_source

    with tempfile.TemporaryDirectory() as folder:
        source = make_folder(Path(folder) / "photos", count, 256)
        report = land_folder(open_source(str(source), None, []), Path(folder) / "landing", "photos", count, [])
        (path,) = report.written
        completed = subprocess.run(
            [sys.executable, "-c", INGEST_CHILD, str(path), str(Path(folder) / "warehouse.duckdb")],
            cwd=REPO, capture_output=True, text=True,
        )
        if completed.returncode:
            raise SystemExit(f"ingestion failed: {completed.stderr.strip().splitlines()[-1]}")
        accepted, peak_kib = completed.stdout.strip().splitlines()[-1].split()  # after any progress bar DuckDB drew
        assert int(accepted) == count, (accepted, count)
        dbt_build(Path(folder))  # the warehouse as a tick leaves it: raw tables and dbt's models
        return int(peak_kib) / 1024, (Path(folder) / "warehouse.duckdb").stat().st_size / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=360)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--throughput-images", type=int, default=10000)
    parser.add_argument("--memory-sizes", type=int, nargs=2, default=[1000, 10000])
    args = parser.parse_args()

    one = new_batch_cost(1, args.batch_size, args.repeats)
    twenty = new_batch_cost(20, args.batch_size, args.repeats)
    ingest_rate, decode_rate = throughput(args.throughput_images)
    small, large = args.memory_sizes
    measured = {size: ingestion_peak(size) for size in (small, large)}
    peaks = {size: peak for size, (peak, _) in measured.items()}
    bytes_per_image = {size: per_image for size, (_, per_image) in measured.items()}
    figures = {
        "new_batch_seconds_history_1": round(one, 3),
        "new_batch_seconds_history_20": round(twenty, 3),
        "history_cost_ratio": round(twenty / one, 3),
        "history_cost_ratio_target_max": 1.3,
        "ingest_images_per_second": round(ingest_rate, 1),
        "pil_decode_images_per_second": round(decode_rate, 1),
        "ingest_vs_decode_ratio": round(ingest_rate / decode_rate, 3),
        "ingest_vs_decode_ratio_target_min": 0.5,
        "batch_size": args.batch_size,
        "throughput_images": args.throughput_images,
        "ingest_peak_mib": {str(size): round(peak, 1) for size, peak in peaks.items()},
        "ingest_peak_growth_ratio": round(peaks[large] / peaks[small], 3),
        "warehouse_bytes_per_image": {str(size): round(value) for size, value in bytes_per_image.items()},
        "warehouse_bytes_per_image_target_max": 1024,
    }
    rows = [
        ("new batch, 1 batch of history", f"{one:.2f} s", ""),
        ("new batch, 20 batches of history", f"{twenty:.2f} s", ""),
        ("ratio 20 vs 1", f"{twenty / one:.2f}x", "<= 1.3x"),
        ("ingestion throughput", f"{ingest_rate:,.0f} img/s", ""),
        ("bare PIL decode", f"{decode_rate:,.0f} img/s", ""),
        ("ratio ingestion vs decode", f"{ingest_rate / decode_rate:.2f}x", ">= 0.5x"),
        (f"peak memory, {small:,} photos", f"{peaks[small]:.0f} MiB", ""),
        (f"peak memory, {large:,} photos", f"{peaks[large]:.0f} MiB", ""),
        ("ratio", f"{peaks[large] / peaks[small]:.2f}x", "flat"),
        (f"warehouse bytes/image, {small:,} photos", f"{bytes_per_image[small]:,.0f} B", "<= 1 KB"),
        (f"warehouse bytes/image, {large:,} photos", f"{bytes_per_image[large]:,.0f} B", "<= 1 KB"),
    ]
    print(f"\n{'measure':<36}{'value':>16}  target")
    for name, value, target in rows:
        print(f"{name:<36}{value:>16}  {target}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
