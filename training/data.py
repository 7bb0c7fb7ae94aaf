"""FFCV datasets: the `.beton` schema, writing a batch's shard of a split, merging shards into the
split's file, and the loaders training and evaluation use.

Schema (one place, as FFCV's own examples keep it):
    image  RGBImageField, raw uint8 pixels at the training resolution. Measured by bench/loader.py
           on 32x32 digits: raw loads ~7x faster than jpg and ~5x faster than proportion, for 2x the
           bytes of jpg, and loses nothing; at this size the file is small either way.
    label  IntField
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import lightning as L
import numba.typed
import numpy as np
import polars as pl
import torch

# FFCV builds its two-entry table of image modes as a numba typed dict when it is imported, which
# compiles numba's dict for str keys: ~6.5 s in every process that imports FFCV (each training, each
# Dagster step that reads a .beton), numba caches none of it. FFCV reads the table only from Python,
# so a plain dict serves the same (`import training.fit`: 23.5 s -> 18.4 s on a 2-core EPYC).
numba.typed.Dict = dict
try:
    from ffcv.fields import IntField, RGBImageField
finally:
    del numba.typed.Dict  # numba's own again, for everything else
from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder, SimpleRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.transforms import Cutout, RandomHorizontalFlip, RandomTranslate, Squeeze, ToDevice, ToTensor
from ffcv.transforms.color_jitter import RandomBrightness, RandomContrast, RandomSaturation
from ffcv.reader import Reader
from ffcv.types import HeaderType
from ffcv.utils import align_to_page
from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter

from training.config import LOADER_COMPILE_MIN_IMAGES, AugmentConfig

SPLITS = ("train", "val", "test")


class _ArrayDataset:
    """The indexed-dataset protocol DatasetWriter reads: `(image HWC uint8, label int)` per index."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])


def loader_threads(configured: int | None) -> int:
    """`configured`, or this process's share of the CPU cores it may use: all of them for one
    process, an even part each under torchrun (LOCAL_WORLD_SIZE processes on this node)."""
    if configured is not None:
        return configured
    return max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def page_size(resolution: int) -> int:
    """The smallest FFCV page that holds one raw image: a shard's last page is partly empty, and
    the merged file keeps each shard's pages, so small pages keep that waste small (2 MiB up to
    ~830 px; FFCV's default is 8 MiB)."""
    return max(MIN_PAGE_SIZE, 1 << (resolution * resolution * 3).bit_length())


