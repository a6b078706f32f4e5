"""Loading user images: formats, paths, EXIF orientation, and a typed error per problem."""

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from vlm_engine.errors import InvalidImageError
from vlm_engine.frontend.image_io import load_image
from vlm_engine.testing.samples import random_image


def encode(image: Image.Image, fmt: str, **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_kwargs)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but which carries no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"")


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
@pytest.mark.parametrize("container", [bytes, bytearray, memoryview])
def test_lossless_formats_load_the_same_pixels(fmt, container):
    image = random_image(37, 23, 12)
    loaded = load_image(container(encode(image, fmt)))
    assert loaded.size == (37, 23)
    assert np.array_equal(np.asarray(loaded.convert("RGB")), np.asarray(image))


@pytest.mark.parametrize("as_path", [str, Path])
def test_path_input_loads_the_file(tmp_path, as_path):
    image = random_image(19, 11, 13)
    image.putalpha(random_image(19, 11, 99).convert("L"))
    path = tmp_path / "image.png"
    image.save(path)
    loaded = load_image(as_path(path))
    assert loaded.mode == "RGBA"
    assert np.array_equal(np.asarray(loaded), np.asarray(image))


def test_pil_input_is_returned_as_is():
    image = random_image(5, 4, 14)
    assert load_image(image) is image


@pytest.mark.parametrize("fmt, orientation", [("JPEG", 6), ("PNG", 8), ("JPEG", 8)])
def test_exif_orientation_is_applied(fmt, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    data = encode(random_image(40, 24, 15), fmt, exif=exif)
    opened = Image.open(io.BytesIO(data))
    assert opened.size == (40, 24) and opened.getexif()[0x0112] == orientation
    loaded = load_image(data)
    assert loaded.size == (24, 40)
    assert np.array_equal(np.asarray(loaded), np.asarray(ImageOps.exif_transpose(opened)))


def test_truncated_png_is_rejected():
    data = encode(random_image(64, 64, 16), "PNG")
    with pytest.raises(InvalidImageError, match="truncated") as info:
        load_image(data[: len(data) // 2])
    assert f"bytes ({len(data) // 2} bytes)" in str(info.value)


def test_random_bytes_are_not_an_image():
    data = np.random.default_rng(17).integers(0, 256, 1000, dtype=np.uint8).tobytes()
    with pytest.raises(InvalidImageError, match=r"not an image .*bytes \(1000 bytes\)"):
        load_image(data)


def test_missing_path_is_rejected(tmp_path):
    path = tmp_path / "missing.png"
    with pytest.raises(InvalidImageError, match="not found") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_unsupported_input_type_is_rejected():
    with pytest.raises(InvalidImageError, match="unsupported image input type int"):
        load_image(42)


def test_max_pixels_is_checked_before_decoding():
    # No pixel data follows the header: decoding first would report truncation instead.
    with pytest.raises(InvalidImageError, match=r"5000x5000 = 25000000 pixels, more than max_pix"):
        load_image(png_header_only(5000, 5000), max_pixels=1_000_000)


def test_max_pixels_boundary():
    data = encode(random_image(10, 10, 18), "PNG")
    assert load_image(data, max_pixels=100).size == (10, 10)
    with pytest.raises(InvalidImageError, match="max_pixels=99"):
        load_image(data, max_pixels=99)
    with pytest.raises(InvalidImageError, match="max_pixels=99"):
        load_image(Image.open(io.BytesIO(data)), max_pixels=99)


def test_decompression_bomb_protection_is_kept():
    with pytest.raises(InvalidImageError, match="decompression-bomb"):
        load_image(png_header_only(20000, 20000))


def test_zero_size_image_is_rejected_on_load():
    with pytest.raises(InvalidImageError, match="zero-size"):
        load_image(Image.new("RGB", (0, 3)))
