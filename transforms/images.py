"""Decoding landing images and the per-image statistics that dbt and drift monitoring use.

Statistics are computed once, at ingestion. They are chosen so that the usual ways an image stream
shifts show up in at least one of them: exposure (brightness), contrast, polarity and stroke width
(ink_fraction), focus (edge_strength, sharpness), framing (centroid), orientation (principal-axis
angle) and, for colour photos, colour cast and colour contrast in the opponent channels (red-green,
blue-yellow) and saturation. Colour is measured in opponent channels rather than as R, G and B so a
grayscale image does not repeat its brightness three times: its colour statistics are all zero.
The shape of the image as landed (aspect ratio, megapixels) comes from its stored width and height
(`stg_images`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Photographs and scans as cameras, phones and scanners write them; a GIF counts by its first frame.
SUPPORTED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"})
# 16-bit grayscale (scans, microscopy, medical and scientific cameras: PNG and TIFF), in PIL's names;
# "I" is how PIL opens some of them. Mapped onto 8 bits over the full 16-bit range.
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
SUPPORTED_MODES = frozenset({"L", "LA", "RGB", "RGBA", "P", "PA", "CMYK"}) | SIXTEEN_BIT_MODES
# File names taken for images of those formats (by `flywheel land` and `flywheel predict`).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# Statistics are averages: a large photo is decoded at about 1 MP for them, not in full.
STATISTICS_PIXELS = 1024 * 1024

# Columns produced by `image_statistics`, in order. A contract with the warehouse, dbt and drift monitoring.
STAT_COLUMNS = (
    "brightness",
    "contrast",
    "ink_fraction",
    "edge_strength",
    "centroid_x",
    "centroid_y",
    "orientation",
    "red_green",
    "blue_yellow",
    "red_green_contrast",
    "blue_yellow_contrast",
    "saturation",
    "sharpness",
)
# Derived by `stg_images` from the stored width and height of each image as landed.
SHAPE_COLUMNS = ("aspect_ratio", "megapixels")
# What drift monitoring compares, per image, between a batch and the champion's training data.
DRIFT_FEATURES = STAT_COLUMNS + SHAPE_COLUMNS
# Pixels per vectorised chunk of `image_statistics`: 2 MB per float array, near the CPU's caches whatever the
# image size (512 images of 32x32: 2.4x the throughput of chunks of 4 MP, measured on 3,000 digits).
CHUNK_PIXELS = 512 * 1024


class ImageRejected(ValueError):
    """An image that cannot enter the warehouse; `reason` is machine-readable."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class DecodedImage:
    format: str  # as landed
    mode: str  # as landed
    width: int
    height: int
    pixels: np.ndarray | None  # uint8 [H, W, 3] for RGB, [H, W] for L; None once no longer needed


