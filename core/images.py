"""Decode, validate and preprocess images and defect masks.

Everything that turns a file into pixels goes through this module, so that
every kind of bad input (empty, truncated, not an image, absurdly large or
small) surfaces as one exception type, :class:`ImageError`, naming the file
and the reason.

Conventions used throughout:

* a decoded image is a ``np.ndarray`` of shape ``(H, W, 3)``, dtype ``uint8``,
  RGB channel order;
* a decoded mask is a ``np.ndarray`` of shape ``(H, W)``, dtype ``bool``,
  True where the pixel is defective;
* a preprocessed image is ``(3, crop, crop)`` ``float32`` in ``[0, 1]``
  (channels first, as the backbones expect). Normalisation with ImageNet
  statistics is the feature extractor's job, not this module's.

Decoding uses Pillow only, restricted to raster formats that need no external
program (PNG, JPEG, BMP, TIFF, WebP, GIF, PPM/PGM, JPEG 2000, AVIF where
available): Pillow would otherwise also open, e.g., EPS files through
Ghostscript, whatever their file name says. OpenCV can read a few extra
formats, but it cannot report an image's size before decoding all of its
pixels, which would defeat the decompression-bomb check below.
"""

from __future__ import annotations

import functools
import io
import math
import os
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 40_000_000
"""Images with more pixels than this are refused before their pixels are decoded."""

MIN_SIDE = 8
"""Images with a side shorter than this are refused as unusable."""

MAX_SIDE = 20_000
"""Images with a side longer than this are refused (even if MAX_PIXELS is respected)."""

MAX_BYTES_PER_PIXEL = 16
"""Files may hold at most this many bytes per pixel (and frame), plus :data:`FILE_SLACK_BYTES`."""

FILE_SLACK_BYTES = 8 * 1024**2
"""Room for metadata (EXIF, ICC profiles, thumbnails) on top of the pixel allowance."""

_EXIF_ORIENTATION_TAG = 0x0112
# EXIF orientations 5-8 rotate by 90 degrees, so the displayed image has its
# width and height swapped relative to the stored one.
_ORIENTATIONS_SWAPPING_SIDES = frozenset({5, 6, 7, 8})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_MODES_WITH_ALPHA = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_WANTED_FORMATS = ("PNG", "JPEG", "MPO", "BMP", "DIB", "TIFF", "WEBP", "GIF", "PPM", "JPEG2000", "AVIF")

ImageSource = bytes | str | os.PathLike
"""Raw encoded file contents, or a path to the file."""


class ImageError(ValueError):
    """An input could not be used as an image or mask.

    Attributes:
        source: the file name or path the input came from (or ``"<bytes>"``).
        reason: a short human-readable explanation, e.g. ``"truncated image file"``.
    """

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason

    def __reduce__(self) -> tuple[type[ImageError], tuple[str, str]]:
        # The default pickling would call ImageError(message) and fail; it is
        # needed when errors cross process boundaries.
        return (ImageError, (self.source, self.reason))


# ---------------------------------------------------------------------------
# Decoding


def _source_name(data: ImageSource, name: str | None) -> str:
    if name:
        return name
    if isinstance(data, (bytes, bytearray, memoryview)):
        return "<bytes>"
    return os.fspath(data) if not isinstance(data, str) else data


def check_dimensions(height: int, width: int, source: str) -> None:
    """Raise :class:`ImageError` if an image of ``height`` x ``width`` pixels is unusable.

    Too large means more than ``MAX_PIXELS`` pixels or a side over ``MAX_SIDE``;
    too small means a side under ``MIN_SIDE``.
    """
    if height > MAX_SIDE or width > MAX_SIDE or height * width > MAX_PIXELS:
        raise ImageError(
            source,
            f"image too large ({width}x{height} pixels; the limits are {MAX_SIDE} "
            f"pixels per side and {MAX_PIXELS:,} pixels in total)",
        )
    if height < MIN_SIDE or width < MIN_SIDE:
        raise ImageError(
            source,
            f"image too small ({width}x{height} pixels; each side must be at least {MIN_SIDE})",
        )


@functools.cache
def _readable_formats() -> tuple[str, ...]:
    """The wanted Pillow format ids that this Pillow build can open (MPO: multi-picture JPEG)."""
    Image.init()  # registers every plugin, so Image.OPEN is complete
    return tuple(file_format for file_format in _WANTED_FORMATS if file_format in Image.OPEN)


