"""The image store: the accepted images' bytes, outside the warehouse, beside it under the data root.

One pack per ingested batch, `images/<batch_id>/<fingerprint>.parquet`, holds `image_id`,
`content_hash` and `image` in the order of the batch's accepted rows; `raw_images` keeps the pack
(`image_pack`, relative to the store) and the position in it (`image_row`). A warehouse row is a
few hundred bytes whatever the size of its image, and re-ingesting a batch replaces its pack: the
old one is removed once the warehouse points at the new one, so the space comes back.

Packs are written in small row groups (STORE_ROW_GROUP_BYTES) so a sample of a few images reads a
few row groups, not whole batches. Every read checks the bytes against the content hash the
warehouse holds: a damaged or replaced pack is named, never silently trained on.

Beside each pack, its images decoded and resized for a preprocessing (`<fingerprint>.<R>px-<resize>-
<mode>.npy`, uint8 `[N, R, R, 3]` in pack order, a plain .npy): every stored image is decoded once per
preprocessing, the first time a dataset, a drift report or a reference sample needs it, so a tick
decodes only its new batches and a new resolution starts a new file. They go with their pack.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from transforms.images import Preprocessing, decode_image
from transforms.landing import ParquetFileWriter, check_batch_id

STORE_ROW_GROUP_BYTES = 2**20
PACK_SCHEMA = pa.schema([("image_id", pa.string()), ("content_hash", pa.string()), ("image", pa.binary())])


class ImageStoreError(Exception):
    """Stored bytes that are missing or no longer match the warehouse: names the pack and the row."""


class ImageStore:
    def __init__(self, root: Path):
        self.root = root

    def write_pack(self, batch_id: str, fingerprint: str, chunks: Iterable[pl.DataFrame]) -> str:
        """Write a batch's accepted images (chunks with `image_id`, `content_hash`, `image`, in row
        order) as a new pack, complete or not at all; returns its name for `raw_images.image_pack`."""
        name = f"{check_batch_id(batch_id)}/{fingerprint[:16]}.parquet"
        with ParquetFileWriter(self.root / name, PACK_SCHEMA, STORE_ROW_GROUP_BYTES) as writer:
            for chunk in chunks:
                writer.write(chunk.select("image_id", "content_hash", "image").to_arrow())
            writer.commit()
        return name

    def keep_only(self, batch_id: str, pack: str | None) -> None:
        """Remove the batch's packs other than `pack` (None: all of them) and their decoded pixels,
        once the warehouse no longer points at them: a replaced or emptied batch gives its space back."""
        folder = self.root / check_batch_id(batch_id)
        if not folder.is_dir():
            return
        kept = Path(pack).name.removesuffix(".parquet") + "." if pack else None
        for path in folder.iterdir():
            if kept is None or not path.name.startswith(kept):
                path.unlink(missing_ok=True)
        if pack is None:
            shutil.rmtree(folder, ignore_errors=True)

    def read(self, locations: pl.DataFrame) -> Iterator[bytes]:
        """The bytes at `locations` (`image_pack`, `image_row`, `content_hash`), in their order. Rows
        of one pack should come together and ascending (each row group is then read once); memory
        holds one row group."""
        packs = locations["image_pack"].to_list()
        rows = locations["image_row"].to_numpy()
        hashes = locations["content_hash"].to_list()
        current: tuple[str, int] | None = None
        column: list[bytes] = []
        starts = np.zeros(1, dtype=np.int64)
        parquet: pq.ParquetFile | None = None
        for pack, row, content_hash in zip(packs, rows, hashes):
            if parquet is None or pack != current[0]:
                parquet = self._open(pack)
                sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
                starts = np.concatenate([[0], np.cumsum(sizes)])
                current = (pack, -1)
            if not 0 <= row < starts[-1]:
                raise ImageStoreError(f"{self.root / pack}: row {row} is beyond the pack's {starts[-1]} rows; ingest its batch again")
            group = int(np.searchsorted(starts, row, side="right") - 1)
            if group != current[1]:
                column = parquet.read_row_group(group, columns=["image"], use_threads=False).column(0).to_pylist()
                current = (pack, group)
            data = column[row - starts[group]]
            if hashlib.sha256(data).hexdigest() != content_hash:
                raise ImageStoreError(
                    f"{self.root / pack}: row {row} does not hold the image the warehouse recorded (content hash differs); "
                    "ingest its batch again"
                )
            yield data

    def decoded(self, pack: str, locations: pl.DataFrame, preprocessing: Preprocessing) -> PackPixels:
        """Every image of `pack` (`locations`: all its rows, ascending) decoded for `preprocessing`:
        read from the pack's cache file, written first if there is none."""
        path = self.decoded_path(pack, preprocessing)
        if not path.exists():
            self._write_decoded(path, locations, preprocessing)
        pixels = PackPixels(path)
        if len(pixels) != locations.height:
            raise ImageStoreError(f"{path}: holds {len(pixels)} images, the pack {locations.height}; delete the file to decode again")
        return pixels

    def decoded_path(self, pack: str, preprocessing: Preprocessing) -> Path:
        """The pack's cache file of images decoded for `preprocessing`."""
        return self.root / f"{pack.removesuffix('.parquet')}.{preprocessing.tag}.npy"

    def _write_decoded(self, path: Path, locations: pl.DataFrame, preprocessing: Preprocessing, rows_per_write: int = 64) -> None:
        side = preprocessing.resolution
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            with open(partial, "wb") as handle:
                np.lib.format.write_array_header_1_0(
                    handle, {"descr": "|u1", "fortran_order": False, "shape": (locations.height, side, side, 3)}
                )
                rows = []
                for data in self.read(locations):
                    rows.append(preprocessing(stored_pixels(data, preprocessing.decode_pixels)))
                    if len(rows) == rows_per_write:
                        handle.write(np.stack(rows).tobytes())
                        rows = []
                if rows:
                    handle.write(np.stack(rows).tobytes())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)

    def _open(self, pack: str) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(self.root / pack)
        except (OSError, pa.ArrowException) as error:
            raise ImageStoreError(f"{self.root / pack}: the image pack cannot be read ({type(error).__name__}: {error}); "
                                  "ingest its batch again") from None


