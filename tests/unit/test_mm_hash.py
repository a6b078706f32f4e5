"""mm_hash: equal pixels hash equal across formats; anything that changes pixels or model differs."""

import io

import numpy as np
import pytest
from PIL import Image, features

from vlm_engine.errors import InvalidImageError
from vlm_engine.frontend import mm_hash as mm_hash_module
from vlm_engine.frontend.image_processor import ImageProcessorConfig
from vlm_engine.frontend.mm_hash import ImageHasher, image_mm_hash, processor_key

MODEL_ID = "google/gemma-3-4b-it"
CONFIG = ImageProcessorConfig(size=(896, 896))
LOSSLESS_FORMATS = [
    ("PNG", {}),
    ("BMP", {}),
    ("TIFF", {}),
    pytest.param(
        "WEBP",
        {"lossless": True},
        marks=pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP"),
    ),
]


def random_image(seed: int = 0, size: tuple[int, int] = (37, 23), mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = len(Image.new(mode, (1, 1)).getbands())
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def hasher(**kwargs) -> ImageHasher:
    return ImageHasher(kwargs.pop("config", CONFIG), kwargs.pop("model_id", MODEL_ID), **kwargs)


def pil_hash(image: Image.Image, config=CONFIG, model_id=MODEL_ID) -> str:
    return hasher(config=config, model_id=model_id).identify(image)[0]


@pytest.mark.parametrize(("fmt", "options"), LOSSLESS_FORMATS)
def test_equal_pixels_hash_equal_across_formats_bytes_and_paths(tmp_path, fmt, options):
    image = random_image()
    data = encode(image, fmt, **options)
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(data)

    from_bytes, decoded = hasher().identify(data)
    from_path, _ = hasher().identify(path)
    from_str_path, _ = hasher().identify(str(path))

    assert from_bytes == from_path == from_str_path == pil_hash(image)
    assert decoded is not None and decoded.tobytes() == image.tobytes()


def test_pil_input_is_hashed_as_given_and_returned_without_decoding():
    image = random_image()
    h = hasher()
    mm_hash, returned = h.identify(image)
    assert returned is image
    assert h.num_decoded == 0
    assert mm_hash == image_mm_hash(image, processor_key(CONFIG, MODEL_ID))


def test_one_changed_pixel_hashes_different():
    image = random_image()
    changed = image.copy()
    r, g, b = changed.getpixel((5, 7))
    changed.putpixel((5, 7), (r ^ 1, g, b))
    assert pil_hash(changed) != pil_hash(image)
    assert (
        hasher().identify(encode(changed, "PNG"))[0] != hasher().identify(encode(image, "PNG"))[0]
    )


def test_mode_is_part_of_the_hash():
    rgb = random_image()
    ycbcr = Image.frombytes("YCbCr", rgb.size, rgb.tobytes())  # same size, same bytes
    as_gray = Image.frombytes("L", (rgb.width * 3, rgb.height), rgb.tobytes())
    assert ycbcr.tobytes() == rgb.tobytes() == as_gray.tobytes()
    assert len({pil_hash(rgb), pil_hash(ycbcr), pil_hash(as_gray)}) == 3


def test_size_is_part_of_the_hash():
    gray = random_image(size=(4, 6), mode="L")
    reshaped = Image.frombytes("L", (6, 4), gray.tobytes())
    flat = Image.frombytes("L", (24, 1), gray.tobytes())
    assert len({pil_hash(gray), pil_hash(reshaped), pil_hash(flat)}) == 3
    # 1-bit rows are padded to whole bytes: widths 7 and 8 share bytes and height.
    narrow, wide = (Image.frombytes("1", (width, 2), b"\xaa\x54") for width in (7, 8))
    assert narrow.tobytes() == wide.tobytes()
    assert pil_hash(narrow) != pil_hash(wide)


def palette_image(palette: list[int], transparency: int | None = None) -> Image.Image:
    indices = random_image(size=(8, 8), mode="L").point(lambda v: v % 4)
    image = Image.frombytes("P", (8, 8), indices.tobytes())
    image.putpalette(palette)
    if transparency is not None:
        image.info["transparency"] = transparency
    return image


def test_palette_and_transparency_are_part_of_the_hash():
    palette = [0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255]
    other = [0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 254]  # one color channel differs
    base = palette_image(palette)
    assert palette_image(other).tobytes() == base.tobytes()
    hashes = {
        pil_hash(base),
        pil_hash(palette_image(other)),
        pil_hash(palette_image(palette, transparency=0)),
        pil_hash(palette_image(palette, transparency=1)),
    }
    assert len(hashes) == 4
    assert pil_hash(palette_image(palette)) == pil_hash(base)  # deterministic


@pytest.mark.parametrize(
    ("config", "model_id"),
    [
        (CONFIG.with_overrides(do_pan_and_scan=True), MODEL_ID),
        (CONFIG.with_overrides(size=(448, 448)), MODEL_ID),
        (CONFIG.with_overrides(image_mean=(0.4, 0.5, 0.5)), MODEL_ID),
        (CONFIG, "google/gemma-3-12b-it"),
    ],
)
def test_processor_settings_and_model_id_are_part_of_the_hash(config, model_id):
    image = random_image()
    assert pil_hash(image, config, model_id) != pil_hash(image)
    assert (
        hasher(config=config, model_id=model_id).identify(encode(image, "PNG"))[0]
        != (hasher().identify(encode(image, "PNG"))[0])
    )


def test_preprocessing_revision_is_part_of_the_hash(monkeypatch):
    """An engine release that preprocesses differently hashes every image differently, so
    caches that outlive an upgrade (disk, Redis) never serve the old pixels' embeddings."""
    image = random_image()
    current = pil_hash(image)
    revision = mm_hash_module.PREPROCESSING_REVISION
    monkeypatch.setattr(mm_hash_module, "PREPROCESSING_REVISION", revision - 1)
    assert pil_hash(image) != current
    monkeypatch.undo()
    assert pil_hash(image) == current


def test_exif_orientation_is_applied_before_hashing():
    image = random_image(size=(40, 24))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    data = encode(image, "JPEG", exif=exif.tobytes(), quality=95)
    stored = Image.open(io.BytesIO(data))
    stored.load()
    upright = stored.transpose(Image.Transpose.ROTATE_270)

    mm_hash, decoded = hasher().identify(data)

    assert decoded.size == upright.size == (24, 40)
    assert mm_hash == pil_hash(upright)
    assert mm_hash != pil_hash(stored)


def test_image_uuid_skips_decoding():
    h = hasher()
    first, image = h.identify(b"not an image", image_uuid="user-image-1")
    again, _ = h.identify(random_image(), image_uuid="user-image-1")
    other, _ = h.identify(b"not an image", image_uuid="user-image-2")
    assert image is None
    assert h.stats()["decoded"] == 0 and h.stats()["memo_misses"] == 0
    assert first == again != other


def test_image_uuid_differs_from_pixel_hashes_and_depends_on_model():
    image = random_image()
    pixels_hash = pil_hash(image)
    assert hasher().identify(image, image_uuid=pixels_hash)[0] != pixels_hash
    assert (
        hasher().identify(image, image_uuid="a")[0]
        != hasher(model_id="other").identify(image, image_uuid="a")[0]
    )
    with pytest.raises(InvalidImageError, match="image_uuid"):
        hasher().identify(image, image_uuid="")


def test_memo_hit_decodes_nothing_and_returns_the_same_hash(tmp_path):
    image = random_image()
    png = encode(image, "PNG")
    (tmp_path / "a.png").write_bytes(png)
    h = hasher()

    first, decoded = h.identify(png)
    second, not_decoded = h.identify(tmp_path / "a.png")  # same bytes through a path

    assert decoded is not None and not_decoded is None
    assert first == second
    assert h.stats() == {"memo_hits": 1, "memo_misses": 1, "memo_entries": 1, "decoded": 1}


def test_different_file_with_equal_pixels_decodes_and_hashes_equal():
    image = random_image()
    h = hasher()
    from_png, _ = h.identify(encode(image, "PNG"))
    from_bmp, decoded = h.identify(encode(image, "BMP"))
    assert decoded is not None
    assert h.num_decoded == 2
    assert from_png == from_bmp


def test_memo_is_a_bounded_lru():
    a, b, c = (encode(random_image(seed), "PNG") for seed in range(3))
    h = hasher(memo_entries=2)
    for data in (a, b, a, c):  # the hit on `a` makes `b` the least recently used
        h.identify(data)
    assert h.stats()["memo_entries"] == 2
    assert h.num_decoded == 3

    h.identify(a)
    assert h.num_decoded == 3  # still remembered
    h.identify(b)
    assert h.num_decoded == 4  # was evicted


def test_memo_can_be_disabled():
    data = encode(random_image(), "PNG")
    h = hasher(memo_entries=0)
    assert h.identify(data)[0] == h.identify(data)[0]
    assert h.num_decoded == 2 and h.stats()["memo_entries"] == 0


def test_bad_images_raise_and_are_not_remembered(tmp_path):
    h = hasher()
    truncated = encode(random_image(), "PNG")[:-40]
    (tmp_path / "broken.png").write_bytes(truncated)
    for source in (b"not an image", truncated, b"not an image"):
        with pytest.raises(InvalidImageError):
            h.identify(source)
    with pytest.raises(InvalidImageError, match="broken.png"):
        h.identify(tmp_path / "broken.png")
    with pytest.raises(InvalidImageError, match="not found"):
        h.identify(tmp_path / "missing.png")
    with pytest.raises(InvalidImageError, match="unsupported image input type"):
        h.identify(12345)
    assert h.num_decoded == 0 and h.num_memo_hits == 0 and h.stats()["memo_entries"] == 0


def test_max_pixels_is_enforced_for_every_source():
    image = random_image(size=(20, 10))
    h = hasher(max_pixels=199)
    for source in (image, encode(image, "PNG")):
        with pytest.raises(InvalidImageError, match="max_pixels"):
            h.identify(source)
    assert hasher(max_pixels=200).identify(image)[0] == pil_hash(image)


def test_constructor_validates_its_limits():
    with pytest.raises(ValueError, match="memo_entries"):
        hasher(memo_entries=-1)
    with pytest.raises(ValueError, match="max_pixels"):
        hasher(max_pixels=0)
