"""Decoding every supported PIL mode to RGB, EXIF orientation, and the bad-file scan."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from trainables.data.images import (
    CorruptImageError,
    NotAnImageError,
    OversizedImageError,
    ScannedImage,
    load_rgb,
    scan_images,
)


def _png_bytes(image: Image.Image, fmt: str = "PNG", **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def _check_rgb(array: np.ndarray, height: int, width: int) -> None:
    assert array.dtype == np.uint8
    assert array.shape == (height, width, 3)
    assert array.flags["C_CONTIGUOUS"]


def test_rgb_roundtrips_exactly(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    path = tmp_path / "rgb.png"
    Image.fromarray(pixels, "RGB").save(path)
    out = load_rgb(path)
    _check_rgb(out, 5, 7)
    np.testing.assert_array_equal(out, pixels)


def test_grayscale_l_is_replicated_to_three_channels():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = load_rgb(_png_bytes(Image.fromarray(gray, "L")))
    _check_rgb(out, 3, 4)
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], gray)


def test_la_transparent_pixel_becomes_white():
    image = Image.new("LA", (2, 1))
    image.putpixel((0, 0), (0, 0))  # black, fully transparent
    image.putpixel((1, 0), (10, 255))  # dark grey, opaque
    out = load_rgb(_png_bytes(image))
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 1], [10, 10, 10])


def test_rgba_composites_onto_white():
    image = Image.new("RGBA", (3, 1))
    image.putpixel((0, 0), (0, 0, 0, 0))  # transparent black -> white, not black
    image.putpixel((1, 0), (200, 10, 30, 255))  # opaque -> unchanged
    image.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black -> mid grey
    out = load_rgb(_png_bytes(image))
    _check_rgb(out, 1, 3)
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 1], [200, 10, 30])
    # 255 * (255 - 128) / 255 = 127
    np.testing.assert_array_equal(out[0, 2], [127, 127, 127])


def test_palette_without_transparency():
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    out = load_rgb(_png_bytes(image))
    np.testing.assert_array_equal(out[0], [[255, 0, 0], [0, 0, 255]])


def test_palette_with_transparency_index_becomes_white():
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 0, 128, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    data = _png_bytes(image, transparency=0)
    assert "transparency" in Image.open(io.BytesIO(data)).info
    out = load_rgb(data)
    np.testing.assert_array_equal(out[0], [[255, 255, 255], [0, 128, 0]])


@pytest.mark.parametrize("mode, key, other", [("L", 7, 9), ("RGB", (1, 2, 3), (9, 8, 7))])
def test_a_transparent_colour_becomes_white_as_pil_rgba_says(mode, key, other):
    # PNG's tRNS: one colour of an L or RGB image is transparent. convert("RGBA"), which
    # the export's README tells servers to use, gives it alpha 0; the decoder agrees.
    image = Image.new(mode, (2, 1), key)
    image.putpixel((1, 0), other)
    data = _png_bytes(image, transparency=key)
    assert Image.open(io.BytesIO(data)).info["transparency"] == key
    out = load_rgb(data)
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 1], [other] * 3 if mode == "L" else other)


def test_cmyk_jpeg_decodes_to_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 0, 0, 0))  # no ink = white paper
    out = load_rgb(_png_bytes(cmyk, "JPEG", quality=100))
    _check_rgb(out, 8, 8)
    assert out.min() >= 250


def test_cmyk_tiff_cyan_is_exact():
    cmyk = Image.new("CMYK", (2, 2), (255, 0, 0, 0))
    out = load_rgb(_png_bytes(cmyk, "TIFF"))
    np.testing.assert_array_equal(out[0, 0], [0, 255, 255])


def test_bilevel_mode_1():
    image = Image.new("1", (3, 2), 0)
    image.putpixel((1, 1), 1)
    out = load_rgb(_png_bytes(image))
    _check_rgb(out, 2, 3)
    np.testing.assert_array_equal(out[1, 1], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 0], [0, 0, 0])


# (mode written, format, mode PIL opens it as): Pillow has no writer that keeps
# "I;16L" on reopening, so that case checks the little-endian bytes end to end.
@pytest.mark.parametrize(
    ("mode", "fmt", "opened_mode"),
    [("I;16", "PNG", "I;16"), ("I;16B", "TIFF", "I;16B"), ("I;16L", "TIFF", "I;16")],
)
def test_sixteen_bit_grayscale_scales_by_257_not_clipped(mode, fmt, opened_mode):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    byte_order = ">u2" if mode == "I;16B" else "<u2"
    data = _png_bytes(Image.frombytes(mode, (4, 1), values.astype(byte_order).tobytes()), fmt)
    assert Image.open(io.BytesIO(data)).mode == opened_mode
    out = load_rgb(data)
    _check_rgb(out, 1, 4)
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
    np.testing.assert_array_equal(out[:, :, 0], out[:, :, 2])


def test_sixteen_bit_png_file_on_disk(tmp_path):
    # A typical microscopy/X-ray export: values well above 255 everywhere. PIL's
    # own convert("L") would clip all of them to 255.
    values = np.full((4, 4), 30000, dtype=np.uint16)
    path = tmp_path / "sixteen.png"
    Image.fromarray(values).save(path)
    out = load_rgb(path)
    np.testing.assert_array_equal(out, np.full((4, 4, 3), round(30000 / 257), dtype=np.uint8))


def test_int32_mode_i_in_16_bit_range_and_beyond():
    in_range = Image.fromarray(np.array([[0, 65535]], dtype=np.int32), "I")
    np.testing.assert_array_equal(load_rgb(_png_bytes(in_range, "TIFF"))[0, :, 0], [0, 255])
    wide = Image.fromarray(np.array([[-100, 0, 100]], dtype=np.int32), "I")
    np.testing.assert_array_equal(load_rgb(_png_bytes(wide, "TIFF"))[0, :, 0], [0, 128, 255])


def test_float_mode_f_is_min_max_scaled():
    values = np.array([[-1.0, 0.0, 3.0]], dtype=np.float32)
    out = load_rgb(_png_bytes(Image.fromarray(values, "F"), "TIFF"))
    _check_rgb(out, 1, 3)
    # (0 - -1) / 4 * 255 = 63.75 -> 64
    np.testing.assert_array_equal(out[0, :, 1], [0, 64, 255])


def test_exif_orientation_6_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes())
    with Image.open(path) as stored:
        assert stored.size == (40, 20) and stored.getexif()[0x0112] == 6
    out = load_rgb(path)
    _check_rgb(out, 40, 20)


def test_max_pixels_guard_raises_before_decoding():
    data = _png_bytes(Image.new("RGB", (20, 10)))
    with pytest.raises(OversizedImageError, match=r"20x10 = 200 pixels exceeds max_pixels 199") as info:
        load_rgb(data, max_pixels=199)
    assert (info.value.width, info.value.height) == (20, 10)
    assert load_rgb(data, max_pixels=200).shape == (10, 20, 3)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming ``width x height`` with no pixel data: what a decompression bomb looks like."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def test_pil_guard_above_max_pixels_is_reported_as_oversized(tmp_path):
    # 20,000 x 10,000 = 2e8 pixels, above PIL's own hard limit of 2 * 89,478,485.
    bomb = _png_header_only(20_000, 10_000)
    with pytest.raises(OversizedImageError, match="200000000 pixels exceeds max_pixels 178956970"):
        load_rgb(bomb, max_pixels=10**9)
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    _, bad = scan_images([str(path)])
    assert bad[0].reason.startswith("oversized: 200000000 pixels exceeds max_pixels 89478485")
    # Below PIL's limit our own guard names the size.
    path.write_bytes(_png_header_only(300, 200))
    _, bad = scan_images([str(path)], max_pixels=10)
    assert bad[0].reason.startswith("oversized: 300x200 = 60000 pixels exceeds max_pixels 10")


def test_load_rgb_error_types(tmp_path):
    with pytest.raises(NotAnImageError):
        load_rgb(b"hello, world")
    truncated = _png_bytes(Image.new("RGB", (64, 64), (9, 9, 9)), "JPEG")[:200]
    with pytest.raises(CorruptImageError, match="truncated or corrupt"):
        load_rgb(truncated)
    with pytest.raises(FileNotFoundError):
        load_rgb(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="max_pixels must be a positive integer"):
        load_rgb(truncated, max_pixels=0)


def _noise_image(size=(64, 64), seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def test_scan_classifies_every_kind_of_bad_file(tmp_path):
    good = tmp_path / "good.png"
    _noise_image((20, 20)).save(good)  # 400 pixels, under the 599 limit below
    big = tmp_path / "big.png"
    Image.new("RGB", (30, 20)).save(big)
    truncated_png = tmp_path / "truncated.png"
    truncated_png.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    truncated_jpeg = tmp_path / "truncated.jpg"
    truncated_jpeg.write_bytes(_png_bytes(_noise_image(seed=1), "JPEG")[:600])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    missing = tmp_path / "missing.png"
    directory = tmp_path / "folder.png"
    directory.mkdir()

    paths = [str(p) for p in (good, big, truncated_png, truncated_jpeg, empty, text, missing, directory)]
    scanned, bad = scan_images(paths, max_pixels=599, num_threads=3)

    assert scanned == [ScannedImage(str(good), hashlib.sha1(good.read_bytes()).hexdigest(), 20, 20)]
    reasons = {b.path: b.reason for b in bad}
    assert [b.path for b in bad] == paths[1:]  # input order kept
    assert reasons[str(big)] == (
        "oversized: 30x20 = 600 pixels exceeds max_pixels 599 (decompression-bomb guard)"
    )
    assert reasons[str(truncated_png)].startswith("truncated or corrupt: ")
    assert reasons[str(truncated_jpeg)].startswith("truncated or corrupt: ")
    assert reasons[str(empty)] == "empty file (0 bytes)"
    assert reasons[str(text)] == "not an image (PIL cannot identify it)"
    assert reasons[str(missing)].startswith("unreadable: ")
    assert reasons[str(directory)].startswith("unreadable: ")


def test_scan_reports_size_after_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.new("RGB", (40, 20)).save(path, exif=exif.tobytes())
    scanned, bad = scan_images([str(path)])
    assert bad == []
    assert (scanned[0].width, scanned[0].height) == (20, 40)


def test_scan_keeps_input_order_over_many_threads(tmp_path):
    paths = []
    for index in range(24):
        path = tmp_path / f"{index:02d}.png"
        Image.new("L", (index + 1, 3)).save(path)
        paths.append(str(path))
    scanned, bad = scan_images(list(reversed(paths)), num_threads=8)
    assert bad == []
    assert [s.path for s in scanned] == list(reversed(paths))
    assert [s.width for s in scanned] == list(range(24, 0, -1))


def test_scan_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_threads must be a positive integer"):
        scan_images([], num_threads=0)
    with pytest.raises(ValueError, match="max_pixels must be a positive integer"):
        scan_images([], max_pixels=-5)
