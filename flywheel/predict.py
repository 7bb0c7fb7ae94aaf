"""`flywheel predict`: score landing-format parquet files or image files with the champion's int8 model."""

import os
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from orchestration.assets.ingestion import IngestConfig
from orchestration.resources import FlywheelHome
from orchestration.settings import current_settings
from training.inference import predict_onnx
from training.registry import Registry, RegistryError
from transforms.images import IMAGE_SUFFIXES, ImageRejected, Preprocessing, decode_image, served_preprocessing
from transforms.landing import LandingFileError, image_chunks, read_landing_file



# Images scored per ONNX Runtime call and written per output chunk: memory stays bounded by this,
# not by the number of inputs.
PREDICT_CHUNK = 256


def _images_of(path: Path, preprocessing: Preprocessing, max_pixels: int, problems: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """(id, model input) of each image of one input file; what cannot be scored goes to `problems`."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        try:
            decoded = decode_image(path.read_bytes(), max_pixels, fit_pixels=preprocessing.decode_pixels)
        except (OSError, ImageRejected) as error:
            problems.append(f"{path}: {error}")
            return
        yield path.stem, preprocessing(decoded.pixels)
        return
    if path.suffix.lower() != ".parquet":
        problems.append(f"{path}: not a .parquet file or an image file ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return
    try:
        image_ids = read_landing_file(path)["image_id"].to_list()  # the bytes are streamed below
        row = 0
        for chunk in image_chunks(path):
            for data in chunk:
                image_id, row = image_ids[row], row + 1
                try:
                    if not data:
                        raise ImageRejected("missing_image", "the image bytes are empty")
                    pixels = preprocessing(decode_image(data, max_pixels, fit_pixels=preprocessing.decode_pixels).pixels)
                except ImageRejected as error:
                    problems.append(f"{path}: row {row} (image_id {image_id!r}): {error.message}")
                    continue
                yield image_id or f"{path.stem}:row{row}", pixels
    except LandingFileError as error:
        problems.append(str(error))


def _chunks(items: Iterator[tuple[str, np.ndarray]], size: int) -> Iterator[tuple[list[str], np.ndarray]]:
    while chunk := list(islice(items, size)):
        yield [image_id for image_id, _ in chunk], np.stack([pixels for _, pixels in chunk])


def _scores(ids: list[str], logits: np.ndarray, class_names: list[str], top_k: int) -> pl.DataFrame:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = exp / exp.sum(axis=1, keepdims=True)
    ranked = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
    columns: dict[str, pl.Series] = {"image_id": pl.Series(ids, dtype=pl.Utf8)}
    for rank in range(top_k):
        suffix = "" if rank == 0 else f"_{rank + 1}"
        labels = ranked[:, rank]
        columns[f"label{suffix}"] = pl.Series(labels.astype(np.int64), dtype=pl.Int64)
        columns[f"label_name{suffix}"] = pl.Series([class_names[i] for i in labels], dtype=pl.Utf8)
        columns[f"probability{suffix}"] = pl.Series(
            probabilities[np.arange(len(labels)), labels].astype(np.float64), dtype=pl.Float64
        )
    return pl.DataFrame(columns)


def predict_files(files: list[Path], output: Path, flywheel: FlywheelHome, top_k: int = 1) -> tuple[int, list[str]]:
    """Score files with the champion's int8 model, `PREDICT_CHUNK` images at a time, into `output`
    (written under a hidden name and renamed when complete). With `top_k` > 1 the next guesses follow
    as `label_2`, `label_name_2`, `probability_2`, ... (flat columns: CSV has no lists)."""
    if output.suffix.lower() not in (".parquet", ".csv"):
        raise LandingFileError(f"{output}: the output must end in .parquet or .csv")
    champion = Registry(flywheel.registry).champion()
    if champion is None:
        raise RegistryError("there is no champion to predict with: run `flywheel run` first")
    card = champion.card()
    session = champion.inference_session()
    preprocessing = served_preprocessing(card)
    # The same pixel limit as ingestion's, from the same settings.
    max_pixels = IngestConfig.model_validate(current_settings(flywheel).get("ingest_batch", {})).max_pixels
    top_k = max(1, min(top_k, len(card.class_names)))
    problems: list[str] = []
    images = (item for path in files for item in _images_of(path, preprocessing, max_pixels, problems))
    empty = _scores([], np.zeros((0, len(card.class_names)), np.float32), card.class_names, top_k)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial")
    written = 0
    try:
        with _TableWriter(partial, empty) as writer:
            for ids, pixels in _chunks(images, PREDICT_CHUNK):
                writer.write(_scores(ids, predict_onnx(session, pixels), card.class_names, top_k))
                written += len(ids)
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    return written, problems


class _TableWriter:
    """Appends frames of one schema to a Parquet or CSV file (a header even when nothing is written)."""

    def __init__(self, path: Path, empty: pl.DataFrame):
        self.path, self.empty = path, empty
        self.csv = path.name.removesuffix(".partial").lower().endswith(".csv")

    def __enter__(self) -> "_TableWriter":
        if self.csv:
            self.handle = open(self.path, "w", newline="")
            self.empty.write_csv(self.handle)
        else:
            self.handle = pq.ParquetWriter(self.path, self.empty.to_arrow().schema)
        return self

    def write(self, frame: pl.DataFrame) -> None:
        if self.csv:
            frame.write_csv(self.handle, include_header=False)
        else:
            self.handle.write_table(frame.to_arrow())

    def __exit__(self, *exc) -> None:
        self.handle.close()