def _open_unloaded(data: ImageSource, source: str) -> Image.Image:
    """Open ``data`` with Pillow, reading only the header, and check its size.

    The returned image has not decoded its pixels yet; the caller must close it.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise ImageError(source, "empty file (0 bytes)")
        file: io.BytesIO | str | os.PathLike = io.BytesIO(data)
    else:
        try:
            if os.path.isdir(data):
                raise ImageError(source, "is a folder, not an image file")
            if os.path.getsize(data) == 0:
                raise ImageError(source, "empty file (0 bytes)")
        except FileNotFoundError as exc:
            raise ImageError(source, "file not found") from exc
        except OSError as exc:
            raise ImageError(source, f"cannot read file ({exc.strerror or exc})") from exc
        file = data
    try:
        image = Image.open(file, formats=_readable_formats())
    except UnidentifiedImageError as exc:
        raise ImageError(source, "not an image, or an image format that cannot be read") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own, higher, limits fired before ours could (the warning
        # only raises where warnings are turned into errors).
        raise ImageError(source, f"image too large (more than {MAX_PIXELS:,} pixels)") from exc
    except FileNotFoundError as exc:
        raise ImageError(source, "file not found") from exc
    except Exception as exc:  # noqa: BLE001 - plugins raise many types on corrupt headers
        raise ImageError(source, f"unreadable image header ({type(exc).__name__}: {exc})") from exc
    try:
        width, height = image.size
        check_dimensions(height, width, source)
        size = len(data) if isinstance(data, (bytes, bytearray, memoryview)) else os.path.getsize(data)
        check_file_bytes(size, height, width, _frame_count(image), source)
    except BaseException:
        image.close()
        raise
    return image


def _frame_count(image: Image.Image) -> int:
    try:
        return max(1, int(getattr(image, "n_frames", 1)))
    except Exception:  # noqa: BLE001 - a broken frame index: count the first frame only
        return 1


def check_file_bytes(size: int, height: int, width: int, frames: int, source: str) -> None:
    """Raise :class:`ImageError` when a file is far larger than its pixels can explain.

    Even uncompressed 16-bit RGBA needs 8 bytes a pixel; a file above
    ``MAX_BYTES_PER_PIXEL`` per pixel and frame plus ``FILE_SLACK_BYTES`` (EXIF,
    colour profiles) carries something else — e.g. 250 MB appended to a small
    PNG — which would otherwise be stored and copied whole with every import.
    """
    limit = MAX_BYTES_PER_PIXEL * height * width * frames + FILE_SLACK_BYTES
    if size > limit:
        raise ImageError(
            source,
            f"file is {size:,} bytes, far more than a {width}x{height} image needs (at most {limit:,}); "
            "it carries other data after or inside the image — re-save it as a plain image file",
        )


def _header_orientation(image: Image.Image) -> int:
    """EXIF orientation (1-8) visible without decoding pixels; 1 when unknown."""
    try:
        raw_exif = image.info.get("exif")
        if raw_exif:
            exif = Image.Exif()
            exif.load(raw_exif)
            return int(exif.get(_EXIF_ORIENTATION_TAG, 1))
        tiff_tags = getattr(image, "tag_v2", None)
        if tiff_tags is not None:
            return int(tiff_tags.get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - broken EXIF only loses the orientation hint
        return 1
    return 1


def probe_size(data: ImageSource, name: str | None = None) -> tuple[int, int]:
    """Return the ``(height, width)`` an image will have once decoded, reading only its header.

    Accounts for EXIF orientation where the header carries it. Raises
    :class:`ImageError` for empty files, non-images and sizes outside the
    limits. A file that passes can still fail :func:`decode_image` (e.g. when
    its pixel data is truncated): only a full decode proves it is intact.
    """
    source = _source_name(data, name)
    image = _open_unloaded(data, source)
    with image:
        width, height = image.size
        if _header_orientation(image) in _ORIENTATIONS_SWAPPING_SIDES:
            width, height = height, width
    return height, width


def _describe_decode_failure(exc: Exception) -> str:
    message = str(exc)
    if "truncated" in message.lower() or isinstance(exc, EOFError):
        return "truncated image file"
    return f"corrupt image data ({type(exc).__name__}: {message})"


def _open_decoded(data: ImageSource, source: str) -> Image.Image:
    """Open, size-check, fully decode and EXIF-orient an image."""
    image = _open_unloaded(data, source)
    try:
        # load() forces every pixel to be decoded now, so a truncated or
        # corrupt file fails here instead of yielding a half-grey picture.
        image.load()
    except Exception as exc:  # noqa: BLE001 - decoders raise OSError, SyntaxError, zlib.error, ...
        image.close()
        raise ImageError(source, _describe_decode_failure(exc)) from exc
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # noqa: BLE001
        # Malformed EXIF only costs us the orientation; the pixels are fine.
        pass
    return image


def _sixteen_bit_to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale integers in ``[0, 65535]`` to ``uint8`` ``[0, 255]`` with rounding (65535 -> 255)."""
    clipped = np.clip(values, 0, 65535).astype(np.uint32)
    return ((clipped * 255 + 32767) // 65535).astype(np.uint8)


def _float_to_uint8(values: np.ndarray) -> np.ndarray:
    """Map a float image to ``uint8``.

    Float images have no standard range: values already within ``[0, 1]`` are
    taken as intensities and scaled by 255; anything else is stretched from its
    minimum to its maximum. NaN and infinities become 0.
    """
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        values = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return np.round(values * 255.0).astype(np.uint8)


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """``(H, W, 4)`` uint8 RGBA -> ``(H, W, 3)`` uint8 RGB, as if drawn over a white page."""
    colour = rgba[..., :3].astype(np.uint32)
    alpha = rgba[..., 3:4].astype(np.uint32)
    blended = (colour * alpha + 255 * (255 - alpha) + 127) // 255
    return blended.astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., np.newaxis], 3, axis=2)


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in _MODES_WITH_ALPHA or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info
    )


