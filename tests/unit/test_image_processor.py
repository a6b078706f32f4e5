"""Gemma3 image processing and image loading, checked bit for bit against transformers."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_transforms import normalize as hf_normalize
from transformers.image_transforms import rescale as hf_rescale

# Without torchvision, `transformers.AutoImageProcessor` is a placeholder that raises ImportError;
# the class in its own module works and picks the PIL backend.
from transformers.models.auto.image_processing_auto import AutoImageProcessor
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers_reference import as_transformers_input

from vlm_engine.errors import ConfigError, InvalidImageError
from vlm_engine.frontend.image_processor import (
    Gemma3ImageProcessor,
    ImageProcessorConfig,
    ProcessedImage,
)

pytestmark = pytest.mark.transformers

# preprocessor_config.json as shipped with google/gemma-3-*-it.
GEMMA3_PREPROCESSOR_CONFIG = {
    "do_convert_rgb": None,
    "do_normalize": True,
    "do_pan_and_scan": None,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "Gemma3ImageProcessor",
    "image_seq_length": 256,
    "image_std": [0.5, 0.5, 0.5],
    "pan_and_scan_max_num_crops": None,
    "pan_and_scan_min_crop_size": None,
    "pan_and_scan_min_ratio_to_activate": None,
    "processor_class": "Gemma3Processor",
    "resample": 2,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 896, "width": 896},
}
# Gemma3Processor's image defaults, which fill the nulls above.
PROCESSOR_IMAGE_DEFAULTS = {
    "do_convert_rgb": True,
    "do_pan_and_scan": False,
    "pan_and_scan_min_crop_size": 256,
    "pan_and_scan_max_num_crops": 4,
    "pan_and_scan_min_ratio_to_activate": 1.2,
}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def options(height: int = 896, width: int | None = None, **overrides) -> dict:
    """Fully resolved image processor kwargs, valid for both implementations."""
    resolved = {k: v for k, v in GEMMA3_PREPROCESSOR_CONFIG.items() if v is not None}
    for key in ("image_processor_type", "image_seq_length", "processor_class"):
        resolved.pop(key)
    resolved.update(PROCESSOR_IMAGE_DEFAULTS)
    resolved["size"] = {"height": height, "width": width or height}
    return {**resolved, **overrides}


def hf_process(image: Image.Image, opts: dict) -> tuple[np.ndarray, int]:
    out = Gemma3ImageProcessorPil(**opts)(images=as_transformers_input(image), return_tensors="np")
    return out["pixel_values"], int(out["num_crops"][0])


def our_process(image: Image.Image, opts: dict) -> ProcessedImage:
    return Gemma3ImageProcessor(ImageProcessorConfig.from_dict(opts)).preprocess(image)


def assert_matches_hf(image: Image.Image, opts: dict) -> ProcessedImage:
    expected_pixels, expected_num_crops = hf_process(image, opts)
    processed = our_process(image, opts)
    assert processed.pixel_values.dtype == torch.float32
    assert processed.num_crops == expected_num_crops
    assert processed.pixel_values.shape == expected_pixels.shape
    assert np.array_equal(processed.pixel_values.numpy(), expected_pixels.astype(np.float32))
    return processed


def random_image(mode: str, width: int, height: int, seed: int = 0) -> Image.Image:
    """An image of ``mode`` whose pixels are seeded random data."""
    rng = np.random.default_rng(seed)
    if mode == "1":
        data = rng.integers(0, 256, ((width + 7) // 8) * height, dtype=np.uint8).tobytes()
    elif mode == "I;16":  # 16-bit grey spanning both sides of the 255 clip
        data = rng.integers(0, 512, width * height, dtype=np.uint16).astype("<u2").tobytes()
    elif mode == "I":
        data = rng.integers(-300, 600, width * height, dtype=np.int32).tobytes()
    elif mode == "F":
        data = rng.uniform(-100.0, 400.0, width * height).astype(np.float32).tobytes()
    else:
        bands = Image.getmodebands(mode)
        data = rng.integers(0, 256, width * height * bands, dtype=np.uint8).tobytes()
    image = Image.frombytes(mode, (width, height), data)
    if mode == "P":
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    return image


def png_roundtrip(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return Image.open(io.BytesIO(buffer.getvalue()))


def palette_with_transparency(kind: str) -> Image.Image:
    """A P image read back from PNG carrying a tRNS entry (one index or per-entry alpha)."""
    image = random_image("P", 45, 31, seed=3)
    if kind == "index":
        image.info["transparency"] = 7
    else:
        image.info["transparency"] = bytes(range(0, 256, 3))
    reloaded = png_roundtrip(image)
    assert reloaded.mode == "P" and "transparency" in reloaded.info
    return reloaded


# --- transformers equality: modes, sizes, targets ---------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "1", "I", "F"])
def test_every_mode_matches_transformers(mode):
    image = random_image(mode, 61, 47, seed=1)
    assert image.mode == mode
    assert_matches_hf(image, options(64))


@pytest.mark.filterwarnings("ignore:Palette images with Transparency:UserWarning")
@pytest.mark.parametrize("kind", ["index", "alpha_per_entry"])
def test_palette_with_transparency_matches_transformers(kind):
    assert_matches_hf(palette_with_transparency(kind), options(64))


def with_transparency_key(mode: str) -> Image.Image:
    """A grey or RGB image read back from PNG with a tRNS colour key that some pixels match."""
    image = random_image(mode, 40, 30, seed=12)
    key = image.getpixel((3, 4))
    image.info["transparency"] = key
    reloaded = png_roundtrip(image)
    assert reloaded.mode == mode and reloaded.info.get("transparency") == key
    return reloaded


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_transparency_key_matches_transformers(mode):
    assert_matches_hf(with_transparency_key(mode), options(48))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "L", "RGB", "P"])
def test_transparent_pixels_become_white(mode):
    """Transparency is composited onto white: a fully transparent pixel becomes (255, 255, 255)
    whatever colour it stores, an opaque one keeps its colour, a half one lands between."""
    if mode in ("L", "RGB"):
        image = with_transparency_key(mode)
        transparent, opaque = (3, 4), None
    elif mode == "P":
        image = palette_with_transparency("index")
        transparent = next(
            (x, y)
            for y in range(image.height)
            for x in range(image.width)
            if image.getpixel((x, y)) == 7
        )
        opaque = None
    else:
        image = random_image(mode, 40, 30, seed=13)
        alpha = image.getchannel("A")
        alpha.putpixel((3, 4), 0)
        alpha.putpixel((5, 6), 255)
        alpha.putpixel((7, 8), 128)
        image.putalpha(alpha)
        transparent, opaque = (3, 4), (5, 6)
    processor = Gemma3ImageProcessor(ImageProcessorConfig(do_resize=False))
    pixels, _ = processor.preprocess_uint8(image)  # [1, 3, h, w]
    rgb = pixels[0].permute(1, 2, 0)
    assert rgb[transparent[1], transparent[0]].tolist() == [255, 255, 255]
    if opaque is not None:
        stored = image.convert("RGBA").getpixel(opaque)[:3]
        assert rgb[opaque[1], opaque[0]].tolist() == list(stored)
        half = image.convert("RGBA").getpixel((7, 8))[:3]
        expected = [round((c * 128 + 255 * 127) / 255) for c in half]
        assert all(abs(a - b) <= 1 for a, b in zip(rgb[8, 7].tolist(), expected, strict=True))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_modes_at_full_resolution_match_transformers(mode):
    assert_matches_hf(random_image(mode, 640, 480, seed=2), options(896))


@pytest.mark.parametrize("target", [896, 32])
@pytest.mark.parametrize("width, height", [(1, 1), (3, 1000), (1000, 3), (997, 13), (37, 53)])
def test_odd_sizes_match_transformers(width, height, target):
    image = random_image("RGB", width, height, seed=width * 7 + height)
    processed = assert_matches_hf(image, options(target))
    assert processed.pixel_values.shape == (1, 3, target, target)


def test_non_square_target_keeps_height_and_width_apart():
    processed = assert_matches_hf(random_image("RGB", 50, 70, seed=4), options(32, 48))
    assert processed.pixel_values.shape == (1, 3, 32, 48)


@pytest.mark.parametrize("resample", [0, 1, 3, 4, 5])
def test_other_resample_filters_match_transformers(resample):
    assert_matches_hf(random_image("RGB", 77, 59, seed=5), options(40, resample=resample))


@pytest.mark.parametrize(
    "overrides",
    [
        {"image_mean": CLIP_MEAN, "image_std": CLIP_STD},
        {"do_normalize": False},
        {"do_rescale": False},
        {"do_rescale": False, "do_normalize": False},
        {"rescale_factor": 0.5 / 255, "image_mean": 0.25, "image_std": 0.75},
        {"do_resize": False},
    ],
)
def test_rescale_and_normalize_options_match_transformers(overrides):
    assert_matches_hf(random_image("RGB", 29, 41, seed=6), options(36, **overrides))


# --- pan-and-scan ------------------------------------------------------------------------------

PAS = {"do_pan_and_scan": True}
MIN_CROP_100 = {"pan_and_scan_min_crop_size": 100}


@pytest.mark.parametrize(
    "width, height, overrides, expected_num_crops",
    [
        (1200, 400, PAS, 3),  # landscape
        (400, 1200, PAS, 3),  # portrait
        (4000, 300, PAS, 4),  # ratio 13 capped at max_num_crops
        (599, 500, PAS, 0),  # ratio 1.198: just below the threshold
        (600, 500, PAS, 2),  # ratio exactly 1.2 activates
        (601, 500, PAS, 2),  # just above
        (500, 599, PAS, 0),
        (500, 601, PAS, 2),
        (500, 500, PAS, 0),  # square
        (1000, 300, {**PAS, "pan_and_scan_min_crop_size": 320}, 0),  # crops too small
        (
            400,
            100,
            {
                **PAS,
                "pan_and_scan_min_crop_size": 64,
                "pan_and_scan_max_num_crops": 3,
                "pan_and_scan_min_ratio_to_activate": 1.5,
            },
            3,
        ),
        (140, 100, {**PAS, "pan_and_scan_min_ratio_to_activate": 1.5}, 0),
        # A square image with the threshold at 1.0 is cut like a landscape one (into columns).
        (300, 300, {**PAS, "pan_and_scan_min_ratio_to_activate": 1.0, **MIN_CROP_100}, 2),
        # ceil(5 / 4) = 2 puts the 4th crop past the edge: transformers resizes an empty crop.
        (5, 1, {**PAS, "pan_and_scan_min_crop_size": 1}, 4),
    ],
)
def test_pan_and_scan_matches_transformers(width, height, overrides, expected_num_crops):
    image = random_image("RGB", width, height, seed=width + height)
    processed = assert_matches_hf(image, options(48, 40, **overrides))
    assert processed.num_crops == expected_num_crops
    assert processed.pixel_values.shape == (expected_num_crops + 1, 3, 48, 40)


def test_pan_and_scan_at_full_resolution_matches_transformers():
    image = random_image("RGBA", 1300, 420, seed=8)
    assert assert_matches_hf(image, options(896, **PAS)).num_crops == 3


SWEEP_SIDES = [1, 2, 100, 255, 256, 257, 299, 300, 307, 308, 511, 512, 513, 600, 767, 768, 769]
SWEEP_SIDES += [1000, 1023, 1024, 1025, 2000, 4096]


@pytest.mark.parametrize(
    "min_crop_size, max_num_crops, min_ratio",
    [(256, 4, 1.2), (64, 3, 1.5), (1, 8, 1.0), (300, 2, 2.0), (100, 1, 1.2)],
)
def test_num_crops_predicts_transformers_pan_and_scan(min_crop_size, max_num_crops, min_ratio):
    hf = Gemma3ImageProcessorPil()
    processor = Gemma3ImageProcessor(
        ImageProcessorConfig(
            do_pan_and_scan=True,
            pan_and_scan_min_crop_size=min_crop_size,
            pan_and_scan_max_num_crops=max_num_crops,
            pan_and_scan_min_ratio_to_activate=min_ratio,
        )
    )
    counts = []
    for width in SWEEP_SIDES:
        for height in SWEEP_SIDES:
            shape_only = np.broadcast_to(np.uint8(0), (3, height, width))  # CHW, no memory
            crops = hf.pan_and_scan(shape_only, min_crop_size, max_num_crops, min_ratio)
            assert processor.num_crops(width, height) == len(crops), (width, height)
            counts.append(len(crops))
    assert len(set(counts)) > 1  # the sweep reaches both sides of the thresholds


def test_num_crops_is_zero_when_pan_and_scan_is_off():
    processor = Gemma3ImageProcessor(ImageProcessorConfig())
    assert processor.num_crops(4000, 300) == 0


# --- uint8 path + normalize ----------------------------------------------------------------


def test_uint8_path_then_normalize_equals_preprocess():
    processor = Gemma3ImageProcessor(
        ImageProcessorConfig.from_dict(options(64, image_mean=CLIP_MEAN, image_std=CLIP_STD, **PAS))
    )
    image = random_image("RGB", 900, 300, seed=9)
    pixels, num_crops = processor.preprocess_uint8(image)
    assert pixels.dtype == torch.uint8 and pixels.shape == (num_crops + 1, 3, 64, 64)
    assert num_crops == 3
    processed = processor.preprocess(image)
    assert torch.equal(processor.normalize(pixels), processed.pixel_values)
    assert processed.num_crops == num_crops


@pytest.mark.parametrize("resample", [Image.Resampling.BILINEAR, Image.Resampling.BICUBIC])
def test_resize_left_to_the_device_gives_the_same_floats(resample):
    """preprocess_uint8(resize=False) + to_model_input == the host path, byte for byte, for a
    batch mixing sizes: upscaled, downscaled, already at size, two of one size, one over the
    device cap and one with pan-and-scan crops (those two resized on the host)."""
    processor = Gemma3ImageProcessor(
        ImageProcessorConfig.from_dict(
            options(
                64,
                resample=int(resample),
                pan_and_scan_min_crop_size=16,
                pan_and_scan_min_ratio_to_activate=2.0,
                **PAS,
            )
        )
    )
    sizes = [(40, 30), (120, 100), (64, 64), (40, 30), (300, 300), (120, 40)]
    images = [random_image("RGB", w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    items = [processor.preprocess_uint8(image, resize=False)[0] for image in images]
    shapes = [tuple(item.shape) for item in items]
    assert shapes[:4] == [(1, 3, 30, 40), (1, 3, 100, 120), (1, 3, 64, 64), (1, 3, 30, 40)]
    assert shapes[4] == (1, 3, 64, 64)  # 90000 pixels > 4 * 64 * 64: resized on the host
    assert shapes[5] == (4, 3, 64, 64)  # the image and 3 crops: resized on the host
    assert [processor.resizes_on_device(w, h) for w, h in sizes] == [True] * 4 + [False] * 2
    expected = torch.cat([processor.preprocess(image).pixel_values for image in images])
    assert torch.equal(processor.to_model_input(items), expected)
    assert torch.equal(processor.to_model_input(items[1:2]), expected[1:2])


def test_resize_on_the_device_follows_do_resize():
    processor = Gemma3ImageProcessor(ImageProcessorConfig.from_dict(options(32, do_resize=False)))
    image = random_image("RGB", 32, 32, seed=3)
    assert not processor.resizes_on_device(32, 32)
    pixels, _ = processor.preprocess_uint8(image, resize=False)
    assert torch.equal(processor.to_model_input([pixels]), processor.preprocess(image).pixel_values)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"image_mean": CLIP_MEAN, "image_std": CLIP_STD},
        {"do_rescale": False, "image_mean": [120.0, 100.0, 80.0], "image_std": [60.0, 50.0, 40.0]},
    ],
)
def test_normalize_matches_transformers_for_every_byte_value(overrides):
    opts = options(8, **overrides)
    # [2, 3, 16, 16]: every byte value in every channel, shuffled.
    values = np.random.default_rng(10).permutation(np.tile(np.arange(256, dtype=np.uint8), 6))
    pixels = values.reshape(2, 3, 16, 16)
    expected = []
    for chw in pixels:
        x = hf_rescale(chw, opts["rescale_factor"]) if opts["do_rescale"] else chw
        expected.append(hf_normalize(x, opts["image_mean"], opts["image_std"], "channels_first"))
    processor = Gemma3ImageProcessor(ImageProcessorConfig.from_dict(opts))
    ours = processor.normalize(torch.from_numpy(pixels))
    assert ours.dtype == torch.float32
    assert np.array_equal(ours.numpy(), np.stack(expected))


def test_normalize_rejects_float_input():
    processor = Gemma3ImageProcessor(ImageProcessorConfig())
    with pytest.raises(ValueError, match="uint8"):
        processor.normalize(torch.zeros(1, 3, 4, 4))


# --- processor input errors ----------------------------------------------------------------


def test_zero_size_image_is_rejected():
    processor = Gemma3ImageProcessor(ImageProcessorConfig())
    with pytest.raises(InvalidImageError, match="zero-size"):
        processor.preprocess(Image.new("RGB", (0, 5)))


def test_non_rgb_image_without_conversion_is_rejected():
    processor = Gemma3ImageProcessor(ImageProcessorConfig(do_convert_rgb=False))
    with pytest.raises(InvalidImageError, match="'L' is not RGB"):
        processor.preprocess(random_image("L", 8, 8))
    assert processor.preprocess(random_image("RGB", 8, 8)).pixel_values.shape == (1, 3, 224, 224)


# --- config ----------------------------------------------------------------------------------


def test_config_from_real_gemma3_json_applies_processor_defaults():
    config = ImageProcessorConfig.from_dict(GEMMA3_PREPROCESSOR_CONFIG)
    assert config == ImageProcessorConfig.from_dict(options(896))
    assert config.size == (896, 896)
    assert config.do_convert_rgb is True and config.do_pan_and_scan is False
    assert config.pan_and_scan_min_crop_size == 256
    assert config.pan_and_scan_max_num_crops == 4
    assert config.pan_and_scan_min_ratio_to_activate == 1.2
    assert config.image_mean == (0.5, 0.5, 0.5)


def test_from_pretrained_matches_auto_image_processor(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(GEMMA3_PREPROCESSOR_CONFIG))
    hf = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    assert isinstance(hf, Gemma3ImageProcessorPil)
    # RGB input: loaded alone, the HF image processor keeps the null do_convert_rgb (no
    # conversion); only Gemma3Processor's call-time defaults turn it on.
    image = random_image("RGB", 123, 77, seed=11)
    expected = hf(images=image, return_tensors="np")["pixel_values"]
    processor = Gemma3ImageProcessor(ImageProcessorConfig.from_pretrained(tmp_path))
    assert np.array_equal(processor.preprocess(image).pixel_values.numpy(), expected)


def test_from_pretrained_without_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="preprocessor_config.json not found") as info:
        ImageProcessorConfig.from_pretrained(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_from_pretrained_with_bad_json_names_the_path(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read .*preprocessor_config.json"):
        ImageProcessorConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"size": {"height": 0, "width": 896}}, "size"),
        ({"size": {"shortest_edge": 896}}, "size"),
        ({"resample": 9}, "resample"),
        ({"image_std": [0.5, 0.0, 0.5]}, "image_std"),
        ({"image_mean": [0.5, 0.5]}, "image_mean"),
        ({"rescale_factor": -1.0}, "rescale_factor"),
        ({"do_resize": "yes"}, "do_resize"),
        ({"pan_and_scan_min_crop_size": 0}, "pan_and_scan_min_crop_size"),
        ({"do_resize": False, "do_pan_and_scan": True}, "do_pan_and_scan needs do_resize"),
    ],
)
def test_invalid_config_raises_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ImageProcessorConfig.from_dict({**GEMMA3_PREPROCESSOR_CONFIG, **overrides})


def test_with_overrides_replaces_fields_and_rejects_unknown_names():
    config = ImageProcessorConfig.from_dict(GEMMA3_PREPROCESSOR_CONFIG)
    changed = config.with_overrides(do_pan_and_scan=True, size=[64, 32])
    assert changed.do_pan_and_scan is True and changed.size == (64, 32)
    assert config.do_pan_and_scan is False
    with pytest.raises(TypeError, match="pan_and_scan_crops"):
        config.with_overrides(pan_and_scan_crops=2)
    with pytest.raises(ConfigError):
        config.with_overrides(pan_and_scan_max_num_crops=0)


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        ImageProcessorConfig(size=(896, -1))
