"""Is the GPU fed? One training through the `trained_model` asset on photo-sized images, its
throughput against the loader's alone.

Writes train/val/test `.beton` files of `--images` photo-sized images (the bundled digits, upscaled
to `--resolution` with a random shift, tint and grain per copy so no two are alike) with the
product's own writer, a shard of `--shard` images at a time merged into each split's file (memory
stays at one shard), then materializes `trained_model` with Dagster (the asset itself: Pipes,
torchrun, Lightning, on the machine's accelerator with its defaults: bf16 and `torch.compile` on
GPUs) and reads its value. Then, on the same machine, the training split's loader alone (the
same FFCV pipeline, recipe and threads, moving batches to the device) for one epoch after a
warm-up epoch. Prints a table, then one JSON line:

  loader images/s      what FFCV decodes, augments and moves to the device with nothing else running
  step images/s        forward, backward and optimizer alone (what a loader that never waits would give)
  training images/s    what the training achieved, from its second batch on
  loader wait share    the share of training time spent waiting for the next batch

    .venv/bin/python bench/throughput.py [--images 2000] [--resolution 224] [--backbone resnet18] \
        [--epochs 3] [--batch-size 256] [--recipe photos] [--num-workers N] [--loader-sweep 1 2 4 8]
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import dagster as dg
import numpy as np
import torch
from PIL import Image

from orchestration.assets.training import trained_model
from orchestration.io_manager import JsonIOManager, value_path
from orchestration.resources import FlywheelHome, TrainingCompute
from training.config import RECIPES
from training.data import FFCVDataModule, beton_length, make_loader, merge_betons, write_beton
from transforms.simulate import NUM_CLASSES, digits_pool

SPLIT_SHARES = {"train": 0.8, "val": 0.1, "test": 0.1}


def photo_sized(digits: np.ndarray, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """`[N, R, R, 3]` uint8: each 8x8 digit upscaled, shifted by up to an eighth of the side, tinted
    and grained, so every copy is a different image of the same class."""
    out = np.empty((len(digits), resolution, resolution, 3), np.uint8)
    shift = resolution // 8
    for i, digit in enumerate(digits):
        side = resolution - shift
        image = np.asarray(Image.fromarray(digit).resize((side, side), Image.BILINEAR), np.float32)
        canvas = np.zeros((resolution, resolution), np.float32)
        dy, dx = rng.integers(0, shift + 1, 2)
        canvas[dy:dy + side, dx:dx + side] = image
        tint = rng.uniform(0.5, 1.0, 3)
        background = rng.uniform(0, 80, 3)
        grain = rng.normal(0, 12, (resolution, resolution, 1))
        out[i] = np.clip(background + canvas[..., None] * tint + grain, 0, 255).astype(np.uint8)
    return out


def write_splits(directory: Path, images: int, resolution: int, shard: int, workers: int, seed: int) -> dict:
    """The splits' `.beton` files and the manifest `ffcv_datasets` would store for them."""
    _, digits, labels = digits_pool("all")
    digits = (digits.astype(np.float32) * (255 / 16)).astype(np.uint8)
    rng = np.random.default_rng(seed)
    splits = {}
    for split, share in SPLIT_SHARES.items():
        count, shards = int(images * share), []
        for start in range(0, count, shard):
            picks = rng.integers(0, len(labels), min(shard, count - start))
            path = directory / "shards" / split / f"{start:09d}.beton"
            write_beton(path, photo_sized(digits[picks], resolution, rng), labels[picks], num_workers=workers)
            shards.append(path)
        merge_betons(shards, directory / f"{split}.beton")
        for path in shards:
            path.unlink()
        splits[split] = {
            "path": str(directory / f"{split}.beton"), "index": "", "fingerprint": f"{split}-{count}-{resolution}-{seed}",
            "examples": beton_length(directory / f"{split}.beton"), "batches": ["throughput-000"],
        }
    return {
        "dir": str(directory), "resolution": resolution, "resize": "squash", "mode": "rgb",
        "classes": [str(label) for label in range(NUM_CLASSES)], "splits": splits,
    }


