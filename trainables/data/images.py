"""Decoding and scanning image files.

This module owns turning bytes on disk into HxWx3 uint8 RGB arrays: which PIL
modes are accepted and how each becomes RGB (transparency composited onto white,
palettes, CMYK, 16-bit and float grayscale), EXIF orientation, the
decompression-bomb guard, and the scan
that hashes and fully decodes a list of files to sort good images from bad ones
with a human-readable reason. It does not know about classes, splits or
datasets (see ``trainables.data.datasets``) and never sets PIL globals such as
``ImageFile.LOAD_TRUNCATED_IMAGES``: a truncated file is an error, not a
silently grey-padded image.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# PIL's own default for Image.MAX_IMAGE_PIXELS: 1024 * 1024 * 1024 // 4 // 3.
DEFAULT_MAX_PIXELS = 89_478_485

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview]

# How transparency becomes RGB, as a checkpoint's preprocessing and an export's
# preprocessing.json record it: PIL's convert("RGBA"), then every channel
# c -> round((c * a + 255 * (255 - a)) / 255). Training, evaluation, export
# verification, int8 calibration and the retrain gate all decode through
# decode_rgb, so they all apply it; a server must too.
ALPHA_RULE = "composite_on_white"

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
# Errors PIL raises from a header it accepted but pixel data it cannot decode:
# truncation surfaces as OSError, broken chunks as SyntaxError, bad zlib
# streams as zlib.error, short reads as EOFError/struct.error.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError)


class ImageDecodeError(ValueError):
    """Base class for an image that was read but cannot be used."""


class NotAnImageError(ImageDecodeError):
    """PIL does not recognise the bytes as any image format."""


class CorruptImageError(ImageDecodeError):
    """The header was recognised but the pixel data is truncated or corrupt."""


class OversizedImageError(ImageDecodeError):
    """The image has more pixels than allowed (decompression-bomb guard).

    Attributes:
        width: Width from the header, or 0 when PIL's own guard refused the
            file before the size was available.
        height: Height from the header, or 0 as for ``width``.
        num_pixels: ``width * height`` (or the count PIL reported).
        max_pixels: The limit that was exceeded (PIL's when it fired first).
    """

    def __init__(self, width: int, height: int, num_pixels: int, max_pixels: int, name: str):
        self.width, self.height = width, height
        self.num_pixels, self.max_pixels = num_pixels, max_pixels
        dims = f"{width}x{height} = " if width and height else ""
        fix = "Downscale the image or raise max_pixels if it is trusted"
        if not dims:
            fix += " (PIL.Image.MAX_IMAGE_PIXELS also caps decoding at twice its value)"
        super().__init__(
            f"{name}: oversized: {dims}{num_pixels} pixels exceeds max_pixels {max_pixels} "
            f"(decompression-bomb guard). {fix}."
        )


@dataclass(frozen=True)
class BadImage:
    """A file that cannot be used as a training image, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class ScannedImage:
    """A file that decoded fully; ``width``/``height`` are after EXIF orientation."""

    path: str
    sha1: str
    width: int
    height: int


def load_rgb(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image file or in-memory bytes to an HxWx3 uint8 RGB array.

    Args:
        source: A filesystem path or the encoded bytes of an image.
        max_pixels: Largest ``width * height`` accepted; checked from the
            header before any pixel is decoded.

    Returns:
        A C-contiguous ``(height, width, 3)`` uint8 array, EXIF orientation
        applied.

    Raises:
        OSError: The path cannot be read.
        NotAnImageError: PIL cannot identify the format.
        OversizedImageError: The image exceeds ``max_pixels``.
        CorruptImageError: The pixel data is truncated or corrupt.
        ValueError: ``max_pixels`` is not a positive integer.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_rgb(bytes(source), max_pixels=max_pixels)
    with open(source, "rb") as handle:
        data = handle.read()
    return decode_rgb(data, max_pixels=max_pixels, name=os.fspath(source))


def decode_rgb(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "<bytes>"
) -> np.ndarray:
    """Decode encoded image bytes; see :func:`load_rgb` for the contract.

    Args:
        data: The encoded file content.
        max_pixels: Largest ``width * height`` accepted.
        name: How to refer to the image in error messages (usually its path).

    Returns:
        A ``(height, width, 3)`` uint8 array.

    Raises:
        NotAnImageError, OversizedImageError, CorruptImageError: As in
            :func:`load_rgb`.
    """
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}.")
    image = _open_checked(data, max_pixels, name)
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except _DECODE_ERRORS as err:
        raise CorruptImageError(f"{name}: truncated or corrupt: {err}") from err


def _open_checked(data: bytes, max_pixels: int, name: str) -> Image.Image:
    """Open lazily (header only) and enforce the pixel limit before decoding."""
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as err:
        raise NotAnImageError(f"{name}: not an image (PIL cannot identify it)") from err
    except Image.DecompressionBombError as err:
        # PIL's global guard (2x its MAX_IMAGE_PIXELS) fired inside open(), so
        # only the pixel count from its message is available, not the size.
        match = re.search(r"\((\d+) pixels\)", str(err))
        num_pixels = int(match.group(1)) if match else 0
        # Report whichever limit was really hit: ours, or PIL's when ours is higher.
        pil_limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        limit = max_pixels if num_pixels > max_pixels else pil_limit
        raise OversizedImageError(0, 0, num_pixels, limit, name) from err
    except _DECODE_ERRORS as err:
        raise CorruptImageError(f"{name}: truncated or corrupt: {err}") from err
    width, height = image.size
    if width * height > max_pixels:
        raise OversizedImageError(width, height, width * height, max_pixels, name)
    return image


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Convert a loaded PIL image of any supported mode to HxWx3 uint8."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        gray = _sixteen_to_eight(np.asarray(image))
    elif mode == "I":
        gray = _int32_to_eight(np.asarray(image))
    elif mode == "F":
        gray = _min_max_to_eight(np.asarray(image, dtype=np.float64))
    elif mode in _ALPHA_MODES or "transparency" in image.info:
        # "transparency" also marks a transparent colour in an L or RGB PNG (tRNS),
        # which convert("RGBA") turns into alpha 0 as it does a palette's.
        return _composite_on_white(np.asarray(image.convert("RGBA")))
    elif mode == "RGB":
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
    else:
        # "1", "L", "P" without transparency, "CMYK", "YCbCr", "LAB", "HSV".
        return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
    return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))


