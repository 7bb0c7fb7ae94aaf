"""Decoding landing images and the per-image statistics that dbt and drift monitoring use.

Statistics are computed once, at ingestion, on the grayscale image. They are chosen so that the
usual ways an image stream shifts show up in at least one of them: exposure (brightness), contrast,
polarity and stroke width (ink_fraction), focus (edge_strength), framing (centroid) and
orientation (principal-axis angle).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

SUPPORTED_FORMATS = frozenset({"PNG", "JPEG"})
SUPPORTED_MODES = frozenset({"L", "RGB", "RGBA", "P"})

# Columns produced by `image_statistics`, in order. A contract with dbt and drift monitoring.
STAT_COLUMNS = (
    "brightness",
    "contrast",
    "ink_fraction",
    "edge_strength",
    "centroid_x",
    "centroid_y",
    "orientation",
)


class ImageRejected(ValueError):
    """An image that cannot enter the warehouse; `reason` is machine-readable."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class DecodedImage:
    format: str
    mode: str
    width: int
    height: int
    rgb: np.ndarray  # uint8 [H, W, 3]


def decode_image(data: bytes | None, max_pixels: int) -> DecodedImage:
    """Decode PNG/JPEG bytes to RGB, or raise ImageRejected saying why not."""
    if data is None or len(data) == 0:
        raise ImageRejected("missing_image", "the image bytes are empty")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in SUPPORTED_FORMATS:
                raise ImageRejected(
                    "unsupported_format",
                    f"image format {image.format} is not PNG or JPEG",
                )
            if image.mode not in SUPPORTED_MODES:
                raise ImageRejected(
                    "unsupported_mode",
                    f"image mode {image.mode} is not one of {sorted(SUPPORTED_MODES)}",
                )
            width, height = image.size
            # Checked before decoding pixels, so a decompression bomb is never expanded.
            if width * height > max_pixels:
                raise ImageRejected(
                    "image_too_large",
                    f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}",
                )
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
            return DecodedImage(image.format, image.mode, width, height, rgb)
    except ImageRejected:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageRejected("undecodable_image", f"the bytes are not a readable PNG/JPEG image ({error})") from None


def resize_rgb(rgb: np.ndarray, resolution: int) -> np.ndarray:
    """Square-resize an RGB array to the training resolution (bilinear)."""
    if rgb.shape[0] == resolution and rgb.shape[1] == resolution:
        return rgb
    image = Image.fromarray(rgb).resize((resolution, resolution), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def image_statistics(images: np.ndarray) -> np.ndarray:
    """Statistics for a stack of same-sized RGB images `[N, H, W, 3]` -> float64 `[N, len(STAT_COLUMNS)]`.

    Vectorised over the stack, because ingestion throughput is dominated by per-image work.
    """
    gray = images.astype(np.float32).mean(axis=3) / 255.0  # [N, H, W]
    n, height, width = gray.shape
    flat = gray.reshape(n, -1)
    brightness = flat.mean(axis=1)
    contrast = flat.std(axis=1)
    # "Ink" is what stands out from the image's own background (its median), so the measure holds
    # for dark-on-light and light-on-dark images alike.
    background = np.median(flat, axis=1, keepdims=True)
    ink = np.abs(gray - background[:, :, None]) > 0.25
    ink_fraction = ink.reshape(n, -1).mean(axis=1)
    dx = np.abs(np.diff(gray, axis=2)).reshape(n, -1).mean(axis=1) if width > 1 else np.zeros(n)
    dy = np.abs(np.diff(gray, axis=1)).reshape(n, -1).mean(axis=1) if height > 1 else np.zeros(n)
    edge_strength = (dx + dy) / 2

    # Intensity-weighted moments of the ink, in coordinates normalised to [0, 1].
    weights = np.abs(gray - background[:, :, None])
    total = weights.reshape(n, -1).sum(axis=1) + 1e-9
    ys = (np.arange(height, dtype=np.float32) + 0.5) / height
    xs = (np.arange(width, dtype=np.float32) + 0.5) / width
    centroid_x = (weights.sum(axis=1) * xs).sum(axis=1) / total
    centroid_y = (weights.sum(axis=2) * ys).sum(axis=1) / total
    dxs = xs[None, None, :] - centroid_x[:, None, None]
    dys = ys[None, :, None] - centroid_y[:, None, None]
    mu20 = (weights * dxs * dxs).reshape(n, -1).sum(axis=1) / total
    mu02 = (weights * dys * dys).reshape(n, -1).sum(axis=1) / total
    mu11 = (weights * dxs * dys).reshape(n, -1).sum(axis=1) / total
    # Angle of the principal axis from vertical: upright strokes sit near 0 instead of wrapping at +-90.
    orientation = np.degrees(0.5 * np.arctan2(2 * mu11, mu02 - mu20))

    return np.stack(
        [brightness, contrast, ink_fraction, edge_strength, centroid_x, centroid_y, orientation],
        axis=1,
    ).astype(np.float64)
