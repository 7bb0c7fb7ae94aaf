import io

import numpy as np
import pytest
from PIL import Image

from transforms.images import STAT_COLUMNS, ImageRejected, Preprocessing, decode_image, image_statistics


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "mode, fmt",
    [("L", "PNG"), ("RGB", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("L", "JPEG"), ("RGB", "JPEG"), ("CMYK", "JPEG"),
     ("RGB", "WEBP"), ("RGB", "BMP"), ("P", "GIF"), ("RGB", "TIFF"), ("LA", "PNG")],
)
def test_decodes_every_supported_mode_and_format_to_rgb(mode: str, fmt: str):
    image = Image.new(mode, (13, 7), color=200 if mode in ("L", "P") else (200, 100, 50, 255)[: len(mode)])
    decoded = decode_image(encode(image, fmt), max_pixels=10_000)
    assert decoded.pixels.shape == (7, 13, 3) and decoded.pixels.dtype == np.uint8
    assert decode_image(encode(image, fmt), max_pixels=10_000, to="L").pixels.shape == (7, 13)
    assert (decoded.format, decoded.mode, decoded.width, decoded.height) == (fmt, mode, 13, 7)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "missing_image"),
        (None, "missing_image"),
        (b"definitely not an image", "undecodable_image"),
        (encode(Image.new("L", (8, 8)), "PNG")[:30], "undecodable_image"),
        (encode(Image.new("RGB", (8, 8)), "PPM"), "unsupported_format"),
        (encode(Image.new("I;16", (8, 8)), "PNG"), "unsupported_mode"),
        (encode(Image.new("L", (200, 200)), "PNG"), "image_too_large"),
    ],
)
def test_rejects_bad_images_with_a_reason(data, reason):
    with pytest.raises(ImageRejected) as rejected:
        decode_image(data, max_pixels=100 * 100)
    assert rejected.value.reason == reason


def test_a_photo_is_turned_upright_by_its_exif_orientation():
    # A phone's landscape sensor image of a portrait scene: stored 20 wide x 10 high, EXIF 6 = rotate 90 degrees clockwise.
    stored = Image.new("RGB", (20, 10), (0, 0, 0))
    stored.paste((255, 0, 0), (0, 0, 10, 10))  # the left half is red
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif, quality=95)
    decoded = decode_image(buffer.getvalue(), max_pixels=10_000)
    assert (decoded.width, decoded.height) == (10, 20) and decoded.pixels.shape == (20, 10, 3)
    assert decoded.pixels[2, 5, 0] > 200 and decoded.pixels[17, 5, 0] < 60  # red is now on top


def test_a_large_photo_is_decoded_downscaled_within_fit_pixels_keeping_its_own_size_and_orientation():
    stored = Image.new("RGB", (1200, 800), (0, 0, 0))
    stored.paste((255, 0, 0), (0, 0, 600, 800))  # the left half is red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif)
    decoded = decode_image(buffer.getvalue(), max_pixels=10**8, fit_pixels=240 * 160)
    assert (decoded.width, decoded.height) == (800, 1200)  # the photo's own size, upright
    height, width, _ = decoded.pixels.shape
    assert height > width and height * width <= 240 * 160 and height * width >= 240 * 160 / 4
    assert decoded.pixels[5, width // 2, 0] > 200 and decoded.pixels[-5, width // 2, 0] < 60  # red on top


def test_preprocessing_squashes_crops_or_letterboxes_to_the_square_and_drops_colour_for_grayscale():
    wide = np.zeros((10, 40, 3), np.uint8)
    wide[:, :, 0] = 200  # red everywhere ...
    wide[:, :5] = (0, 0, 255)  # ... but a blue left edge
    squashed = Preprocessing(20, "squash", "rgb")(wide)
    cropped = Preprocessing(20, "center_crop", "rgb")(wide)
    letterboxed = Preprocessing(20, "letterbox", "rgb")(wide)
    gray = Preprocessing(20, "squash", "grayscale")(wide)
    assert {a.shape for a in (squashed, cropped, letterboxed, gray)} == {(20, 20, 3)}
    assert squashed[10, 0, 2] > 200  # stretched: the blue edge is still there
    assert cropped[10, 0, 2] < 50 and cropped[10, 0, 0] > 150  # cropped: the edge is cut away
    assert letterboxed[0, 10].tolist() == [0, 0, 0] and letterboxed[10, 10, 0] > 150  # padded above and below
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


def digit_like(angle: float = 0.0, invert: bool = False) -> np.ndarray:
    image = Image.new("L", (32, 32), 0)
    image.paste(255, (14, 6, 18, 26))  # a vertical stroke
    image = image.rotate(angle, resample=Image.Resampling.BILINEAR)
    pixels = np.asarray(image)
    return (255 - pixels if invert else pixels)[None]


def test_statistics_see_exposure_polarity_and_orientation():
    upright = dict(zip(STAT_COLUMNS, image_statistics(digit_like())[0]))
    rotated = dict(zip(STAT_COLUMNS, image_statistics(digit_like(angle=60))[0]))
    inverted = dict(zip(STAT_COLUMNS, image_statistics(digit_like(invert=True))[0]))
    assert abs(upright["orientation"]) < 5
    assert abs(rotated["orientation"]) > 40
    assert inverted["brightness"] > 0.8 > 0.2 > upright["brightness"]
    # Ink is measured against the image's own background, so it is polarity-invariant.
    assert inverted["ink_fraction"] == pytest.approx(upright["ink_fraction"])
    assert 0.45 < upright["centroid_x"] < 0.55
