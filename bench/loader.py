"""Data-loading benchmark: is FFCV worth it, and does data ever starve training?

Side by side in one run, same images (the bundled digits at 32x32, repeated), same batch size and
worker count, steady-state epochs (FFCV's first epoch pays its JIT compilation and is reported
apart):
  - the .beton write modes (raw, jpg, proportion): file size and loader throughput — the choice the
    `ffcv_datasets` asset makes;
  - FFCV Loader vs a torch DataLoader decoding the PNG bytes with PIL (target >= 5x);
  - FFCV vs the in-memory ceiling, indexing a preloaded uint8 tensor (reported as a fraction);
  - FFCV vs the CPU training step of the default model (target >= 10x: data never starves training).
Prints a table, then one JSON line with the figures.

    .venv/bin/python bench/loader.py [--images 20000] [--batch-size 256] [--workers 2] [--epochs 3]
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
from training.data import _ArrayDataset, make_loader
from training.model import ImageClassifier
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
    network = ImageClassifier(ModelConfig())
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
    args = parser.parse_args()
    images, labels = digits(args.images)

    modes = {}
    with tempfile.TemporaryDirectory() as folder:
        for mode in ("raw", "jpg", "proportion"):
            path = Path(folder) / f"{mode}.beton"
            write(path, images, labels, mode)
            loader = make_loader(path, args.batch_size, args.workers, train=True)
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
    print(json.dumps({
        "ffcv_write_modes": {m: {"bytes": f["bytes"], "first_epoch_s": round(f["first_epoch_s"], 3), "images_per_s": round(f["images_per_s"])} for m, f in modes.items()},
        "pil_dataloader_images_per_s": round(pil_rate),
        "in_memory_images_per_s": round(ceiling_rate),
        "training_step_images_per_s": round(train_rate),
        "ffcv_vs_pil": round(ffcv / pil_rate, 2), "ffcv_vs_pil_target_min": 5,
        "ffcv_fraction_of_in_memory": round(ffcv / ceiling_rate, 3),
        "ffcv_vs_training": round(ffcv / train_rate, 1), "ffcv_vs_training_target_min": 10,
        "images": args.images, "batch_size": args.batch_size, "workers": args.workers, "epochs": args.epochs,
    }))


if __name__ == "__main__":
    main()
