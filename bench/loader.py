"""Data-loading benchmark: is FFCV worth it, and does data ever starve training?

Side by side in one run, same images (the bundled digits at 32x32, repeated), same batch size and
worker count, steady-state epochs of compiled loaders (FFCV's first epoch pays its JIT compilation
and is reported apart; bench/loader_compile.py measures when compiling pays):
  - the .beton write modes (raw, jpg, proportion): file size and loader throughput — the choice the
    `ffcv_datasets` asset makes;
  - FFCV Loader vs a torch DataLoader decoding the PNG bytes with PIL (target >= 5x);
  - FFCV vs the in-memory ceiling, indexing a preloaded uint8 tensor (reported as a fraction);
  - FFCV vs the CPU training step of the default model (target >= 10x: data never starves training);
  - one file written whole against the same images written as --shards per-batch shards and merged
    (what `ffcv_datasets` does): write and merge seconds, file size, loader throughput, and a tick's
    dataset cost (one new shard encoded + a merge) against rewriting the whole file.
Prints a table, then one JSON line with the figures.

    .venv/bin/python bench/loader.py [--images 20000] [--batch-size 256] [--workers 2] [--epochs 3] [--shards 20]
"""

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ffcv.fields import IntField, RGBImageField
from ffcv.writer import DatasetWriter
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from training.config import ModelConfig
from training.data import _ArrayDataset, make_loader, merge_betons, write_beton
from training.backbones import build_network
from transforms.simulate import digits_pool


def digits(count: int) -> tuple[np.ndarray, np.ndarray]:
    _, images, labels = digits_pool("all")
    upscaled = np.stack([np.asarray(Image.fromarray(i, mode="L").resize((32, 32), Image.Resampling.BILINEAR)) for i in images])
    rgb = np.repeat(upscaled[:, :, :, None], 3, axis=3)
    picks = np.resize(np.arange(len(labels)), count)
    return rgb[picks], labels[picks]


def write(path: Path, images: np.ndarray, labels: np.ndarray, mode: str) -> None:
    field = RGBImageField(write_mode=mode, max_resolution=32, jpeg_quality=90, compress_probability=0.5)
    DatasetWriter(str(path), {"image": field, "label": IntField()}, num_workers=2).from_indexed_dataset(_ArrayDataset(images, labels))


def epochs_per_second(loader, epochs: int, label: str) -> tuple[float, float]:
    """(seconds of the first epoch, images/s over the following steady-state epochs)."""
    def one_epoch() -> int:
        seen = 0
        for images, _ in loader:
            seen += len(images)
        return seen

    started = time.perf_counter()
    one_epoch()
    first = time.perf_counter() - started
    started, seen = time.perf_counter(), 0
    for _ in tqdm(range(epochs), desc=label, leave=False):
        seen += one_epoch()
    return first, seen / (time.perf_counter() - started)


def seconds(work) -> tuple[float, object]:
    started = time.perf_counter()
    result = work()
    return time.perf_counter() - started, result


def shards_against_one_file(images: np.ndarray, labels: np.ndarray, shards: int, batch_size: int, workers: int, epochs: int) -> dict:
    """The same examples as one written file and as `shards` shards merged into one."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        whole_s, whole = seconds(lambda: write_beton(root / "whole.beton", images, labels))
        parts = np.array_split(np.arange(len(labels)), shards)
        shards_s, paths = seconds(lambda: [write_beton(root / f"shard-{i}.beton", images[rows], labels[rows]) for i, rows in enumerate(parts)])
        merge_s, merged = seconds(lambda: merge_betons(paths, root / "merged.beton"))
        _, whole_rate = epochs_per_second(make_loader(whole, batch_size, workers, train=True, compile_min_images=0), epochs, "ffcv one file")
        _, merged_rate = epochs_per_second(make_loader(merged, batch_size, workers, train=True, compile_min_images=0), epochs, "ffcv merged shards")
        tick_s = shards_s / shards + merge_s  # the newest shard is encoded, then the split merged
        return {
            "shards": shards, "whole_write_s": whole_s, "shards_write_s": shards_s, "merge_s": merge_s,
            "whole_bytes": whole.stat().st_size, "merged_bytes": merged.stat().st_size,
            "whole_images_per_s": whole_rate, "merged_images_per_s": merged_rate,
            "tick_shard_and_merge_s": tick_s, "tick_vs_rewrite": tick_s / whole_s,
        }


class PngDataset(Dataset):
    """What a plain PyTorch pipeline does: PNG bytes decoded by PIL in the workers."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.labels = labels
        self.encoded = []
        for image in images:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            self.encoded.append(buffer.getvalue())

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        pixels = np.asarray(Image.open(io.BytesIO(self.encoded[index])).convert("RGB"))
        return torch.from_numpy(pixels.copy()), int(self.labels[index])


def in_memory(images: torch.Tensor, labels: torch.Tensor, batch_size: int):
    """The ceiling: random batches indexed out of a preloaded uint8 tensor."""
    order = torch.randperm(len(labels))
    for start in range(0, len(labels) - batch_size + 1, batch_size):
        index = order[start : start + batch_size]
        yield images[index], labels[index]


