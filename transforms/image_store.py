"""The image store: the accepted images' bytes, outside the warehouse, beside it under the data root.

One pack per ingested batch, `images/<batch_id>/<fingerprint>.parquet`, holds `image_id`,
`content_hash` and `image` in the order of the batch's accepted rows; `raw_images` keeps the pack
(`image_pack`, relative to the store) and the position in it (`image_row`). A warehouse row is a
few hundred bytes whatever the size of its image, and re-ingesting a batch replaces its pack: the
old one is removed once the warehouse points at the new one, so the space comes back.

Packs are written in small row groups (STORE_ROW_GROUP_BYTES) so a sample of a few images reads a
few row groups, not whole batches. Every read checks the bytes against the content hash the
warehouse holds: a damaged or replaced pack is named, never silently trained on.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

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
        """Remove the batch's packs other than `pack` (None: all of them), once the warehouse no
        longer points at them: a replaced or emptied batch gives its space back."""
        folder = self.root / check_batch_id(batch_id)
        if not folder.is_dir():
            return
        for path in folder.iterdir():
            if f"{batch_id}/{path.name}" != pack:
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

    def _open(self, pack: str) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(self.root / pack)
        except (OSError, pa.ArrowException) as error:
            raise ImageStoreError(f"{self.root / pack}: the image pack cannot be read ({type(error).__name__}: {error}); "
                                  "ingest its batch again") from None

    def size_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.root.rglob("*.parquet")) if self.root.is_dir() else 0
