"""Tests for core.images: decoding every input kind, rejecting bad ones, preprocessing geometry."""

from __future__ import annotations

import io
import pickle
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from core.images import (
    MAX_PIXELS,
    ImageError,
    ImageSize,
    as_model_sees,
    content_box,
    crop_box,
    decode_image,
    decode_mask,
    map_to_original,
    mask_as_model_sees,
    preprocess,
    preprocess_mask,
    probe_size,
    rgb_from_array,
    to_display,
)


def encode(image: Image.Image, file_format: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=file_format, **options)
    return buffer.getvalue()


def gradient_rgb(height: int = 32, width: int = 48) -> np.ndarray:
    """(H, W, 3) uint8 with distinct values per channel and position."""
    rows = np.linspace(0, 255, height, dtype=np.float64)[:, None]
    cols = np.linspace(0, 255, width, dtype=np.float64)[None, :]
    red = np.broadcast_to(rows, (height, width))
    green = np.broadcast_to(cols, (height, width))
    blue = (red + green) / 2
    return np.stack([red, green, blue], axis=2).round().astype(np.uint8)


def png_claiming_size(width: int, height: int) -> bytes:
    """A syntactically valid PNG whose header claims ``width`` x ``height`` but holds almost no data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


# ---------------------------------------------------------------------------
# decode_image: every supported pixel format


def test_rgb_png_round_trips_exactly() -> None:
    pixels = gradient_rgb()
    decoded = decode_image(encode(Image.fromarray(pixels)))
    assert decoded.dtype == np.uint8 and decoded.shape == (32, 48, 3)
    np.testing.assert_array_equal(decoded, pixels)


def test_decodes_from_path_and_from_pathlike(tmp_path) -> None:
    pixels = gradient_rgb()
    path = tmp_path / "image.png"
    path.write_bytes(encode(Image.fromarray(pixels)))
    np.testing.assert_array_equal(decode_image(path), pixels)
    np.testing.assert_array_equal(decode_image(str(path)), pixels)


def test_grayscale_becomes_three_equal_channels() -> None:
    gray = gradient_rgb()[..., 0]
    decoded = decode_image(encode(Image.fromarray(gray, mode="L")))
    assert decoded.shape == (32, 48, 3)
    for channel in range(3):
        np.testing.assert_array_equal(decoded[..., channel], gray)


def test_rgba_is_composited_on_white() -> None:
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red under every pixel
    rgba[:, :8, 3] = 255  # left half opaque
    rgba[:, 8:, 3] = 0  # right half fully transparent
    decoded = decode_image(encode(Image.fromarray(rgba, mode="RGBA")))
    np.testing.assert_array_equal(decoded[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(decoded[0, 15], [255, 255, 255])


def test_half_transparent_pixel_is_blended() -> None:
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 3] = 128  # black at half opacity over white -> mid grey
    decoded = decode_image(encode(Image.fromarray(rgba, mode="RGBA")))
    assert abs(int(decoded[0, 0, 0]) - 127) <= 1


def test_palette_image_uses_palette_colours() -> None:
    pixels = np.zeros((16, 16, 3), dtype=np.uint8)
    pixels[:, 8:] = [10, 200, 30]
    palette_image = Image.fromarray(pixels).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    assert palette_image.mode == "P"
    decoded = decode_image(encode(palette_image))
    np.testing.assert_array_equal(decoded[0, 0], [0, 0, 0])
    np.testing.assert_array_equal(decoded[0, 15], [10, 200, 30])


def test_palette_transparency_is_composited_on_white() -> None:
    indices = np.zeros((8, 8), dtype=np.uint8)
    indices[:, 4:] = 1
    image = Image.fromarray(indices, mode="P")
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    decoded = decode_image(encode(image, transparency=0))
    np.testing.assert_array_equal(decoded[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(decoded[0, 7], [255, 0, 0])


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 32896, 65535] * 4] * 16, dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    decoded = decode_image(encode(image))
    np.testing.assert_array_equal(decoded[0, :4, 0], [0, 1, 128, 255])
    np.testing.assert_array_equal(decoded[..., 0], decoded[..., 2])


def test_thirty_two_bit_integer_image_is_read_as_sixteen_bit_range() -> None:
    values = np.full((12, 12), 65535, dtype=np.int32)
    values[:, :6] = 0
    image = Image.fromarray(values, mode="I")
    decoded = decode_image(encode(image, "TIFF"))
    assert decoded[0, 0, 0] == 0 and decoded[0, 11, 0] == 255


def test_float_image_in_unit_range_is_scaled_by_255() -> None:
    values = np.tile(np.linspace(0.0, 1.0, 10, dtype=np.float32), (10, 1))
    decoded = decode_image(encode(Image.fromarray(values, mode="F"), "TIFF"))
    assert decoded[0, 0, 0] == 0 and decoded[0, 9, 0] == 255


def test_float_image_outside_unit_range_is_stretched() -> None:
    values = np.tile(np.linspace(-50.0, 950.0, 10, dtype=np.float32), (10, 1))
    decoded = decode_image(encode(Image.fromarray(values, mode="F"), "TIFF"))
    assert decoded[0, 0, 0] == 0 and decoded[0, 9, 0] == 255


def test_cmyk_jpeg_is_converted_to_rgb() -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 0, 0, 0))  # no ink: white
    decoded = decode_image(encode(cmyk, "JPEG", quality=95))
    assert decoded.shape == (16, 16, 3)
    assert decoded.min() > 240


def exif_with_orientation(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def test_exif_orientation_is_applied() -> None:
    stored = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high as stored
    stored[:10, :10] = [255, 0, 0]  # red block top-left
    data = encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif_with_orientation(6))
    decoded = decode_image(data)
    # Orientation 6 means "rotate 90 degrees clockwise to display".
    assert decoded.shape == (40, 20, 3)
    assert decoded[2, 17, 0] > 200 and decoded[2, 17, 1] < 60  # red moved to the top-right
    assert decoded[2, 2].max() < 60
    assert probe_size(data) == (40, 20)


def test_first_frame_of_animated_gif() -> None:
    frames = [Image.new("RGB", (10, 10), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    decoded = decode_image(buffer.getvalue())
    assert decoded[0, 0, 0] > 200 and decoded[0, 0, 2] < 50


# ---------------------------------------------------------------------------
# decode_image: bad inputs


def test_image_error_names_source_and_reason() -> None:
    error = ImageError("bottle/003.png", "truncated image file")
    assert str(error) == "bottle/003.png: truncated image file"
    assert isinstance(error, ValueError)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.source, copy.reason) == ("bottle/003.png", "truncated image file")


def test_zero_byte_input(tmp_path) -> None:
    with pytest.raises(ImageError, match="empty file") as raised:
        decode_image(b"", name="empty.png")
    assert raised.value.source == "empty.png"
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        decode_image(path)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(ImageError, match="file not found"):
        decode_image(tmp_path / "nope.png")


def test_folder_is_not_an_image(tmp_path) -> None:
    with pytest.raises(ImageError, match="folder"):
        decode_image(tmp_path)


@pytest.mark.parametrize("file_format", ["PNG", "JPEG"])
def test_truncated_file(file_format: str) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), file_format)
    with pytest.raises(ImageError) as raised:
        decode_image(data[: len(data) // 2], name=f"bottle/003.{file_format.lower()}")
    assert raised.value.reason == "truncated image file"
    assert str(raised.value).startswith(f"bottle/003.{file_format.lower()}: ")


def test_text_file_with_image_extension(tmp_path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture\n")
    with pytest.raises(ImageError, match="not an image"):
        decode_image(path, name="notes.png")


def test_corrupt_png_data_is_reported() -> None:
    noise = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    data = bytearray(encode(Image.fromarray(noise)))
    start = data.index(b"IDAT") + 4
    data[start + 10 : start + 60] = b"\xff" * 50  # smash the compressed stream
    with pytest.raises(ImageError):
        decode_image(bytes(data))


@pytest.mark.parametrize(
    ("width", "height"),
    [(100_000, 100_000), (7_000, 7_000), (30_000, 10)],
    ids=["beyond-pillow-limit", "beyond-our-pixel-limit", "side-too-long"],
)
def test_decompression_bomb_is_refused_from_header(width: int, height: int) -> None:
    data = png_claiming_size(width, height)
    started = time.perf_counter()
    with pytest.raises(ImageError, match="too large"):
        decode_image(data, name="bomb.png")
    with pytest.raises(ImageError, match="too large"):
        probe_size(data)
    # Refused from the header: no time (or memory) spent on pixels.
    assert time.perf_counter() - started < 1.0


def test_pixel_limit_is_what_the_docs_say() -> None:
    assert 7_000 * 7_000 > MAX_PIXELS > 6_000 * 6_000


def test_too_small_image() -> None:
    with pytest.raises(ImageError, match="too small"):
        decode_image(encode(Image.new("RGB", (4, 30))))


def test_probe_size_reads_header_only() -> None:
    data = encode(Image.fromarray(gradient_rgb(20, 30)))
    assert probe_size(data) == (20, 30)
    # A truncated file still has a readable header: only a full decode fails.
    assert probe_size(data[: len(data) - 40]) == (20, 30)


# ---------------------------------------------------------------------------
# decode_mask


def test_mask_any_nonzero_pixel_is_defect() -> None:
    values = np.zeros((16, 16), dtype=np.uint8)
    values[2:5, 3:9] = 255
    values[10, 10] = 1
    mask = decode_mask(encode(Image.fromarray(values)))
    assert mask.dtype == bool and mask.shape == (16, 16)
    assert mask.sum() == 3 * 6 + 1 and mask[10, 10]


def test_colour_mask_uses_any_channel() -> None:
    values = np.zeros((10, 10, 3), dtype=np.uint8)
    values[0, 0] = [0, 0, 9]
    mask = decode_mask(encode(Image.fromarray(values)))
    assert mask[0, 0] and mask.sum() == 1


def test_transparent_mask_pixels_are_background() -> None:
    values = np.zeros((10, 10, 4), dtype=np.uint8)
    values[..., 0] = 255  # red everywhere ...
    values[:5, :, 3] = 255  # ... but only the top half is visible
    mask = decode_mask(encode(Image.fromarray(values, mode="RGBA")))
    assert mask[:5].all() and not mask[5:].any()


def test_palette_mask_compares_colours_not_indices() -> None:
    indices = np.zeros((10, 10), dtype=np.uint8)
    indices[:, 5:] = 1
    image = Image.fromarray(indices, mode="P")
    image.putpalette([255, 255, 255, 0, 0, 0] + [0] * (254 * 3))  # index 0 is white
    mask = decode_mask(encode(image))
    assert mask[:, :5].all() and not mask[:, 5:].any()


def test_bad_mask_raises_image_error() -> None:
    with pytest.raises(ImageError, match="not an image"):
        decode_mask(b"plain text", name="mask.png")


# ---------------------------------------------------------------------------
# rgb_from_array


def test_rgb_from_array_accepts_grey_and_rgb() -> None:
    grey = np.arange(28 * 28, dtype=np.uint32).reshape(28, 28).astype(np.uint8)
    rgb = rgb_from_array(grey, "x")
    assert rgb.shape == (28, 28, 3) and rgb.flags.writeable
    np.testing.assert_array_equal(rgb[..., 1], grey)
    pixels = gradient_rgb()
    copy = rgb_from_array(pixels, "y")
    np.testing.assert_array_equal(copy, pixels)
    assert copy is not pixels


def test_rgb_from_array_rejects_wrong_dtype_and_size() -> None:
    with pytest.raises(ImageError, match="uint8"):
        rgb_from_array(np.zeros((28, 28), dtype=np.float32), "x")
    with pytest.raises(ImageError, match="too small"):
        rgb_from_array(np.zeros((4, 4), dtype=np.uint8), "x")
    with pytest.raises(ImageError, match=r"\(H, W\)"):
        rgb_from_array(np.zeros((28, 28, 4), dtype=np.uint8), "x")


# ---------------------------------------------------------------------------
# ImageSize and preprocessing


def test_image_size_defaults_and_validation() -> None:
    size = ImageSize()
    assert (size.resize, size.crop, size.crop_offset) == (256, 224, 16)
    with pytest.raises(ValueError, match="larger"):
        ImageSize(resize=100, crop=200)
    with pytest.raises(ValueError, match="positive"):
        ImageSize(resize=0, crop=0)
    with pytest.raises(TypeError):
        ImageSize(resize=256.0, crop=224)  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        size.crop = 100  # type: ignore[misc]


@pytest.mark.parametrize("shape", [(300, 400), (900, 900), (20, 20), (224, 224)])
def test_preprocess_shape_dtype_and_range(shape: tuple[int, int]) -> None:
    image = gradient_rgb(*shape)
    result = preprocess(image, ImageSize())
    assert result.shape == (3, 224, 224) and result.dtype == np.float32
    assert result.flags.c_contiguous
    assert 0.0 <= result.min() and result.max() <= 1.0


def test_preprocess_keeps_colour_and_channel_order() -> None:
    image = np.zeros((300, 300, 3), dtype=np.uint8)
    image[...] = [255, 128, 0]
    result = preprocess(image, ImageSize())
    np.testing.assert_allclose(result[:, 100, 100], [1.0, 128 / 255, 0.0], atol=1e-6)


def test_preprocess_cuts_the_border_off() -> None:
    image = np.full((256, 256, 3), 255, dtype=np.uint8)
    image[16:240, 16:240] = 0  # the exact centre crop is black, the 16-pixel border white
    result = preprocess(image, ImageSize(256, 224))
    assert result.max() == 0.0


def test_preprocess_without_crop_keeps_everything() -> None:
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[0, 0] = 255
    result = preprocess(image, ImageSize(64, 64))
    assert result.shape == (3, 64, 64) and result[0, 0, 0] == 1.0


def test_preprocess_rejects_wrong_input() -> None:
    with pytest.raises(ValueError):
        preprocess(np.zeros((10, 10), dtype=np.uint8), ImageSize())
    with pytest.raises(ValueError):
        preprocess(np.zeros((10, 10, 3), dtype=np.float32), ImageSize())


def test_mask_preprocessing_stays_binary_and_aligned() -> None:
    mask = np.zeros((900, 900), dtype=bool)
    mask[450:, 450:] = True  # bottom-right quadrant
    result = preprocess_mask(mask, ImageSize())
    assert result.dtype == bool and result.shape == (224, 224)
    # The quadrant starts at 128 in the 256 grid, i.e. 112 in the crop.
    assert result[112:, 112:].all()
    assert not result[:111, :].any() and not result[:, :111].any()


def test_mask_preprocessing_of_random_mask_has_only_two_values() -> None:
    mask = np.random.default_rng(0).random((333, 500)) > 0.5
    result = preprocess_mask(mask, ImageSize())
    assert result.dtype == bool
    assert 0.3 < result.mean() < 0.7


# ---------------------------------------------------------------------------
# Geometry back to the original image


def test_crop_box_for_mvtec_geometry() -> None:
    # 16/256 and 240/256 of 900 are 56.25 and 843.75.
    assert crop_box((900, 900), ImageSize()) == (56, 56, 844, 844)


def test_crop_box_non_square_and_no_crop() -> None:
    assert crop_box((512, 1024), ImageSize()) == (32, 64, 480, 960)
    assert crop_box((300, 200), ImageSize(224, 224)) == (0, 0, 300, 200)


def test_crop_box_on_tiny_image_covers_at_least_a_pixel() -> None:
    top, left, bottom, right = crop_box((8, 8), ImageSize(256, 8))
    assert bottom > top and right > left


def test_map_to_original_fills_outside_with_nan() -> None:
    heatmap = np.full((224, 224), 3.0, dtype=np.float32)
    result = map_to_original(heatmap, (900, 900), ImageSize())
    assert result.shape == (900, 900) and result.dtype == np.float32
    assert np.isnan(result[:56]).all() and np.isnan(result[844:]).all()
    assert np.isnan(result[:, :56]).all() and np.isnan(result[:, 844:]).all()
    np.testing.assert_allclose(result[56:844, 56:844], 3.0)


def test_map_to_original_keeps_orientation_and_accepts_coarse_maps() -> None:
    heatmap = np.tile(np.linspace(0.0, 1.0, 28, dtype=np.float32), (28, 1))  # grows to the right
    result = map_to_original(heatmap, (300, 600), ImageSize())
    top, left, bottom, right = crop_box((300, 600), ImageSize())
    row = result[(top + bottom) // 2, left:right]
    assert np.all(np.diff(row) >= -1e-6) and row[-1] > row[0]
    assert not np.isnan(result[top:bottom, left:right]).any()


def test_map_round_trip_puts_a_hot_spot_where_it_was() -> None:
    # A defect in the original, pushed through preprocess_mask and back,
    # must land on (nearly) the same pixels.
    mask = np.zeros((900, 900), dtype=bool)
    mask[300:400, 500:650] = True
    cropped = preprocess_mask(mask, ImageSize()).astype(np.float32)
    back = map_to_original(cropped, (900, 900), ImageSize())
    recovered = np.nan_to_num(back) > 0.5
    overlap = (recovered & mask).sum() / (recovered | mask).sum()
    assert overlap > 0.95


def test_letterbox_keeps_the_aspect_ratio_and_maps_back_onto_the_original_pixels():
    size = ImageSize(resize=128, crop=128, pad=True)
    image = np.zeros((60, 180, 3), np.uint8)
    image[20:40, 100:130] = 255
    mask = np.zeros((60, 180), bool)
    mask[20:40, 100:130] = True
    top, left, bottom, right = content_box((60, 180), size)
    assert (bottom - top, right - left) == (43, 128)  # 60/180 of 128, not squashed
    canvas = preprocess(image, size)
    assert canvas.shape == (3, 128, 128)
    # The grey border is outside the content box; the bright square inside keeps its shape.
    assert np.allclose(canvas[:, :top], canvas[:, 0:1, 0:1])
    painted = preprocess_mask(mask, size)
    ys, xs = np.nonzero(painted)
    assert top <= ys.min() and ys.max() < bottom
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    assert abs(width / height - 30 / 20) < 0.25
    back = map_to_original(painted.astype(np.float32), (60, 180), size)
    assert back.shape == (60, 180)
    overlap = ((back > 0.5) & mask).sum() / mask.sum()
    assert overlap > 0.8


def test_the_view_a_model_sees_is_its_crop_or_its_letterbox() -> None:
    image = np.zeros((60, 180, 3), np.uint8)
    image[:, 90:] = 255  # right half white
    mask = np.zeros((60, 180), bool)
    mask[20:40, 100:130] = True
    squashed = as_model_sees(image, ImageSize(128, 128), 64)
    assert squashed.shape == (64, 64, 3) and squashed.dtype == np.uint8
    assert squashed[:, :30].max() == 0 and squashed[:, 34:].min() == 255  # squashed: no border
    boxed = as_model_sees(image, ImageSize(128, 128, pad=True), 64)
    top, left, bottom, right = (v // 2 for v in content_box((60, 180), ImageSize(128, 128, pad=True)))
    grey = boxed[: top - 1].reshape(-1, 3)
    assert (grey == grey[0]).all() and 0 < grey[0, 0] < 255  # the letterbox's grey bars above the image
    seen = mask_as_model_sees(mask, ImageSize(128, 128, pad=True), 64)
    assert seen.dtype == bool and seen.shape == (64, 64)
    ys, xs = np.nonzero(seen)
    assert top <= ys.min() and ys.max() < bottom  # the defect stays inside the image's part of the canvas


def test_map_to_original_rejects_non_2d() -> None:
    with pytest.raises(ValueError):
        map_to_original(np.zeros((3, 224, 224)), (900, 900), ImageSize())


# ---------------------------------------------------------------------------
# to_display


def test_to_display_shrinks_keeping_aspect_ratio() -> None:
    image = gradient_rgb(400, 1000)
    thumbnail = to_display(image, max_side=250)
    assert thumbnail.shape == (100, 250, 3) and thumbnail.dtype == np.uint8


def test_to_display_never_enlarges_and_copies() -> None:
    image = gradient_rgb(40, 50)
    thumbnail = to_display(image, max_side=512)
    np.testing.assert_array_equal(thumbnail, image)
    assert thumbnail is not image
    assert to_display(image[..., 0], max_side=25).shape == (20, 25)