def write_beton(path: Path, images: np.ndarray, labels: np.ndarray, num_workers: int = 1) -> Path:
    """Write one file atomically: a temporary file, renamed into place only when complete."""
    if len(labels) == 0:
        raise ValueError(f"cannot write {path}: the split has no examples")
    resolution = images.shape[1]
    fields = {
        "image": RGBImageField(write_mode="raw", max_resolution=resolution),
        "label": IntField(),
    }
    partial = path.with_name(f".{path.name}.partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = DatasetWriter(str(partial), fields, page_size=page_size(resolution), num_workers=num_workers)
    writer.from_indexed_dataset(_ArrayDataset(images, labels))
    os.replace(partial, path)
    return path


def merge_betons(shards: list[Path], path: Path) -> Path:
    """Concatenate `.beton` shards of one schema into one file that FFCV's Loader reads as a whole,
    samples in shard order, atomically. No sample is decoded or re-encoded: each shard's data pages
    are copied as they are (`copy_file_range`: a reflink where the filesystem has them, a kernel
    copy elsewhere) to a page-aligned place, and its sample pointers and ids shifted to match. So a
    split is rebuilt for the cost of a file copy, while encoding follows only the new shards.

    FFCV 1.0's layout: header, field descriptors, one metadata row per sample, data pages starting
    at the first page boundary after the metadata, then the allocation table."""
    readers = [Reader(str(shard)) for shard in shards]
    if not readers:
        raise ValueError(f"cannot write {path}: no shards")
    first = readers[0]
    for shard, reader in zip(shards, readers):
        if _layout(reader) != _layout(first):
            raise ValueError(f"cannot merge {shard} into {path}: its fields, image sizes or page size differ from {shards[0]}'s")
    pointer_fields = [
        (name, sub) for name in first.metadata_type.names
        for sub in (first.metadata_type[name].names or ()) if sub.endswith("ptr")
    ]
    page = int(first.page_size)
    num_samples = sum(int(reader.num_samples) for reader in readers)
    metadata_start = HeaderType.itemsize + first.field_descriptors.nbytes
    data_start = align_to_page(metadata_start + num_samples * first.metadata_type.itemsize, page)
    partial = path.with_name(f".{path.name}.partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "wb") as out:
        out.write(np.zeros(1, HeaderType).tobytes())  # rewritten last, once the table's place is known
        out.write(first.field_descriptors.tobytes())
        tables, sample_offset, destination = [], 0, data_start
        for shard, reader in zip(shards, readers):
            # Same fields as the first shard (checked above), so the same metadata start.
            source_start = align_to_page(metadata_start + int(reader.num_samples) * first.metadata_type.itemsize, page)
            length = int(reader.header["alloc_table_ptr"]) - source_start
            shift = destination - source_start  # a multiple of the page size: samples keep their pages
            metadata = reader.metadata.copy()
            for name, sub in pointer_fields:
                metadata[name][sub] += np.uint64(shift)
            out.write(metadata.tobytes())
            table = reader.alloc_table.copy()
            table["sample_id"] += np.uint64(sample_offset)
            table["ptr"] += np.uint64(shift)
            tables.append((table, shard, source_start, length, destination))
            sample_offset += int(reader.num_samples)
            destination += length
        out.write(bytes(data_start - out.tell()))
        out.flush()  # the copies below write through the descriptor, past Python's buffer
        for _, shard, source_start, length, at in tables:
            with open(shard, "rb") as source:
                _copy_range(source, out, source_start, at, length)
        out.seek(destination)
        for table, *_ in tables:
            out.write(table.tobytes())
        header = np.zeros(1, HeaderType)
        header[0] = first.header
        header["num_samples"], header["alloc_table_ptr"] = num_samples, destination
        out.seek(0)
        out.write(header.tobytes())
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)
    return path


def _layout(reader: Reader) -> tuple:
    """What shards must share to be read as one file: fields, page size and the image sizes (raw
    images carry theirs per sample; FFCV's decoder expects one size per file)."""
    sizes = {
        name: set(zip(reader.metadata[name]["width"].tolist(), reader.metadata[name]["height"].tolist()))
        for name in reader.metadata_type.names if {"width", "height"} <= set(reader.metadata_type[name].names or ())
    }
    return reader.field_descriptors.tobytes(), int(reader.page_size), sizes


def _copy_range(source, destination, source_offset: int, destination_offset: int, length: int) -> None:
    """Copy `length` bytes between two open files in the kernel, or through a buffer where the
    filesystem cannot (`copy_file_range` is unsupported on some, e.g. across mounts on old kernels)."""
    done = 0
    try:
        while done < length:
            copied = os.copy_file_range(
                source.fileno(), destination.fileno(), length - done, source_offset + done, destination_offset + done
            )
            if copied == 0:
                raise ValueError(f"{source.name} ended {length - done} bytes early")
            done += copied
    except OSError as error:
        if error.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
        source.seek(source_offset + done)
        destination.seek(destination_offset + done)
        remaining = length - done
        while remaining:
            chunk = source.read(min(remaining, 1 << 24))
            if not chunk:
                raise ValueError(f"{source.name} ended {remaining} bytes early") from error
            destination.write(chunk)
            remaining -= len(chunk)


class ShardRecords(Protocol):
    """One batch's rows of one split: pixels (`images[a:b]` arrays) and an index frame, row for row."""

    images: np.ndarray
    index: pl.DataFrame  # image_id, batch_id, label

    @property
    def labels(self) -> np.ndarray: ...


@dataclass(frozen=True)
class DatasetBuild:
    manifest: dict[str, dict]  # split -> path, index, fingerprint, examples, batches
    written: list[str]  # shards encoded now, as "<split>/<batch_id>"
    encoded: int  # examples in them
    reused: int  # shards kept from earlier builds
    merged: list[str]  # splits whose file was rebuilt


def build_datasets(
    directory: Path, tag: str, shard_digests: dict[tuple[str, str], str],
    read_shard: Callable[[str, str], ShardRecords],
) -> DatasetBuild:
    """The split files under `directory`, from per-batch shards.

    `shard_digests` maps (split, batch_id) to a digest of exactly the rows that shard holds; `tag`
    names the preprocessing. A shard is encoded (with `read_shard`) only when no shard of that
    digest and tag exists, so a tick encodes only the batches it added or changed. A split's
    `<split>.beton` is then merged from its shards in batch order (`merge_betons`: a copy, no
    encoding) when its set of shards changed, with `<split>.index.parquet` describing it row for
    row. Shards no longer used are removed. `manifest.json` records what was built."""
    manifest_path = directory / "manifest.json"
    previous = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    shard_root = directory / "shards" / tag
    shards: dict[str, list[tuple[str, Path, Path]]] = {}
    written, encoded = [], 0
    for (split, batch_id), digest in sorted(shard_digests.items()):
        beton = shard_root / split / f"{batch_id}.{digest[:16]}.beton"
        index_path = beton.with_suffix(".index.parquet")
        if not (beton.exists() and index_path.exists()):
            records = read_shard(split, batch_id)
            write_beton(beton, records.images, records.labels)
            _write_parquet(records.index.lazy(), index_path)
            written.append(f"{split}/{batch_id}")
            encoded += len(records.labels)
        shards.setdefault(split, []).append((batch_id, beton, index_path))
    manifest, merged = {}, []
    for split in SPLITS:
        beton, index_path = directory / f"{split}.beton", directory / f"{split}.index.parquet"
        parts = shards[split]
        fingerprint = hashlib.md5(f"{tag}:{','.join(path.name for _, path, _ in parts)}".encode()).hexdigest()
        if previous.get(split, {}).get("fingerprint") == fingerprint and beton.exists() and index_path.exists():
            manifest[split] = previous[split]
            continue
        _write_parquet(pl.concat([pl.scan_parquet(path) for _, _, path in parts]), index_path)
        merge_betons([path for _, path, _ in parts], beton)
        manifest[split] = {
            "path": str(beton),
            "index": str(index_path),
            "fingerprint": fingerprint,
            "examples": sum(beton_length(path) for _, path, _ in parts),
            "batches": [batch_id for batch_id, _, _ in parts],
        }
        merged.append(split)
    used = {path for parts in shards.values() for _, beton, index_path in parts for path in (beton, index_path)}
    for path in (directory / "shards").rglob("*"):
        if path.is_file() and path not in used:  # rows changed, batch gone, or another preprocessing
            path.unlink()
    partial = manifest_path.with_name(f".{manifest_path.name}.partial")
    partial.write_text(json.dumps(manifest, indent=2))
    os.replace(partial, manifest_path)
    return DatasetBuild(manifest, written, encoded, len(shard_digests) - len(written), merged)


def _write_parquet(frame: pl.LazyFrame, path: Path) -> None:
    partial = path.with_name(f".{path.name}.partial")
    frame.sink_parquet(partial)
    os.replace(partial, path)


def image_pipeline(
    device: torch.device | None = None, augment: AugmentConfig | None = None, decoder: Operation | None = None,
) -> list:
    """uint8 NHWC tensors: the model's own input format. The network normalises them inside its
    graph, on the device (in `channels_last` on GPUs), exactly as the served model does, so FFCV's
    `ToTorchImage`/`NormalizeImage` would normalise a second time. Training images are varied by
    `augment` on the loader's threads, after `decoder`: the stored image as it is, or, for
    `random_resized_crop`, the caller's `RandomResizedCropRGBImageDecoder` (whose output size
    progressive resizing changes between epochs)."""
    augment = augment or AugmentConfig()
    if augment.random_resized_crop and not isinstance(decoder, RandomResizedCropRGBImageDecoder):
        raise ValueError("random_resized_crop needs its RandomResizedCropRGBImageDecoder (FFCVDataModule makes one)")
    pipeline = [decoder or SimpleRGBImageDecoder()]
    if augment.horizontal_flip:
        pipeline.append(RandomHorizontalFlip())
    if augment.translate:
        pipeline.append(RandomTranslate(padding=augment.translate))
    if augment.cutout:
        pipeline.append(Cutout(augment.cutout))
    if augment.color_jitter:
        pipeline += [
            RandomBrightness(augment.color_jitter), RandomContrast(augment.color_jitter), RandomSaturation(augment.color_jitter),
        ]
    pipeline.append(ToTensor())
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
    augment: AugmentConfig | None = None,
    decoder: Operation | None = None,
    epochs: int = 1,
    compile_min_images: int = LOADER_COMPILE_MIN_IMAGES,
) -> Loader:
    """FFCV's Loader over `path`, its pipeline compiled with numba only when it will deliver at
    least `compile_min_images` images in `epochs` (see LOADER_COMPILE_MIN_IMAGES); FFCV compiles
    while building the loader, so the switch is set for that time only."""
    deliveries = (len(indices) if indices is not None else beton_length(path)) * epochs
    Compiler.set_enabled(deliveries >= compile_min_images)
    try:
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
            pipelines={"image": image_pipeline(device, augment, decoder), "label": label_pipeline(device)},
        )
    finally:
        Compiler.set_enabled(True)  # FFCV's default, for code that builds its own loaders


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
    return int(Reader(str(path)).num_samples)


