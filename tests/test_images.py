import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

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
        (encode(Image.new("F", (8, 8)), "TIFF"), "unsupported_mode"),  # float pixels: no range to map from
        (encode(Image.new("L", (200, 200)), "PNG"), "image_too_large"),
    ],
)
def test_rejects_bad_images_with_a_reason(data, reason):
    with pytest.raises(ImageRejected) as rejected:
        decode_image(data, max_pixels=100 * 100)
    assert rejected.value.reason == reason


def test_a_16_bit_scan_is_mapped_onto_8_bits_over_its_full_range():
    ramp = np.array([[0, 257, 32896, 65535]], dtype=np.uint16).repeat(3, axis=0)  # 3 rows of a ramp
    for fmt in ("PNG", "TIFF"):
        decoded = decode_image(encode(Image.fromarray(ramp), fmt), max_pixels=10_000, to="L")
        assert decoded.mode.startswith("I") and (decoded.width, decoded.height) == (4, 3)
        assert decoded.pixels.tolist() == [[0, 1, 128, 255]] * 3
        assert decode_image(encode(Image.fromarray(ramp), fmt), max_pixels=10_000).pixels.shape == (3, 4, 3)


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
    pixels = np.asarray(image.convert("RGB"))
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
    # A grayscale image has no colour: its opponent channels and saturation are exactly zero.
    for name in ("red_green", "blue_yellow", "red_green_contrast", "blue_yellow_contrast", "saturation"):
        assert upright[name] == 0.0


def test_brightness_is_pils_own_grayscale_and_colour_statistics_see_cast_saturation_and_focus():
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (1, 24, 40, 3), dtype=np.uint8)
    pil_gray = np.asarray(Image.fromarray(photo[0]).convert("L"), dtype=np.float64) / 255
    statistics = dict(zip(STAT_COLUMNS, image_statistics(photo)[0]))
    assert statistics["brightness"] == pytest.approx(pil_gray.mean(), abs=1e-6)

    def stats(image: Image.Image) -> dict[str, float]:
        return dict(zip(STAT_COLUMNS, image_statistics(np.asarray(image.convert("RGB"))[None])[0]))

    scene = Image.fromarray(rng.integers(60, 200, (48, 48, 3), dtype=np.uint8))
    neutral = stats(scene)
    warm = stats(Image.merge("RGB", [band.point(lambda v, k=k: min(255, v + k)) for band, k in zip(scene.split(), (50, 0, -50))]))
    assert warm["red_green"] > neutral["red_green"] + 0.15 and warm["blue_yellow"] < neutral["blue_yellow"] - 0.15
    assert stats(scene.convert("L"))["saturation"] == 0.0 < neutral["saturation"]
    assert stats(scene.filter(ImageFilter.GaussianBlur(2)))["sharpness"] < neutral["sharpness"] / 10

    # Large photos are processed a few at a time: the same values as one by one.
    large = rng.integers(0, 256, (3, 1200, 1600, 3), dtype=np.uint8)
    together, alone = image_statistics(large), np.concatenate([image_statistics(image[None]) for image in large])
    # The principal axis of pure noise is ill-conditioned: float32 summation order moves it by hundredths of a degree.
    tolerance = np.array([0.05 if name == "orientation" else 1e-7 for name in STAT_COLUMNS])
    assert (np.abs(together - alone) <= tolerance + 1e-5 * np.abs(alone)).all()