def loader_alone(beton_dir: Path, config: dict, resolution: int, workers: int) -> float:
    """Images/s of the training split's loader by itself, on the machine's accelerator: the second
    of two epochs (the first compiles FFCV's pipeline)."""
    recipe = RECIPES[config["recipe"]]
    decoder = FFCVDataModule(beton_dir, config["batch_size"], workers, seed=0, resolution=resolution, augment=recipe).crop_decoder
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = make_loader(
        beton_dir / "train.beton", config["batch_size"], workers, train=True, device=device, augment=recipe, decoder=decoder,
        compile_min_images=0,
    )
    rate = 0.0
    for _ in range(2):
        images, started = 0, time.perf_counter()
        for batch, _ in loader:
            images += len(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rate = images / (time.perf_counter() - started)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--recipe", default="photos")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=None, help="loader threads per process (default: the product's)")
    parser.add_argument(
        "--loader-sweep", type=int, nargs="*", default=[], help="also time the loader alone with these thread counts",
    )
    parser.add_argument("--shard", type=int, default=2048, help="images written at a time")
    parser.add_argument("--home", type=Path, default=None, help="data root (default: a temporary folder)")
    args = parser.parse_args()

    home = args.home or Path(tempfile.mkdtemp(prefix="flywheel-throughput-"))
    flywheel = FlywheelHome(home=str(home))
    workers = len(os.sched_getaffinity(0))
    started = time.perf_counter()
    datasets = write_splits(flywheel.root / "ffcv", args.images, args.resolution, args.shard, workers, seed=0)
    write_seconds = time.perf_counter() - started
    stored = value_path(flywheel, dg.AssetKey("ffcv_datasets"), None)
    stored.parent.mkdir(parents=True, exist_ok=True)
    stored.write_text(json.dumps(datasets))

    compute = TrainingCompute(num_workers=args.num_workers)
    config = {"backbone": args.backbone, "recipe": args.recipe, "epochs": args.epochs, "batch_size": args.batch_size}
    result = dg.materialize(
        [trained_model, dg.AssetSpec("ffcv_datasets"), dg.AssetSpec("tuned_hyperparameters")],
        selection=[trained_model.key],
        resources={"flywheel": flywheel, "compute": compute, "io_manager": JsonIOManager(flywheel=flywheel)},
        run_config={"ops": {"trained_model": {"config": config}}},
    )
    # The asset's value carries the training's figures as numbers (its metadata shows them formatted).
    trained = result.output_for_node("trained_model")
    loader_rate = loader_alone(flywheel.root / "ffcv", config, args.resolution, trained["loader_threads"])
    sweep = {threads: loader_alone(flywheel.root / "ffcv", config, args.resolution, threads) for threads in args.loader_sweep}

    figures = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "cpus": workers,
        "loader_threads": trained["loader_threads"],
        "backbone": args.backbone,
        "resolution": args.resolution,
        "recipe": args.recipe,
        "batch_size": args.batch_size,
        "train_images": datasets["splits"]["train"]["examples"],
        "epochs": trained["epochs_completed"],
        "precision": trained["precision"],
        "compiled": trained["compiled"],
        "write_seconds": round(write_seconds, 1),
        "warmup_seconds": trained["warmup_seconds"],
        "train_seconds": trained["train_seconds"],
        "loader_images_per_s": round(loader_rate, 1),
        "step_images_per_s": trained["step_images_per_s"],
        "training_images_per_s": trained["images_per_s"],
        "loader_wait_share": trained["loader_wait_share"],
        "val_accuracy": trained["val_accuracy"],
        **{f"loader_images_per_s_{threads}_threads": round(rate, 1) for threads, rate in sweep.items()},
    }
    width = max(map(len, figures))
    for name, value in figures.items():
        print(f"{name:<{width}}  {value}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
