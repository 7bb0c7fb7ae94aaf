"""`flywheel predict`: score landing-format parquet files or image files with the champion's int8 model."""

from pathlib import Path

import numpy as np
import polars as pl

from orchestration.assets.ingestion import IngestConfig
from orchestration.resources import FlywheelHome
from orchestration.settings import current_settings
from training.inference import predict_onnx
from training.registry import Registry, RegistryError
from transforms.images import IMAGE_SUFFIXES, ImageRejected, Preprocessing, decode_image, served_preprocessing
from transforms.landing import LandingFileError, read_landing_file



def _images_of(path: Path, preprocessing: Preprocessing, max_pixels: int) -> tuple[list[str], list[np.ndarray], list[str]]:
    """(ids, images, problems) of one input file."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        try:
            decoded = decode_image(path.read_bytes(), max_pixels, fit_pixels=preprocessing.decode_pixels)
        except (OSError, ImageRejected) as error:
            return [], [], [f"{path}: {error}"]
        return [path.stem], [preprocessing(decoded.pixels)], []
    if path.suffix.lower() != ".parquet":
        return [], [], [f"{path}: not a .parquet file or an image file ({', '.join(sorted(IMAGE_SUFFIXES))})"]
    try:
        frame = read_landing_file(path)
    except LandingFileError as error:
        return [], [], [str(error)]
    ids, images, problems = [], [], []
    for row, (image_id, data) in enumerate(zip(frame["image_id"], frame["image"]), start=1):
        try:
            images.append(preprocessing(decode_image(data, max_pixels, fit_pixels=preprocessing.decode_pixels).pixels))
            ids.append(image_id or f"{path.stem}:row{row}")
        except ImageRejected as error:
            problems.append(f"{path}: row {row} (image_id {image_id!r}): {error.message}")
    return ids, images, problems


def predict_files(files: list[Path], output: Path, flywheel: FlywheelHome, top_k: int = 1) -> tuple[int, list[str]]:
    """Score files with the champion's int8 model; with `top_k` > 1 the next guesses follow as
    `label_2`, `label_name_2`, `probability_2`, ... (flat columns: CSV has no lists)."""
    if output.suffix.lower() not in (".parquet", ".csv"):
        raise LandingFileError(f"{output}: the output must end in .parquet or .csv")
    champion = Registry(flywheel.registry).champion()
    if champion is None:
        raise RegistryError("there is no champion to predict with: run `flywheel run` first")
    card = champion.card()
    session = champion.inference_session()
    # The same pixel limit as ingestion's, from the same settings.
    max_pixels = IngestConfig.model_validate(current_settings(flywheel).get("ingest_batch", {})).max_pixels
    ids, images, problems = [], [], []
    for path in files:
        file_ids, file_images, file_problems = _images_of(path, served_preprocessing(card), max_pixels)
        ids += file_ids
        images += file_images
        problems += file_problems
    classes = len(card.class_names)
    top_k = max(1, min(top_k, classes))
    if images:
        logits = predict_onnx(session, np.stack(images))
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = exp / exp.sum(axis=1, keepdims=True)
    else:
        probabilities = np.zeros((0, classes), dtype=np.float32)
    ranked = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
    columns: dict[str, pl.Series] = {"image_id": pl.Series(ids, dtype=pl.Utf8)}
    for rank in range(top_k):
        suffix = "" if rank == 0 else f"_{rank + 1}"
        labels = ranked[:, rank]
        columns[f"label{suffix}"] = pl.Series(labels.astype(np.int64), dtype=pl.Int64)
        columns[f"label_name{suffix}"] = pl.Series([card.class_names[i] for i in labels], dtype=pl.Utf8)
        columns[f"probability{suffix}"] = pl.Series(
            probabilities[np.arange(len(labels)), labels].astype(np.float64), dtype=pl.Float64
        )
    frame = pl.DataFrame(columns)
    output.parent.mkdir(parents=True, exist_ok=True)
    frame.write_csv(output) if output.suffix.lower() == ".csv" else frame.write_parquet(output)
    return frame.height, problems