def _sixteen_to_eight(values: np.ndarray) -> np.ndarray:
    # 65535 / 257 = 255 exactly, so the full 16-bit range maps onto 0..255;
    # PIL's own convert("L") clips at 255 instead and saturates most images.
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _int32_to_eight(values: np.ndarray) -> np.ndarray:
    # Mode "I" is how PIL holds 16-bit PNGs from some encoders as well as true
    # 32-bit TIFFs: values that fit 0..65535 are treated as 16-bit, anything
    # else has no fixed range and is min-max scaled like float images.
    if values.size and values.min() >= 0 and values.max() <= 65535:
        return _sixteen_to_eight(values)
    return _min_max_to_eight(values.astype(np.float64))


def _min_max_to_eight(values: np.ndarray) -> np.ndarray:
    """Scale to 0..255 by the image's own range; a constant image becomes 0."""
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, dtype=np.uint8)
    low, high = values[finite].min(), values[finite].max()
    span = high - low
    scaled = (values - low) / span * 255.0 if span > 0 else np.zeros_like(values)
    scaled = np.where(finite, scaled, 0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    # ALPHA_RULE. White, not black: transparent regions of product shots, logos and
    # scanned documents are meant as paper; dropping alpha would expose
    # whatever colour the encoder left under it (often black, often noise) and
    # teach the model a background that does not exist when the image is displayed.
    rgb = rgba[:, :, :3].astype(np.uint32)
    alpha = rgba[:, :, 3:4].astype(np.uint32)
    # (x + 127) // 255 is round(x / 255) exactly: 255 is odd, so x / 255 never ends in .5.
    blended = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return np.ascontiguousarray(blended.astype(np.uint8))


def scan_images(
    paths: Sequence[str],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    num_threads: int | None = None,
    read: Callable[[str], bytes] | None = None,
) -> tuple[list[ScannedImage], list[BadImage]]:
    """Hash and fully decode every file, sorting usable images from bad ones.

    Each file is read once; the same bytes are hashed and decoded. Decoding
    runs on a thread pool because PIL releases the GIL while decoding.

    Args:
        paths: Files to check.
        max_pixels: Largest ``width * height`` accepted.
        num_threads: Worker threads; ``None`` uses the executor's default.
        read: How a path's bytes are read (``trainables.data.roots.DataRoot.read_bytes`` for
            an object store); ``None`` opens local files.

    Returns:
        ``(good, bad)``, each in the order of ``paths``. A bad file's reason
        starts with one of ``empty file``, ``not an image``, ``truncated or
        corrupt``, ``oversized`` or ``unreadable``.

    Raises:
        ValueError: ``max_pixels`` or ``num_threads`` is not a positive integer.
            A bad file never raises.
    """
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}.")
    if num_threads is not None and (not isinstance(num_threads, int) or num_threads <= 0):
        raise ValueError(f"num_threads must be a positive integer or None, got {num_threads!r}.")
    good: list[ScannedImage] = []
    bad: list[BadImage] = []
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        for result in pool.map(lambda path: _scan_one(path, max_pixels, read or _read_file), paths):
            (good if isinstance(result, ScannedImage) else bad).append(result)
    return good, bad


def _read_file(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def _scan_one(path: str, max_pixels: int, read: Callable[[str], bytes]) -> ScannedImage | BadImage:
    try:
        data = read(path)
    except OSError as err:
        return BadImage(path, f"unreadable: {err}")
    if not data:
        return BadImage(path, "empty file (0 bytes)")
    sha1 = hashlib.sha1(data).hexdigest()
    try:
        rgb = decode_rgb(data, max_pixels=max_pixels, name=path)
    except NotAnImageError:
        return BadImage(path, "not an image (PIL cannot identify it)")
    except OversizedImageError as err:
        dims = f"{err.width}x{err.height} = " if err.width and err.height else ""
        return BadImage(
            path,
            f"oversized: {dims}{err.num_pixels} pixels exceeds max_pixels {err.max_pixels} "
            "(decompression-bomb guard)",
        )
    except CorruptImageError as err:
        return BadImage(path, f"truncated or corrupt: {err.__cause__}")
    except Exception as err:  # noqa: BLE001 - a plugin bug in one file must not abort the scan
        return BadImage(path, f"truncated or corrupt: {type(err).__name__}: {err}")
    height, width = rgb.shape[:2]
    return ScannedImage(path=path, sha1=sha1, width=width, height=height)