def _pil_to_rgb(image: Image.Image, source: str) -> np.ndarray:
    """Convert a decoded Pillow image of any mode to ``(H, W, 3)`` uint8 RGB."""
    mode = image.mode
    try:
        if mode == "RGB" and "transparency" not in image.info:
            return np.array(image, dtype=np.uint8)
        if mode in _SIXTEEN_BIT_MODES or mode == "I":
            # Pillow stores 16-bit grey (PNG, TIFF) as "I;16*" or, for some
            # sources, as 32-bit "I" holding 0..65535: scale, do not clip.
            return _gray_to_rgb(_sixteen_bit_to_uint8(np.array(image)))
        if mode == "F":
            return _gray_to_rgb(_float_to_uint8(np.array(image)))
        if _has_alpha(image):
            return _composite_on_white(np.array(image.convert("RGBA"), dtype=np.uint8))
        # L, 1, P, CMYK, YCbCr, LAB, HSV: Pillow's own conversion is exact enough.
        return np.array(image.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - exotic modes Pillow cannot convert
        raise ImageError(source, f"unsupported pixel format {mode!r} ({exc})") from exc


def decode_image(data: ImageSource, name: str | None = None) -> np.ndarray:
    """Decode an image file into RGB pixels.

    Args:
        data: the encoded file contents, or a path to the file.
        name: how to refer to the input in errors (defaults to the path, or
            ``"<bytes>"``).

    Returns:
        ``(H, W, 3)`` ``uint8`` RGB array, oriented as the EXIF tag says.
        Grey, palette, CMYK and 16-bit images are converted to 8-bit RGB
        (16-bit values are rescaled, not clipped). Transparent images are
        composited onto white, so that the result does not depend on the
        arbitrary colours encoders leave under fully transparent pixels.
        32-bit integer images are read as 16-bit data (Pillow's way of storing
        it), clipping values outside ``[0, 65535]``; float images as described
        in ``_float_to_uint8``. Multi-frame files (GIF, TIFF) give their first
        frame.

    Raises:
        ImageError: for a missing, empty, truncated, corrupt, too large or too
            small file, or one that is not an image.
    """
    source = _source_name(data, name)
    with _open_decoded(data, source) as image:
        pixels = _pil_to_rgb(image, source)
    # The EXIF rotation may have swapped the sides; the limits are symmetric
    # but this keeps the post-condition explicit.
    check_dimensions(pixels.shape[0], pixels.shape[1], source)
    return pixels


def decode_mask(data: ImageSource, name: str | None = None) -> np.ndarray:
    """Decode a defect mask: any nonzero pixel marks a defect.

    Args:
        data: the encoded file contents, or a path to the file.
        name: how to refer to the input in errors.

    Returns:
        ``(H, W)`` ``bool`` array, True where the pixel is nonzero in any
        colour channel. Where the mask has an alpha channel, fully transparent
        pixels count as background whatever their colour.

    Raises:
        ImageError: as :func:`decode_image`.
    """
    source = _source_name(data, name)
    with _open_decoded(data, source) as image:
        try:
            if image.mode in ("1", "L", "I", "F") or image.mode in _SIXTEEN_BIT_MODES:
                values = np.array(image)
                return np.asarray(values != 0, dtype=bool)
            if _has_alpha(image):
                rgba = np.array(image.convert("RGBA"), dtype=np.uint8)
                return np.any(rgba[..., :3] != 0, axis=2) & (rgba[..., 3] != 0)
            # Palette indices say nothing about colour (index 0 need not be
            # black), so compare the colours themselves.
            rgb = np.array(image.convert("RGB"), dtype=np.uint8)
            return np.any(rgb != 0, axis=2)
        except Exception as exc:  # noqa: BLE001
            raise ImageError(source, f"unsupported mask pixel format {image.mode!r} ({exc})") from exc


def rgb_from_array(array: np.ndarray, name: str) -> np.ndarray:
    """Validate an in-memory ``uint8`` image and return it as a fresh ``(H, W, 3)`` RGB copy.

    Accepts ``(H, W)`` grey, ``(H, W, 1)`` grey or ``(H, W, 3)`` RGB. Applies
    the same size limits as :func:`decode_image`.
    """
    if array.dtype != np.uint8:
        raise ImageError(name, f"pixel array must be uint8, not {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        check_dimensions(array.shape[0], array.shape[1], name)
        return _gray_to_rgb(array)
    if array.ndim == 3 and array.shape[2] == 3:
        check_dimensions(array.shape[0], array.shape[1], name)
        return array.copy()
    raise ImageError(name, f"pixel array must be (H, W) or (H, W, 3), not {array.shape}")


# ---------------------------------------------------------------------------
# Geometry and preprocessing


@dataclass(frozen=True)
class ImageSize:
    """The preprocessing geometry: resize to a square, then centre-crop.

    Attributes:
        resize: side, in pixels, of the square every image is resized to.
        crop: side of the centred square cut from the resized image; equal to
            ``resize`` for no crop.
        pad: keep the aspect ratio: the image is scaled so its longer side is
            ``resize`` and centred on a square canvas of constant grey
            (letterbox) instead of being squashed. Needs ``crop == resize``.
    """

    resize: int = 256
    crop: int = 224
    pad: bool = False

    def __post_init__(self) -> None:
        for field_name in ("resize", "crop"):
            value = getattr(self, field_name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise TypeError(f"ImageSize.{field_name} must be an int, not {value!r}")
            if value <= 0:
                raise ValueError(f"ImageSize.{field_name} must be positive, not {value}")
        if self.crop > self.resize:
            raise ValueError(
                f"ImageSize.crop ({self.crop}) cannot be larger than ImageSize.resize ({self.resize})"
            )
        if self.pad and self.crop != self.resize:
            raise ValueError(
                f"ImageSize.pad keeps the whole image: crop ({self.crop}) must equal resize ({self.resize})"
            )

    @property
    def crop_offset(self) -> int:
        """Rows (and columns) cut from the top (and left) of the resized image."""
        return (self.resize - self.crop) // 2


def _interpolation_for(source_hw: tuple[int, int], target_hw: tuple[int, int]) -> int:
    # INTER_AREA averages all covered source pixels, which avoids aliasing as
    # soon as any axis shrinks; for pure enlargement bilinear is the usual choice.
    enlarging = target_hw[0] >= source_hw[0] and target_hw[1] >= source_hw[1]
    return cv2.INTER_LINEAR if enlarging else cv2.INTER_AREA


def _resize(array: np.ndarray, target_hw: tuple[int, int], interpolation: int | None = None) -> np.ndarray:
    source_hw = (array.shape[0], array.shape[1])
    if source_hw == target_hw:
        return array.copy()
    if interpolation is None:
        interpolation = _interpolation_for(source_hw, target_hw)
    # cv2 rejects some strided views (e.g. flipped arrays) and takes (width, height).
    return cv2.resize(np.ascontiguousarray(array), (target_hw[1], target_hw[0]), interpolation=interpolation)


def _centre_crop(array: np.ndarray, size: ImageSize) -> np.ndarray:
    start = size.crop_offset
    return array[start : start + size.crop, start : start + size.crop]


PAD_GREY = 124
"""Canvas value around a letterboxed image: mid-grey, close to the ImageNet mean, so the
canvas edge reads as a plain border to the backbone in normal and test images alike."""


def content_box(original_hw: tuple[int, int], size: ImageSize) -> tuple[int, int, int, int]:
    """Where the image lies on the preprocessed canvas: ``(top, left, bottom, right)``, exclusive.

    The whole crop for a squashed image; with ``size.pad`` the letterboxed
    rectangle whose longer side is ``size.resize`` and whose aspect ratio is
    the original's.
    """
    if not size.pad:
        return 0, 0, size.crop, size.crop
    height, width = int(original_hw[0]), int(original_hw[1])
    if height <= 0 or width <= 0:
        raise ValueError(f"original_hw must be positive, got {original_hw}")
    scale = size.resize / max(height, width)
    inner_h = max(1, min(size.resize, _round_half_up(height * scale)))
    inner_w = max(1, min(size.resize, _round_half_up(width * scale)))
    top, left = (size.resize - inner_h) // 2, (size.resize - inner_w) // 2
    return top, left, top + inner_h, left + inner_w


def _letterbox(array: np.ndarray, size: ImageSize, fill: int, interpolation: int | None = None) -> np.ndarray:
    """(H, W[, C]) -> (resize, resize[, C]) with the aspect ratio kept and ``fill`` around it."""
    top, left, bottom, right = content_box(array.shape[:2], size)
    canvas = np.full((size.resize, size.resize, *array.shape[2:]), fill, dtype=array.dtype)
    canvas[top:bottom, left:right] = _resize(array, (bottom - top, right - left), interpolation)
    return canvas


def preprocess(image: np.ndarray, size: ImageSize) -> np.ndarray:
    """Resize an image to ``size.resize`` squared, centre-crop it, scale to ``[0, 1]``.

    Non-square images are squashed to a square as the reference code does
    (MVTec images are square anyway), unless ``size.pad`` keeps their aspect
    ratio on a grey canvas (:func:`content_box`).
    ``INTER_AREA`` is used when shrinking, ``INTER_LINEAR`` when enlarging.

    Args:
        image: ``(H, W, 3)`` ``uint8`` RGB.
        size: the resize/crop geometry.

    Returns:
        ``(3, size.crop, size.crop)`` ``float32`` in ``[0, 1]``, C-contiguous.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"preprocess expects an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    if size.pad:
        cropped = _letterbox(image, size, PAD_GREY)
    else:
        cropped = _centre_crop(_resize(image, (size.resize, size.resize)), size)
    channels_first = np.ascontiguousarray(cropped.transpose(2, 0, 1))
    return channels_first.astype(np.float32) / np.float32(255.0)


def preprocess_mask(mask: np.ndarray, size: ImageSize) -> np.ndarray:
    """Apply :func:`preprocess`'s geometry to a mask with nearest-neighbour sampling.

    Args:
        mask: ``(H, W)`` ``bool``.
        size: the resize/crop geometry.

    Returns:
        ``(size.crop, size.crop)`` ``bool``; stays strictly binary.
    """
    if mask.ndim != 2:
        raise ValueError(f"preprocess_mask expects an (H, W) mask, got shape {mask.shape}")
    as_bytes = np.asarray(mask, dtype=bool).astype(np.uint8)
    # NEAREST_EXACT samples at pixel centres like Pillow; plain INTER_NEAREST
    # is shifted by half a pixel.
    if size.pad:
        return _letterbox(as_bytes, size, 0, cv2.INTER_NEAREST_EXACT).astype(bool)
    resized = _resize(as_bytes, (size.resize, size.resize), cv2.INTER_NEAREST_EXACT)
    return _centre_crop(resized, size).astype(bool)


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def crop_box(original_hw: tuple[int, int], size: ImageSize) -> tuple[int, int, int, int]:
    """The region of the original image that the preprocessed crop shows.

    Args:
        original_hw: ``(H, W)`` of the image before preprocessing.
        size: the resize/crop geometry used.

    Returns:
        ``(top, left, bottom, right)`` in original pixel coordinates, bottom
        and right exclusive, each edge rounded to the nearest pixel boundary.
        The box always covers at least one pixel. With ``crop == resize`` it
        is the whole image.
    """
    height, width = int(original_hw[0]), int(original_hw[1])
    if height <= 0 or width <= 0:
        raise ValueError(f"original_hw must be positive, got {original_hw}")
    if size.pad:  # a letterboxed canvas shows the whole image
        return 0, 0, height, width
    start, end = size.crop_offset, size.crop_offset + size.crop

    def edges(length: int) -> tuple[int, int]:
        scale = length / size.resize
        low = min(_round_half_up(start * scale), length - 1)
        high = max(_round_half_up(end * scale), low + 1)
        return low, min(high, length)

    top, bottom = edges(height)
    left, right = edges(width)
    return top, left, bottom, right


def map_to_original(
    heatmap: np.ndarray, original_hw: tuple[int, int], size: ImageSize
) -> np.ndarray:
    """Resample a map computed on the crop back onto the original image.

    Args:
        heatmap: ``(h, w)`` float map covering the crop, usually
            ``(size.crop, size.crop)``; coarser maps (e.g. at feature
            resolution) are interpolated the same way.
        original_hw: ``(H, W)`` of the original image.
        size: the resize/crop geometry the map was computed with.

    Returns:
        ``(H, W)`` ``float32``: the map, bilinearly resampled, inside
        :func:`crop_box`; NaN outside it (the part the model never saw).
    """
    if heatmap.ndim != 2 or heatmap.shape[0] == 0 or heatmap.shape[1] == 0:
        raise ValueError(f"map_to_original expects a non-empty 2-D map, got shape {heatmap.shape}")
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if size.pad:
        # The map covers the canvas: cut out the image's rectangle (scaled to the map's
        # resolution), then resample that onto the original pixels.
        top, left, bottom, right = content_box(original_hw, size)
        scale_y, scale_x = heatmap.shape[0] / size.crop, heatmap.shape[1] / size.crop
        rows = slice(int(math.floor(top * scale_y)), max(int(math.ceil(bottom * scale_y)), int(math.floor(top * scale_y)) + 1))
        cols = slice(int(math.floor(left * scale_x)), max(int(math.ceil(right * scale_x)), int(math.floor(left * scale_x)) + 1))
        return _resize(np.ascontiguousarray(heatmap[rows, cols]), (int(original_hw[0]), int(original_hw[1])))
    top, left, bottom, right = crop_box(original_hw, size)
    result = np.full((int(original_hw[0]), int(original_hw[1])), np.nan, dtype=np.float32)
    inside = _resize(heatmap, (bottom - top, right - left))
    result[top:bottom, left:right] = inside
    return result


def to_display(image: np.ndarray, max_side: int = 512) -> np.ndarray:
    """A copy of an image no larger than ``max_side`` on its longer side, for thumbnails.

    Args:
        image: ``(H, W, 3)`` or ``(H, W)`` ``uint8``.
        max_side: longest side of the result; smaller images are not enlarged.

    Returns:
        ``uint8`` array of the same number of dimensions, aspect ratio kept.
    """
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"to_display expects a uint8 (H, W[, 3]) image, got {image.shape} {image.dtype}")
    if max_side <= 0:
        raise ValueError(f"max_side must be positive, not {max_side}")
    height, width = image.shape[:2]
    longest = max(height, width)
    if longest <= max_side:
        return image.copy()
    scale = max_side / longest
    target = (max(1, round(height * scale)), max(1, round(width * scale)))
    return cv2.resize(image, (target[1], target[0]), interpolation=cv2.INTER_AREA)


def as_model_sees(image: np.ndarray, size: ImageSize, side: int) -> np.ndarray:
    """The part of an ``(H, W, 3)`` uint8 image a model of geometry ``size`` sees (resize and crop, or the
    letterbox), as uint8 ``(side, side, 3)``: the picture a heatmap of that model lies on."""
    crop = (preprocess(image, size).transpose(1, 2, 0) * 255.0).round().astype(np.uint8)
    return cv2.resize(crop, (side, side), interpolation=cv2.INTER_LINEAR)


def mask_as_model_sees(mask: np.ndarray, size: ImageSize, side: int) -> np.ndarray:
    """An ``(H, W)`` bool defect mask cut like :func:`as_model_sees`, as bool ``(side, side)``."""
    crop = preprocess_mask(mask, size).astype(np.uint8)
    return cv2.resize(crop, (side, side), interpolation=cv2.INTER_NEAREST).astype(bool)
