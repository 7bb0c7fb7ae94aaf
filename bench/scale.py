"""Scale benchmark: each data stage's peak memory, throughput and warehouse footprint on generated
data, and the cost of a tick late in the history against an early one.

Two datasets, generated as ImageFolder trees (sizes are options; the defaults are the issue's):
  digits  --digits-images grayscale 32 px PNGs (the bundled digits with per-image noise), trained at 32 px
  photos  --photo-images RGB JPEG photos of mixed original sizes (224x224 to 1600x1200), trained at 224 px
Each is landed in --batches batches plus one more (the late tick's). Every stage runs the library
functions the assets call, in a fresh process, so its peak RSS is its own (and both ticks start
alike: imports loaded, nothing else warm):
  land         `flywheel land` of the folder into landing batches
  first        batch 1 ingested, dbt, its datasets and the first champion's drift reference
  tick 2       ingest + dbt + dataset writing + drift of batch 2, on top of batch 1 (no training)
  ingest       validation and storing of batches 3 .. N
  dbt          `dbt build` over the whole history
  datasets     the FFCV datasets: a shard per new batch and split (each new image decoded once, into the
               store's cache), merged into one file per split
  drift        the last batch against a new champion's 1,000-image training reference (statistics,
               embeddings); the reference is computed once per champion, so the ticks reuse theirs
  calibration  int8 calibration of an untrained network on a balanced validation sample
  tick N+1     as tick 2, for the batch after the whole history
Throughput is images per second against a bare PIL decode of the same images (target >= 0.5);
peak RSS target <= 2 GB; warehouse bytes per image target <= 1 KB; tick N+1 / tick 2 target <= 1.3.
Prints a table per dataset, then one JSON line with every figure.

    .venv/bin/python bench/scale.py [--datasets digits photos] [--digits-images 1000000] [--photo-images 100000] [--batches 20]
"""

import argparse
import io
import json
import math
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ingest import dbt_build  # bench/ingest.py: `dbt build` on a data root

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
PHOTO_SIZES = ((224, 224), (320, 240), (640, 480), (800, 800), (1024, 768), (1600, 1200))
PHOTO_CLASSES = ("cat", "dog", "fox", "owl")
TARGETS = {"peak_mib_max": 2048, "vs_decode_min": 0.5, "warehouse_bytes_per_image_max": 1024, "late_vs_early_tick_max": 1.3}


def preprocessing_of(dataset: str):
    from transforms.images import Preprocessing

    return Preprocessing(32, "squash", "grayscale") if dataset == "digits" else Preprocessing(224, "center_crop", "rgb")


