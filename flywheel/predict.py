"""`flywheel predict`: score landing-format parquet files or image files with the champion's int8 model."""

from pathlib import Path

import numpy as np
import polars as pl

from orchestration.resources import FlywheelHome
from training.inference import predict_onnx
from training.registry import Registry, RegistryError
from transforms.images import IMAGE_SUFFIXES, ImageRejected, decode_image, resize_rgb
from transforms.landing import LandingFileError, read_landing_file

MAX_PIXELS = 4096 * 4096


def _images_of(path: Path, resolution: int) -> tuple[list[str], list[np.ndarray], list[str]]:
    """(ids, images, problems) of one input file."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        try:
            decoded = decode_image(path.read_bytes(), MAX_PIXELS)
        except (OSError, ImageRejected) as error:
            return [], [], [f"{path}: {error}"]
        return [path.stem], [resize_rgb(decoded.pixels, resolution)], []
    if path.suffix.lower() != ".parquet":
        return [], [], [f"{path}: not a .parquet file or an image file ({', '.join(sorted(IMAGE_SUFFIXES))})"]
    try:
        frame = read_landing_file(path)
    except LandingFileError as error:
        return [], [], [str(error)]
    ids, images, problems = [], [], []
    for row, (image_id, data) in enumerate(zip(frame["image_id"], frame["image"]), start=1):
        try:
            images.append(resize_rgb(decode_image(data, MAX_PIXELS).pixels, resolution))
            ids.append(image_id or f"{path.stem}:row{row}")
        except ImageRejected as error:
            problems.append(f"{path}: row {row} (image_id {image_id!r}): {error.message}")
    return ids, images, problems


def predict_files(files: list[Path], output: Path, flywheel: FlywheelHome) -> tuple[int, list[str]]:
    if output.suffix.lower() not in (".parquet", ".csv"):
        raise LandingFileError(f"{output}: the output must end in .parquet or .csv")
    champion = Registry(flywheel.registry).champion()
    if champion is None:
        raise RegistryError("there is no champion to predict with: run `flywheel run` first")
    card = champion.card()
    session = champion.inference_session()
    ids, images, problems = [], [], []
    for path in files:
        file_ids, file_images, file_problems = _images_of(path, card.resolution)
        ids += file_ids
        images += file_images
        problems += file_problems
    if images:
        logits = predict_onnx(session, np.stack(images))
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = exp / exp.sum(axis=1, keepdims=True)
        labels = probabilities.argmax(axis=1)
        confidence = probabilities.max(axis=1)
    else:
        labels, confidence = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    frame = pl.DataFrame(
        {
            "image_id": ids, "label": labels.astype(np.int64), "label_name": [card.class_names[i] for i in labels],
            "probability": confidence.astype(np.float64),
        },
        schema={"image_id": pl.Utf8, "label": pl.Int64, "label_name": pl.Utf8, "probability": pl.Float64},
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    frame.write_csv(output) if output.suffix.lower() == ".csv" else frame.write_parquet(output)
    return frame.height, problems
