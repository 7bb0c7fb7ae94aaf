"""Drift-check benchmark: is monitoring a batch cheap next to ingesting it?

For a batch of N images with a reference of N images of statistics (N = 1,000 and 100,000), measures
side by side in one run: ingesting the batch (read, validate, decode, statistics, load) and the
drift check on its statistics (per-feature KS or Wasserstein, as `drift_report` does), plus the
embedding and prediction tests on their fixed-size samples. Target: drift check <= 0.2x ingest.
Prints a table, then one JSON line with the figures.

    .venv/bin/python bench/drift.py [--sizes 1000 100000]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from transforms import warehouse
from transforms.drift import DriftPolicy, dataset_drift, embedding_drift, prediction_drift
from transforms.images import STAT_COLUMNS
from transforms.classes import DIGITS_CLASSES
from transforms.landing import ValidationRules, read_landing_file, validate_batch
from transforms.simulate import SimulationSpec, simulate_batches


def ingest_seconds(size: int) -> tuple[float, pl.DataFrame]:
    """Seconds to ingest one batch of `size` images, and the statistics it produced."""
    with tempfile.TemporaryDirectory() as folder:
        home = Path(folder)
        (path,), _ = simulate_batches(
            home / "landing", SimulationSpec(batches=1, batch_size=size, pool="all", drift="noise", strength=0.02, prefix="bench")
        )
        with warehouse.connect(home / "warehouse.duckdb") as connection:
            started = time.perf_counter()
            batch = validate_batch(
                path, read_landing_file(path), ValidationRules(classes=(), max_pixels=4096 * 4096), list(DIGITS_CLASSES),
                lambda ids, hashes: warehouse.existing_keys(connection, "bench", ids, hashes),
            )
            warehouse.replace_batch(connection, batch, fingerprint="bench")
            elapsed = time.perf_counter() - started
        return elapsed, batch.images.select(STAT_COLUMNS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 100_000])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows, figures = [], {}
    for size in args.sizes:
        ingest, current = ingest_seconds(size)
        reference = current.sample(fraction=1.0, shuffle=True, seed=1).with_columns(pl.all() * 1.01)
        started = time.perf_counter()
        result = dataset_drift(reference, current, list(STAT_COLUMNS), DriftPolicy())
        features = time.perf_counter() - started
        embeddings = rng.normal(size=(size, 128)), rng.normal(size=(size, 128))
        predictions = rng.integers(0, 10, size), rng.integers(0, 10, size)
        started = time.perf_counter()
        embedding_drift(*embeddings)  # samples 400 rows per side
        prediction_drift(*predictions, 10, DriftPolicy())
        samples = time.perf_counter() - started
        drift = features + samples
        figures[str(size)] = {
            "ingest_seconds": round(ingest, 3), "feature_drift_seconds": round(features, 4),
            "embedding_and_prediction_seconds": round(samples, 3), "drift_seconds": round(drift, 3),
            "drift_vs_ingest": round(drift / ingest, 3), "feature_drift_vs_ingest": round(features / ingest, 4),
            "method": result.features[0].method,
        }
        rows.append((size, ingest, features, samples))
    print(f"\n{'images':>8}{'ingest':>9}{'statistics drift':>18}{'emb.+pred.':>12}{'statistics/ingest':>19}{'all/ingest':>12}")
    for size, ingest, features, samples in rows:
        print(f"{size:>8,}{ingest:>8.2f}s{features:>17.3f}s{samples:>11.2f}s{features / ingest:>19.3f}{(features + samples) / ingest:>12.3f}")
    print("target: the drift check on a batch's statistics <= 0.2x ingesting it; the embedding and prediction tests\n"
          "work on fixed-size samples (400 rows per side), so their cost stays flat as batches grow")
    print(json.dumps({"sizes": figures, "target_max_statistics_drift_vs_ingest": 0.2}))


if __name__ == "__main__":
    main()