def decode_image(data: bytes | None, max_pixels: int, to: str = "RGB", fit_pixels: int | None = None) -> DecodedImage:
    """Decode image bytes to RGB (or grayscale with `to="L"`), upright by their EXIF orientation, or
    raise ImageRejected saying why not. Images over `max_pixels` are refused unexpanded (a decompression
    bomb guard); with `fit_pixels`, larger images are decoded downscaled to about that many pixels
    (JPEG by DCT scaling, so a 48 MP photo never costs 48 MP of memory). `width` and `height` are the
    image's own, upright."""
    if data is None or len(data) == 0:
        raise ImageRejected("missing_image", "the image bytes are empty")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in SUPPORTED_FORMATS:
                raise ImageRejected(
                    "unsupported_format",
                    f"image format {image.format} is not one of {', '.join(sorted(SUPPORTED_FORMATS))}",
                )
            if image.mode not in SUPPORTED_MODES:
                raise ImageRejected(
                    "unsupported_mode",
                    f"image mode {image.mode} is not one of {sorted(SUPPORTED_MODES)}",
                )
            width, height = image.size
            # Checked before decoding pixels, so a decompression bomb is never expanded.
            if width * height > max_pixels:
                raise _too_large(width, height, max_pixels)
            landed_format, landed_mode = image.format, image.mode
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
            if image.mode in SIXTEEN_BIT_MODES:
                image = _eight_bit(ImageOps.exif_transpose(image))  # upright first: the 8-bit copy has no EXIF
            if fit_pixels and width * height > fit_pixels:
                scale = (fit_pixels / (width * height)) ** 0.5
                target = (max(1, int(width * scale)), max(1, int(height * scale)))
                image.draft("RGB" if to == "RGB" else "L", target)  # JPEG only: decodes at 1/2, 1/4 or 1/8
                image.thumbnail(target, Image.Resampling.BILINEAR)
            upright = ImageOps.exif_transpose(image)
            pixels = np.asarray(upright if upright.mode == to else upright.convert(to), dtype=np.uint8)
            turned = orientation in (5, 6, 7, 8)
            return DecodedImage(landed_format, landed_mode, height if turned else width, width if turned else height, pixels)
    except ImageRejected:
        raise
    except Image.DecompressionBombError as error:
        raise ImageRejected("image_too_large", f"PIL refuses to open it as a decompression bomb ({error})") from None
    except UnidentifiedImageError:
        # PIL's own message names the BytesIO object's memory address: noise that differs on every run.
        raise ImageRejected("undecodable_image", "the bytes are not a readable image (cannot identify image file)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageRejected("undecodable_image", f"the bytes are not a readable image ({error})") from None


EXIF_ORIENTATION = 0x0112


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit grayscale as 8-bit "L", 0..65535 onto 0..255 (PIL's own convert clips at 255 instead)."""
    values = np.asarray(image).astype(np.int32).clip(0, 65535)
    return Image.fromarray(((values + 128) // 257).astype(np.uint8), "L")


def _too_large(width: int, height: int, max_pixels: int) -> ImageRejected:
    return ImageRejected(
        "image_too_large", f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
    )


ResizePolicy = Literal["squash", "center_crop", "letterbox"]
ImageMode = Literal["rgb", "grayscale"]


@dataclass(frozen=True)
class Preprocessing:
    """How a decoded image becomes the model's uint8 `[R, R, 3]` input: the same for the FFCV datasets,
    monitoring and serving (the model card records it). `squash` stretches to the square, `center_crop`
    fills it and cuts the overhang, `letterbox` fits the whole image and pads with black; `grayscale`
    drops colour (the three channels carry the same values)."""

    resolution: int
    resize: ResizePolicy
    mode: ImageMode

    @property
    def tag(self) -> str:
        """A file-name-safe name for it, e.g. `32px-squash-grayscale`: caches and shards carry it."""
        return f"{self.resolution}px-{self.resize}-{self.mode}"

    @property
    def decode_pixels(self) -> int:
        """How many pixels to decode a large image at (`decode_image`'s fit_pixels): twice the side is
        plenty for the resize, and a photo is never expanded in full for a 32 px input."""
        return 4 * self.resolution * self.resolution

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        image = Image.fromarray(rgb)
        if self.mode == "grayscale":
            image = image.convert("L").convert("RGB")
        side = (self.resolution, self.resolution)
        if image.size != side:
            if self.resize == "center_crop":
                image = ImageOps.fit(image, side, Image.Resampling.BILINEAR)
            elif self.resize == "letterbox":
                image = ImageOps.pad(image, side, Image.Resampling.BILINEAR, color=(0, 0, 0))
            else:
                image = image.resize(side, Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8)


def served_preprocessing(card) -> Preprocessing:
    """The preprocessing a model card (`training.card.ModelCard`) declares for its model's input."""
    return Preprocessing(card.input.height, card.input.resize, card.input.mode)


def image_statistics(rgb: np.ndarray) -> np.ndarray:
    """Statistics for a stack of same-sized RGB images `[N, H, W, 3]` uint8 -> float64
    `[N, len(STAT_COLUMNS)]`. Vectorised over chunks of about `CHUNK_PIXELS` (small images by the
    hundred, large photos a few at a time), because ingestion throughput depends on it and memory must
    not grow with the size of the images."""
    if len(rgb) == 0:
        return np.zeros((0, len(STAT_COLUMNS)))
    chunk = max(1, CHUNK_PIXELS // (rgb.shape[1] * rgb.shape[2]))
    return np.concatenate([_chunk_statistics(rgb[i : i + chunk]) for i in range(0, len(rgb), chunk)])


class StatisticsCollector:
    """Statistics of images added one at a time, computed for groups of same-shaped images at once
    (vectorised) and flushed every `budget_bytes` of pixels, so memory stays bounded however many
    images a batch holds. `values()` flushes and returns key -> statistics row."""

    def __init__(self, budget_bytes: int = 64 * 1024 * 1024):
        self.budget_bytes = budget_bytes
        self._values: dict[object, np.ndarray] = {}
        self._pending: dict[tuple[int, ...], list[tuple[object, np.ndarray]]] = {}
        self._pending_bytes = 0

    def add(self, key: object, rgb: np.ndarray) -> None:
        self._pending.setdefault(rgb.shape, []).append((key, rgb))
        self._pending_bytes += rgb.nbytes
        if self._pending_bytes >= self.budget_bytes:
            self._flush()

    def _flush(self) -> None:
        for items in self._pending.values():
            statistics = image_statistics(np.stack([pixels for _, pixels in items]))
            self._values.update(zip((key for key, _ in items), statistics))
        self._pending.clear()
        self._pending_bytes = 0

    def values(self) -> dict[object, np.ndarray]:
        self._flush()
        return self._values


def luma(rgb: np.ndarray) -> np.ndarray:
    """uint8 grayscale of uint8 RGB `[..., 3]`, bit for bit as PIL's convert("L") (ITU-R 601-2)."""
    weighted = rgb[..., 0] * np.uint32(19595) + rgb[..., 1] * np.uint32(38470) + rgb[..., 2] * np.uint32(7471)
    return ((weighted + 0x8000) >> 16).astype(np.uint8)


def _chunk_statistics(rgb: np.ndarray) -> np.ndarray:
    n, height, width = rgb.shape[:3]
    gray = luma(rgb).astype(np.float32) * (1.0 / 255.0)
    flat = gray.reshape(n, -1)
    brightness = flat.mean(axis=1)
    contrast = flat.std(axis=1)
    # "Ink" is what stands out from the image's background, taken as the mean of its border, so the
    # measure holds for dark-on-light and light-on-dark images alike.
    border = np.concatenate([gray[:, 0, :], gray[:, -1, :], gray[:, :, 0], gray[:, :, -1]], axis=1)
    weights = np.abs(gray - border.mean(axis=1)[:, None, None])
    ink_fraction = (weights > 0.25).reshape(n, -1).mean(axis=1)
    dx = np.abs(np.diff(gray, axis=2)).reshape(n, -1).mean(axis=1) if width > 1 else np.zeros(n)
    dy = np.abs(np.diff(gray, axis=1)).reshape(n, -1).mean(axis=1) if height > 1 else np.zeros(n)
    edge_strength = (dx + dy) / 2
    # Variance of the Laplacian, the usual focus measure: blur removes the fine detail it responds to.
    if height > 2 and width > 2:
        laplacian = (
            4 * gray[:, 1:-1, 1:-1] - gray[:, :-2, 1:-1] - gray[:, 2:, 1:-1] - gray[:, 1:-1, :-2] - gray[:, 1:-1, 2:]
        )
        sharpness = laplacian.reshape(n, -1).var(axis=1)
    else:
        sharpness = np.zeros(n)

    # Ink-weighted moments, in coordinates normalised to [0, 1].
    total = weights.reshape(n, -1).sum(axis=1) + 1e-9
    ys = (np.arange(height, dtype=np.float32) + 0.5) / height
    xs = (np.arange(width, dtype=np.float32) + 0.5) / width
    column_mass, row_mass = weights.sum(axis=1), weights.sum(axis=2)  # [N, W], [N, H]
    centroid_x = (column_mass @ xs) / total
    centroid_y = (row_mass @ ys) / total
    mu20 = (column_mass @ (xs * xs)) / total - centroid_x**2
    mu02 = (row_mass @ (ys * ys)) / total - centroid_y**2
    mu11 = ((weights @ xs) @ ys) / total - centroid_x * centroid_y
    # Angle of the principal axis from vertical: upright strokes sit near 0 instead of wrapping at +-90.
    orientation = np.degrees(0.5 * np.arctan2(2 * mu11, mu02 - mu20))

    # Channel planes, and the max/min per pixel in uint8: ten times faster than float over [N, HW, 3].
    red, green, blue = (rgb[..., channel].reshape(n, -1) for channel in range(3))
    brightest, darkest = np.maximum(np.maximum(red, green), blue), np.minimum(np.minimum(red, green), blue)
    # HSV saturation; a black pixel (brightest 0) has none.
    saturation = ((brightest - darkest).astype(np.float32) / np.maximum(brightest, 1).astype(np.float32)).mean(axis=1)
    red_green = (red.astype(np.float32) - green) * (1.0 / 255.0)
    blue_yellow = (blue.astype(np.float32) - (red.astype(np.float32) + green) * 0.5) * (1.0 / 255.0)

    return np.stack(
        [
            brightness, contrast, ink_fraction, edge_strength, centroid_x, centroid_y, orientation,
            red_green.mean(axis=1), blue_yellow.mean(axis=1), red_green.std(axis=1), blue_yellow.std(axis=1),
            saturation, sharpness,
        ],
        axis=1,
    ).astype(np.float64)
