"""Landing batches simulated from scikit-learn's bundled handwritten digits (1,797 real 8x8 scans).

The digits are shuffled once with a fixed seed and split into a `main` pool (clean batches) and a
`holdout` pool (images no clean batch ever contains), so a drifted batch can be built from digits
the first model has never seen. Drift is applied per image with PIL at a chosen strength in [0, 1].
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
from PIL import Image, ImageFilter

from transforms.landing import check_batch_id, write_landing_file

DRIFT_KINDS = ("none", "rotation", "blur", "noise", "contrast", "invert", "class_prior")
Pool = Literal["main", "holdout", "all"]
HOLDOUT_FRACTION = 0.2  # share of the digits kept out of clean batches
_DATASET_SEED = 20_26  # fixes the pools; independent of the per-batch seed
NUM_CLASSES = 10


@dataclass(frozen=True)
class SimulationSpec:
    batches: int = 4
    batch_size: int | None = None  # None: the pool divided evenly over the batches
    resolution: int = 32
    drift: str = "none"
    strength: float = 1.0
    labeled: bool = True
    pool: Pool = "main"
    prefix: str = "digits"
    seed: int = 0
    offset: int = 0  # skip this many images of the pool (to draw disjoint sets from it)
    start: datetime = datetime(2026, 1, 1, tzinfo=timezone.utc)

    def __post_init__(self) -> None:
        if self.drift not in DRIFT_KINDS:
            raise ValueError(f"unknown drift kind {self.drift!r}; choose one of {', '.join(DRIFT_KINDS)}")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"drift strength must be within [0, 1], got {self.strength}")
        if self.batches < 1:
            raise ValueError(f"batches must be at least 1, got {self.batches}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}")
        if self.offset < 0:
            raise ValueError(f"offset must be at least 0, got {self.offset}")
        if self.resolution < 8:
            raise ValueError(f"resolution must be at least 8 pixels, got {self.resolution}")


def digits_pool(pool: Pool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dataset indices, images uint8 [N, 8, 8], labels) of one pool."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(_DATASET_SEED).permutation(len(digits.target))
    cut = int(len(order) * (1 - HOLDOUT_FRACTION))
    chosen = {"main": order[:cut], "holdout": order[cut:], "all": order}[pool]
    images = np.clip(digits.images[chosen] * (255.0 / 16.0), 0, 255).astype(np.uint8)
    return chosen, images, digits.target[chosen].astype(np.int64)


def _apply_drift(image: Image.Image, kind: str, strength: float, rng: np.random.Generator) -> Image.Image:
    if kind == "rotation":
        angle = strength * 90.0 * rng.uniform(0.5, 1.0)
        return image.rotate(angle, resample=Image.Resampling.BILINEAR)
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(radius=strength * 3.0 * image.width / 32))
    pixels = np.asarray(image, dtype=np.float32)
    if kind == "noise":
        pixels = pixels + rng.normal(0.0, strength * 80.0, pixels.shape)
    elif kind == "contrast":
        pixels = pixels.mean() + (pixels - pixels.mean()) * (1.0 - 0.8 * strength)
    elif kind == "invert":
        pixels = (1.0 - strength) * pixels + strength * (255.0 - pixels)
    else:
        return image
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def simulate_batches(landing_dir: Path, spec: SimulationSpec, overwrite: bool = False) -> tuple[list[Path], list[Path]]:
    """Write `spec.batches` landing files atomically; returns (written, kept): existing files are
    kept unless `overwrite`, so simulating twice does not re-land the same batches."""
    indices, images, labels = (part[spec.offset :] for part in digits_pool(spec.pool))
    if len(indices) == 0:
        raise ValueError(f"offset {spec.offset} leaves no images in the {spec.pool} pool")
    rng = np.random.default_rng(spec.seed)
    per_batch = spec.batch_size or max(1, len(indices) // spec.batches)
    if spec.drift == "class_prior":
        # Skew the class mix towards low digits: class k is drawn with weight exp(-3 * strength * k / 9).
        weights = np.exp(-3.0 * spec.strength * labels / (NUM_CLASSES - 1))
        picks = rng.choice(len(indices), size=per_batch * spec.batches, p=weights / weights.sum())
    else:
        picks = np.resize(np.arange(len(indices)), per_batch * spec.batches)

    landing_dir.mkdir(parents=True, exist_ok=True)
    written, kept = [], []
    for batch_number in range(spec.batches):
        batch_id = check_batch_id(f"{spec.prefix}-{batch_number:03d}")
        target = landing_dir / f"{batch_id}.parquet"
        if target.exists() and not overwrite:
            kept.append(target)
            continue
        rows = picks[batch_number * per_batch : (batch_number + 1) * per_batch]
        # Seeded per batch, so a batch's content does not depend on which others were written.
        batch_rng = np.random.default_rng([spec.seed, batch_number])
        encoded = []
        for row in rows:
            image = Image.fromarray(images[row], mode="L").resize(
                (spec.resolution, spec.resolution), Image.Resampling.BILINEAR
            )
            encoded.append(_png(_apply_drift(image, spec.drift, spec.strength, batch_rng)))
        captured = spec.start + timedelta(days=batch_number)
        frame = pl.DataFrame(
            {
                "image_id": [f"{batch_id}-{position:05d}" for position in range(len(rows))],
                "image": encoded,
                "label": [int(labels[row]) if spec.labeled else None for row in rows],
                "captured_at": [captured + timedelta(seconds=int(position)) for position in range(len(rows))],
                "source_index": [int(indices[row]) for row in rows],
                "drift": [spec.drift] * len(rows),
            },
            schema={
                "image_id": pl.Utf8,
                "image": pl.Binary,
                "label": pl.Int64,
                "captured_at": pl.Datetime("us", "UTC"),
                "source_index": pl.Int64,
                "drift": pl.Utf8,
            },
        )
        written.append(write_landing_file(landing_dir, batch_id, frame))
    return written, kept
