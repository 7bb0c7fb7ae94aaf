"""FFCV datasets: the `.beton` schema, writing one split, and the loaders training and evaluation use.

Schema (one place, as FFCV's own examples keep it):
    image  RGBImageField, raw uint8 pixels at the training resolution. Measured by bench/loader.py
           on 32x32 digits: raw loads ~7x faster than jpg and ~5x faster than proportion, for 2x the
           bytes of jpg, and loses nothing; at this size the file is small either way.
    label  IntField
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import lightning as L
import numpy as np
import torch
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.transforms import Squeeze, ToDevice, ToTensor
from ffcv.writer import DatasetWriter

SPLITS = ("train", "val", "test")


class _ArrayDataset:
    """The indexed-dataset protocol DatasetWriter reads: `(image HWC uint8, label int)` per index."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])


def write_beton(path: Path, images: np.ndarray, labels: np.ndarray, num_workers: int = 1) -> Path:
    """Write one split atomically: a temporary file, renamed into place only when complete."""
    if len(labels) == 0:
        raise ValueError(f"cannot write {path}: the split has no examples")
    resolution = images.shape[1]
    fields = {
        "image": RGBImageField(write_mode="raw", max_resolution=resolution),
        "label": IntField(),
    }
    partial = path.with_name(f".{path.name}.partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    DatasetWriter(str(partial), fields, num_workers=num_workers).from_indexed_dataset(_ArrayDataset(images, labels))
    os.replace(partial, path)
    return path


def image_pipeline(device: torch.device | None = None) -> list:
    """uint8 NHWC tensors: the model's own input format (it normalises inside the graph)."""
    pipeline = [SimpleRGBImageDecoder(), ToTensor()]
    if device is not None and device.type == "cuda":
        pipeline.append(ToDevice(device, non_blocking=True))
    return pipeline


def label_pipeline(device: torch.device | None = None) -> list:
    pipeline = [IntDecoder(), ToTensor(), Squeeze(1)]
    if device is not None and device.type == "cuda":
        pipeline.append(ToDevice(device, non_blocking=True))
    return pipeline


def make_loader(
    path: Path,
    batch_size: int,
    num_workers: int,
    train: bool,
    seed: int = 0,
    distributed: bool = False,
    device: torch.device | None = None,
    indices: np.ndarray | None = None,
) -> Loader:
    return Loader(
        str(path),
        indices=indices,
        batch_size=batch_size,
        num_workers=num_workers,
        order=OrderOption.RANDOM if train else OrderOption.SEQUENTIAL,
        # Evaluation sees every example; training drops a ragged last batch (BatchNorm needs > 1).
        drop_last=train,
        distributed=distributed,
        seed=seed,
        pipelines={"image": image_pipeline(device), "label": label_pipeline(device)},
    )


def beton_batches(
    path: Path, batch_size: int = 256, num_workers: int = 1, indices: np.ndarray | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A split, or the examples at sorted `indices` of it, a batch at a time in written order:
    `(images uint8 [B, H, W, 3], labels int64 [B])`, copies (the loader reuses its buffers)."""
    for image_batch, label_batch in make_loader(path, batch_size, num_workers, train=False, indices=indices):
        yield image_batch.numpy().copy(), label_batch.numpy().astype(np.int64)


def read_beton(
    path: Path, batch_size: int = 256, num_workers: int = 1, indices: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A split, or the examples at sorted `indices` of it, as whole arrays: for bounded samples
    (calibration) and small test data; evaluation streams with `beton_batches`."""
    images, labels = zip(*beton_batches(path, batch_size, num_workers, indices))
    return np.concatenate(images), np.concatenate(labels)


def beton_length(path: Path) -> int:
    """How many examples a .beton holds, from its header."""
    from ffcv.reader import Reader

    return int(Reader(str(path)).num_samples)


class FFCVDataModule(L.LightningDataModule):
    """Builds FFCV loaders inside the dataloader hooks, where the process group already exists."""

    def __init__(self, beton_dir: Path, batch_size: int, num_workers: int, seed: int):
        super().__init__()
        self.beton_dir = Path(beton_dir)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed

    def _distributed(self) -> bool:
        return self.trainer is not None and self.trainer.world_size > 1

    def _device(self) -> torch.device | None:
        return self.trainer.strategy.root_device if self.trainer is not None else None

    def train_dataloader(self) -> Loader:
        return make_loader(
            self.beton_dir / "train.beton", self.batch_size, self.num_workers, train=True,
            seed=self.seed, distributed=self._distributed(), device=self._device(),
        )

    def val_dataloader(self) -> Loader:
        return make_loader(
            self.beton_dir / "val.beton", self.batch_size, self.num_workers, train=False,
            distributed=self._distributed(), device=self._device(),
        )