def stored_pixels(data: bytes, fit_pixels: int) -> np.ndarray:
    """RGB pixels of a stored image, decoded at about `fit_pixels`. Every stored image passed
    validation at ingestion, so no pixel limit applies and decoding cannot be refused."""
    return decode_image(data, max_pixels=2**62, fit_pixels=fit_pixels).pixels


class PackPixels:
    """A pack's decoded images (a .npy of uint8 `[N, R, R, 3]`), read with pread rather than a memory
    map: resident memory is what a caller asks for (`pixels[i]`, `pixels[a:b]`), however large the file."""

    def __init__(self, path: Path):
        self._descriptor: tuple[int, int] | None = None  # (process id, fd): a forked worker opens its own
        self.path = path
        with open(path, "rb") as handle:
            np.lib.format.read_magic(handle)
            shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
            self._offset = handle.tell()
        if dtype != np.uint8 or len(shape) != 4:
            raise ImageStoreError(f"{path}: not decoded images (uint8 [N, R, R, 3]) but {dtype} {shape}")
        self.shape = shape
        self._row_bytes = math.prod(shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: int | slice) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("PackPixels reads contiguous rows only")
            count = max(0, stop - start)
            return self._read(start, count).reshape(count, *self.shape[1:])
        index = key + len(self) if key < 0 else key
        if not 0 <= index < len(self):
            raise IndexError(f"row {key} of {len(self)}")
        return self._read(index, 1).reshape(self.shape[1:])

    def _read(self, start: int, count: int) -> np.ndarray:
        if self._descriptor is None or self._descriptor[0] != os.getpid():
            self._descriptor = (os.getpid(), os.open(self.path, os.O_RDONLY))
        size = count * self._row_bytes
        data = os.pread(self._descriptor[1], size, self._offset + start * self._row_bytes)
        if len(data) != size:
            raise ImageStoreError(f"{self.path}: ends before row {start + count}; delete the file to decode again")
        return np.frombuffer(data, dtype=np.uint8)

    def __del__(self) -> None:
        if self._descriptor is not None and self._descriptor[0] == os.getpid():
            os.close(self._descriptor[1])


class GatheredPixels:
    """Rows of several packs' decoded images in the order of an index, read one image (or a few
    contiguous ones) at a time: what FFCV's writer and the model read."""

    def __init__(self, parts: list[PackPixels], part: np.ndarray, row: np.ndarray, side: int):
        self._parts, self._part, self._row = parts, part, row
        self.shape = (len(row), side, side, 3)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: int | slice) -> np.ndarray:
        if isinstance(key, slice):
            rows = [self[i] for i in range(*key.indices(len(self)))]
            return np.stack(rows) if rows else np.zeros((0, *self.shape[1:]), dtype=np.uint8)
        return self._parts[self._part[key]][int(self._row[key])]