def generate(dataset: str, root: Path, count: int) -> Path:
    """An ImageFolder tree of `count` distinct images."""
    rng = random.Random(0)
    if dataset == "digits":
        from transforms.simulate import digits_pool

        _, images, labels = digits_pool("all")
        noise = np.random.default_rng(0)
        for index in tqdm(range(count), desc=f"generating {count:,} digits", leave=False):
            pick = index % len(images)
            digit = Image.fromarray(images[pick]).resize((32, 32), Image.Resampling.BILINEAR)
            pixels = np.clip(np.asarray(digit, np.int16) + noise.integers(-6, 7, (32, 32)), 0, 255).astype(np.uint8)
            folder = root / str(labels[pick])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, "L").save(folder / f"{index:07d}.png")
        return root
    for index in tqdm(range(count), desc=f"generating {count:,} photos", leave=False):
        width, height = PHOTO_SIZES[index % len(PHOTO_SIZES)]
        image = Image.effect_noise((width, height), 50).convert("RGB")
        # A block whose colour and place encode the index: every file's bytes differ.
        x, y = rng.randrange(width - 32), rng.randrange(height - 32)
        image.paste((index % 256, (index // 256) % 256, rng.randrange(256)), (x, y, x + 32, y + 32))
        folder = root / PHOTO_CLASSES[index % len(PHOTO_CLASSES)]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index:07d}.jpg", quality=90)
    return root


def bare_decode_rate(source: Path, sample: int = 2000) -> float:
    """Images per second to read and decode files of the source to RGB pixels (on a sample)."""
    files = sorted(path for path in source.rglob("*") if path.is_file())[:sample]
    started = time.perf_counter()
    for path in files:
        np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("RGB"))
    return len(files) / (time.perf_counter() - started)


# --- stages, each run in a child process (`--stage`) ---------------------------------------------

def _ingest(home: Path, path: Path) -> int:
    from transforms import warehouse
    from transforms.landing import ValidationRules, declared_classes, read_landing_file, validate_batch

    with warehouse.connect(home / "warehouse.duckdb") as connection:
        frame = read_landing_file(path)
        classes = warehouse.stored_classes(connection) or declared_classes(path)
        batch = validate_batch(
            path, frame, ValidationRules(classes=(), max_pixels=100_000_000), classes,
            lambda ids, hashes: warehouse.existing_keys(connection, path.stem, ids, hashes),
        )
        warehouse.replace_batch(connection, batch, fingerprint=f"{path.stem}-bench-{'0' * 32}")
        return batch.images.height


def _datasets(home: Path, dataset: str) -> int:
    """Builds the split files; returns how many examples it encoded (the shards of new batches)."""
    from training.data import build_datasets
    from transforms import warehouse

    preprocessing = preprocessing_of(dataset)
    with warehouse.connect(home / "warehouse.duckdb", read_only=True) as connection:
        build = build_datasets(
            home / "ffcv", preprocessing.tag, warehouse.shard_fingerprints(connection),
            lambda split, batch_id: warehouse.shard_pixels(connection, split, batch_id, preprocessing),
        )
    return build.encoded


def _network(home: Path, dataset: str):
    import torch

    from training.config import ModelConfig
    from training.backbones import build_network
    from transforms import warehouse

    with warehouse.connect(home / "warehouse.duckdb", read_only=True) as connection:
        classes = len(warehouse.stored_classes(connection))
    torch.manual_seed(0)
    return build_network(ModelConfig(num_classes=classes, resolution=preprocessing_of(dataset).resolution)).eval()


def _reference(home: Path, dataset: str, training_batches: list[str]) -> np.ndarray:
    """The champion's embeddings of a 1,000-image sample of its training data: computed once per
    champion and kept, as the drift_report asset keeps them."""
    from training.inference import embed_and_predict
    from transforms import warehouse

    path = home / "reference_embeddings.npy"
    if not path.exists():
        with warehouse.connect(home / "warehouse.duckdb", read_only=True) as connection:
            reference = warehouse.split_records(connection, "train", preprocessing_of(dataset), training_batches, limit=1000)
        np.save(path, embed_and_predict(_network(home, dataset), reference.images)[0])
    return np.load(path, allow_pickle=False)


def _drift(home: Path, dataset: str, batch_id: str, training_batches: list[str]) -> int:
    from training.inference import embed_and_predict
    from transforms import warehouse
    from transforms.drift import DriftPolicy, dataset_drift, embedding_drift
    from transforms.images import DRIFT_FEATURES

    network = _network(home, dataset)
    reference_embeddings = _reference(home, dataset, training_batches)
    with warehouse.connect(home / "warehouse.duckdb", read_only=True) as connection:
        reference_stats = warehouse.image_stats(connection, training_batches, split="train")
        current_stats = warehouse.image_stats(connection, [batch_id])
        current = warehouse.batch_pixels(connection, batch_id, preprocessing_of(dataset))
        embeddings, _ = embed_and_predict(network, current.images)
    dataset_drift(reference_stats, current_stats, list(DRIFT_FEATURES), DriftPolicy(0.05, 0.1, 1000, 0.5))
    embedding_drift(reference_embeddings, embeddings, 0.01)
    return len(current.index)


def _calibration(home: Path, dataset: str) -> int:
    import polars as pl

    from training.data import read_beton
    from training.export import calibration_indices, calibration_size, export_fp32, quantize_int8

    labels = pl.read_parquet(home / "ffcv" / "val.index.parquet")["label"].to_numpy()
    size = calibration_size(512, preprocessing_of(dataset).resolution)  # the export asset's default
    images, _ = read_beton(home / "ffcv" / "val.beton", indices=calibration_indices(labels, size))
    (home / "export").mkdir(exist_ok=True)
    fp32 = export_fp32(_network(home, dataset), preprocessing_of(dataset).resolution, home / "export" / "model.onnx")
    quantize_int8(fp32, images, home / "export" / "model.int8.onnx")
    return len(images)


def _tick(home: Path, dataset: str, batch: Path, training_batches: list[str]) -> dict:
    """One tick without training: ingest the new batch, dbt, the datasets, its drift report. The
    stages' modules are imported first, as a Dagster run loads its code before its steps start: a
    tick in a fresh process would otherwise count ~10 s of imports (FFCV compiles with numba when
    imported) that the tick measured after a warm-up does not."""
    import training.data, training.inference, transforms.drift, transforms.warehouse  # noqa: E401, F401

    seconds = {}
    for name, step in (
        ("ingest", lambda: _ingest(home, batch)), ("dbt", lambda: dbt_build(home)),
        ("datasets", lambda: _datasets(home, dataset)), ("drift", lambda: _drift(home, dataset, batch.stem, training_batches)),
    ):
        started = time.perf_counter()
        step()
        seconds[name] = time.perf_counter() - started
    return {"seconds": sum(seconds.values()), "stages": seconds}


def run_stage(stage: str, home: Path, dataset: str, source: Path) -> dict:
    from transforms.land import land, open_source

    batches = sorted((home / "landing").glob("*.parquet"))
    started = time.perf_counter()
    if stage == "land":
        problems: list[str] = []
        opened = open_source(str(source), None, problems)
        report = land(opened, home / "landing", "scale", math.ceil(opened.total / BATCHES), problems)
        images = report.landed
    elif stage == "first":
        _ingest(home, batches[0])
        dbt_build(home)
        _datasets(home, dataset)
        _reference(home, dataset, [batches[0].stem])  # the first champion's, before the next batch lands
        images = len(_landed_ids(batches[0]))
    elif stage == "tick-early":
        tick = _tick(home, dataset, batches[1], [batches[0].stem])
        return tick | {"images": len(_landed_ids(batches[1]))}
    elif stage == "ingest":
        images = sum(_ingest(home, path) for path in tqdm(batches[2:-1], desc="ingesting", leave=False))
    elif stage == "dbt":
        dbt_build(home)
        images = sum(len(_landed_ids(path)) for path in batches[:-1])
    elif stage == "datasets":
        images = _datasets(home, dataset)
    elif stage == "drift":
        # A new champion's first report, over the whole history: its reference is computed here.
        (home / "reference_embeddings.npy").unlink(missing_ok=True)
        images = _drift(home, dataset, batches[-2].stem, [path.stem for path in batches[:-2]])
    elif stage == "calibration":
        images = _calibration(home, dataset)
    elif stage == "tick-late":
        tick = _tick(home, dataset, batches[-1], [path.stem for path in batches[:-1]])
        return tick | {"images": len(_landed_ids(batches[-1]))}
    else:
        raise SystemExit(f"unknown stage {stage}")
    return {"seconds": time.perf_counter() - started, "images": images}


def _landed_ids(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["image_id"]).column(0).to_pylist()


BATCHES = 20


def in_child(stage: str, home: Path, dataset: str, source: Path) -> dict:
    completed = subprocess.run(
        [sys.executable, __file__, "--stage", stage, "--home", str(home), "--datasets", dataset,
         "--source", str(source), "--batches", str(BATCHES)],
        cwd=REPO, capture_output=True, text=True,
    )
    if completed.returncode:
        raise SystemExit(f"stage {stage} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def measure(dataset: str, count: int) -> dict:
    per_batch = math.ceil(count / BATCHES)
    with tempfile.TemporaryDirectory(dir=REPO / ".flywheel" if (REPO / ".flywheel").is_dir() else None) as folder:
        home = Path(folder)
        source = generate(dataset, home / "source", count + per_batch)
        decode = bare_decode_rate(source)
        stages = {}
        for stage in ("land", "first", "tick-early", "ingest", "dbt", "datasets", "drift", "calibration", "tick-late"):
            print(f"{dataset}: {stage} ...", file=sys.stderr, flush=True)
            stages[stage] = in_child(stage, home, dataset, source)
        stored = sum(len(_landed_ids(path)) for path in (home / "landing").glob("*.parquet"))
        warehouse_bytes = (home / "warehouse.duckdb").stat().st_size
    for figures in stages.values():
        figures["images_per_second"] = figures["images"] / figures["seconds"]
        figures["vs_decode"] = figures["images_per_second"] / decode
    return {
        "images": count + per_batch, "batches": BATCHES + 1, "bare_decode_images_per_second": decode,
        "stages": stages, "warehouse_bytes_per_image": warehouse_bytes / stored,
        "late_vs_early_tick": stages["tick-late"]["seconds"] / stages["tick-early"]["seconds"],
    }


def report(dataset: str, result: dict) -> None:
    print(f"\n{dataset}: {result['images']:,} images in {result['batches']} batches; bare decode "
          f"{result['bare_decode_images_per_second']:,.0f} img/s")
    print(f"{'stage':<13}{'seconds':>10}{'img/s':>12}{'vs decode':>11}{'peak MiB':>10}")
    for stage, figures in result["stages"].items():
        print(f"{stage:<13}{figures['seconds']:>10.1f}{figures['images_per_second']:>12,.0f}"
              f"{figures['vs_decode']:>11.2f}{figures['peak_mib']:>10.0f}")
    early, late = result["stages"]["tick-early"], result["stages"]["tick-late"]
    for name, tick in (("tick 2", early), (f"tick {result['batches']}", late)):
        print(f"{name}: " + ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in tick["stages"].items()))
    print(f"warehouse bytes/image {result['warehouse_bytes_per_image']:,.0f} (target <= 1 KB); late vs early tick "
          f"{result['late_vs_early_tick']:.2f}x (target <= 1.3x); peak RSS target <= 2 GB; vs decode target >= 0.5")


def main() -> None:
    global BATCHES
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "photos"], choices=["digits", "photos"])
    parser.add_argument("--digits-images", type=int, default=1_000_000)
    parser.add_argument("--photo-images", type=int, default=100_000)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    BATCHES = args.batches
    if args.stage:
        figures = run_stage(args.stage, args.home, args.datasets[0], args.source)
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # dbt, FFCV's writer
        print(json.dumps(figures | {"peak_mib": max(own, children) / 1024}))
        return
    results = {}
    for dataset in args.datasets:
        results[dataset] = measure(dataset, args.digits_images if dataset == "digits" else args.photo_images)
        report(dataset, results[dataset])
    print(json.dumps(_rounded({"targets": TARGETS, "datasets": results})))


def _rounded(value):
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    return round(value, 3) if isinstance(value, float) else value


if __name__ == "__main__":
    main()