class FFCVDataModule(L.LightningDataModule):
    """Builds FFCV loaders inside the dataloader hooks, where the process group already exists."""

    def __init__(
        self, beton_dir: Path, batch_size: int, num_workers: int, seed: int, resolution: int,
        augment: AugmentConfig | None = None, train_indices: np.ndarray | None = None,
        compile_min_images: int = LOADER_COMPILE_MIN_IMAGES,
    ):
        super().__init__()
        self.compile_min_images = compile_min_images
        self.beton_dir = Path(beton_dir)
        self.train_indices = train_indices  # rows of train.beton to train on; None: all
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.augment = augment or AugmentConfig()
        # Random resized crops are decoded at a size `ProgressiveResizing` may change between epochs.
        self.crop_decoder = (
            RandomResizedCropRGBImageDecoder((resolution, resolution), scale=self.augment.crop_scale)
            if self.augment.random_resized_crop else None
        )

    def _distributed(self) -> bool:
        return self.trainer is not None and self.trainer.world_size > 1

    def _epochs(self) -> int:
        """Epochs the loaders serve (Lightning builds each once per fit)."""
        return max(1, self.trainer.max_epochs) if self.trainer is not None and self.trainer.max_epochs else 1

    def _device(self) -> torch.device | None:
        return self.trainer.strategy.root_device if self.trainer is not None else None

    def _train_batch_size(self, path: Path) -> int:
        """The configured batch size, or a rank's share of a training set smaller than one batch per rank
        (training drops a ragged last batch, so a batch larger than the data would train on nothing)."""
        world_size = self.trainer.world_size if self.trainer is not None else 1
        examples = len(self.train_indices) if self.train_indices is not None else beton_length(path)
        if examples // world_size < 2:
            raise ValueError(f"{path}: {examples} training examples for {world_size} process(es); each needs at least 2 "
                             "(BatchNorm): land more labeled images")
        return min(self.batch_size, examples // world_size)

    def train_dataloader(self) -> Loader:
        path = self.beton_dir / "train.beton"
        return make_loader(
            path, self._train_batch_size(path), self.num_workers, train=True,
            seed=self.seed, distributed=self._distributed(), device=self._device(), indices=self.train_indices,
            augment=self.augment, decoder=self.crop_decoder, epochs=self._epochs(),
            compile_min_images=self.compile_min_images,
        )

    def val_dataloader(self) -> Loader:
        # Every example once across the ranks: a disjoint stride each, not FFCV's distributed order,
        # which pads the last ranks with repeated examples (DistributedSampler) and would count them.
        path = self.beton_dir / "val.beton"
        indices = None
        if self._distributed():
            indices = np.arange(self.trainer.global_rank, beton_length(path), self.trainer.world_size)
        return make_loader(
            path, self.batch_size, self.num_workers, train=False, device=self._device(), indices=indices,
            epochs=self._epochs(), compile_min_images=self.compile_min_images,
        )