def training_throughput(batch_size: int, steps: int = 8) -> float:
    network = build_network(ModelConfig())
    optimizer = torch.optim.AdamW(network.parameters())
    batch = torch.randint(0, 255, (batch_size, 32, 32, 3), dtype=torch.uint8)
    target = torch.randint(0, 10, (batch_size,))
    for step in range(steps + 2):
        if step == 2:
            started = time.perf_counter()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(network(batch), target).backward()
        optimizer.step()
    return steps * batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--shards", type=int, default=20)
    args = parser.parse_args()
    images, labels = digits(args.images)

    modes = {}
    with tempfile.TemporaryDirectory() as folder:
        for mode in ("raw", "jpg", "proportion"):
            path = Path(folder) / f"{mode}.beton"
            write(path, images, labels, mode)
            loader = make_loader(path, args.batch_size, args.workers, train=True, compile_min_images=0)
            first, rate = epochs_per_second(loader, args.epochs, f"ffcv {mode}")
            modes[mode] = {"bytes": path.stat().st_size, "first_epoch_s": first, "images_per_s": rate}

    pil_first, pil_rate = epochs_per_second(
        DataLoader(PngDataset(images, labels), batch_size=args.batch_size, num_workers=args.workers, shuffle=True, drop_last=True, persistent_workers=True),
        args.epochs, "torch DataLoader + PIL",
    )
    tensors = (torch.from_numpy(images), torch.from_numpy(labels))
    _, ceiling_rate = epochs_per_second(
        type("Ceiling", (), {"__iter__": lambda self: in_memory(*tensors, args.batch_size)})(), args.epochs, "in-memory tensor"
    )
    train_rate = training_throughput(args.batch_size)
    sharded = shards_against_one_file(images, labels, args.shards, args.batch_size, args.workers, args.epochs)
    ffcv = modes["raw"]["images_per_s"]

    print(f"\n{'loader':<34}{'size':>10}{'first epoch':>14}{'steady img/s':>16}")
    for mode, figures in modes.items():
        print(f"{'FFCV ' + mode:<34}{figures['bytes'] / 2**20:>8.1f}MB{figures['first_epoch_s']:>13.2f}s{figures['images_per_s']:>16,.0f}")
    print(f"{'torch DataLoader + PIL (PNG)':<34}{'':>10}{pil_first:>13.2f}s{pil_rate:>16,.0f}")
    print(f"{'in-memory uint8 tensor':<34}{'':>10}{'':>14}{ceiling_rate:>16,.0f}")
    print(f"{'CPU training step (default model)':<34}{'':>10}{'':>14}{train_rate:>16,.0f}")
    print(f"\nFFCV raw vs PIL DataLoader: {ffcv / pil_rate:.1f}x (target >= 5)")
    print(f"FFCV raw vs in-memory ceiling: {ffcv / ceiling_rate:.2f} of it")
    print(f"FFCV raw vs training step: {ffcv / train_rate:.1f}x (target >= 10)")
    print(f"chosen write mode: raw ({modes['raw']['bytes'] / modes['jpg']['bytes']:.1f}x the jpg file, "
          f"{ffcv / modes['jpg']['images_per_s']:.1f}x its throughput, and lossless)")
    print(f"\n{'raw .beton, same images':<34}{'write s':>10}{'merge s':>10}{'size':>10}{'steady img/s':>16}")
    print(f"{'one file':<34}{sharded['whole_write_s']:>10.2f}{'':>10}{sharded['whole_bytes'] / 2**20:>8.1f}MB{sharded['whole_images_per_s']:>16,.0f}")
    print(f"{str(args.shards) + ' shards merged':<34}{sharded['shards_write_s']:>10.2f}{sharded['merge_s']:>10.2f}"
          f"{sharded['merged_bytes'] / 2**20:>8.1f}MB{sharded['merged_images_per_s']:>16,.0f}")
    print(f"merged vs one file, loader throughput: {sharded['merged_images_per_s'] / sharded['whole_images_per_s']:.2f}x; "
          f"a tick's datasets (one new shard + merge) vs a rewrite: {sharded['tick_vs_rewrite']:.3f}x")
    print(json.dumps({
        "ffcv_write_modes": {m: {"bytes": f["bytes"], "first_epoch_s": round(f["first_epoch_s"], 3), "images_per_s": round(f["images_per_s"])} for m, f in modes.items()},
        "pil_dataloader_images_per_s": round(pil_rate),
        "in_memory_images_per_s": round(ceiling_rate),
        "training_step_images_per_s": round(train_rate),
        "ffcv_vs_pil": round(ffcv / pil_rate, 2), "ffcv_vs_pil_target_min": 5,
        "ffcv_fraction_of_in_memory": round(ffcv / ceiling_rate, 3),
        "ffcv_vs_training": round(ffcv / train_rate, 1), "ffcv_vs_training_target_min": 10,
        "shards_vs_one_file": {k: round(v, 3) if isinstance(v, float) else v for k, v in sharded.items()}
        | {"merged_vs_one_file_throughput": round(sharded["merged_images_per_s"] / sharded["whole_images_per_s"], 3)},
        "images": args.images, "batch_size": args.batch_size, "workers": args.workers, "epochs": args.epochs,
    }))


if __name__ == "__main__":
    main()
