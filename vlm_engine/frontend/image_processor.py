"""Gemma3 image preprocessing: RGB conversion, pan-and-scan crops, resize, rescale, normalize.

Bit-exact with the PIL-backend Gemma3 image processor of the newest transformers release: every
step makes the same PIL call or the same float64/float32 arithmetic, in the same order. Images
with transparency are composited onto white before their alpha is dropped (transformers does so
since 5.21; earlier releases dropped the alpha alone).
"""

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlm_engine.config import ModelConfig
from vlm_engine.errors import ConfigError, InvalidImageError
from vlm_engine.frontend import resize as device_resize
from vlm_engine.frontend.processor_files import check_image_seq_length, image_processor_settings

# The revision of what this module makes of an image's pixels. It is part of every mm_hash, so
# that a processor-cache or encoder-cache entry (the disk and Redis connectors outlive upgrades)
# made by an earlier revision is never served for this one. Raise it whenever the pixels that
# some image gets change. 2: transparency composited onto white.
PREPROCESSING_REVISION = 2
# Images of up to this many times the model's input pixels may be resized on the device; larger
# ones are resized on the host, so that what crosses to the core and to the GPU stays bounded.
DEVICE_RESIZE_MAX_SCALE = 4

_RESAMPLE_FILTERS = frozenset(int(f) for f in Image.Resampling)
_BOOL_FIELDS = ("do_convert_rgb", "do_resize", "do_rescale", "do_normalize", "do_pan_and_scan")


@dataclass(frozen=True)
class ImageProcessorConfig:
    """How one image becomes pixel values; names follow preprocessor_config.json.

    Every default is what transformers uses when the key is missing or null: the Gemma3 image
    processor's class attributes (size 224x224 among them; real checkpoints say 896x896), and
    Gemma3Processor's image defaults for RGB conversion and pan-and-scan.
    """

    size: tuple[int, int] = (224, 224)  # (height, width)
    resample: int = int(Image.Resampling.BILINEAR)
    do_convert_rgb: bool = True
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    do_pan_and_scan: bool = False
    pan_and_scan_min_crop_size: int = 256
    pan_and_scan_max_num_crops: int = 4
    pan_and_scan_min_ratio_to_activate: float = 1.2

    def __post_init__(self) -> None:
        for name in ("size", "image_mean", "image_std"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        _require(
            _is_tuple_of(self.size, 2, _is_positive_int),
            f"size must be (height, width) of positive ints, got {self.size!r}",
        )
        _require(
            _is_int(self.resample) and self.resample in _RESAMPLE_FILTERS,
            f"resample must be a PIL filter id {sorted(_RESAMPLE_FILTERS)}, got {self.resample!r}",
        )
        for name in _BOOL_FIELDS:
            _require(isinstance(getattr(self, name), bool), f"{name} must be a bool")
        _require(_is_positive_number(self.rescale_factor), "rescale_factor must be positive")
        _require(_is_tuple_of(self.image_mean, 3, _is_number), "image_mean must be 3 numbers")
        _require(
            _is_tuple_of(self.image_std, 3, _is_positive_number), "image_std must be 3 positives"
        )
        self._validate_pan_and_scan()

    def _validate_pan_and_scan(self) -> None:
        for name in ("pan_and_scan_min_crop_size", "pan_and_scan_max_num_crops"):
            _require(_is_positive_int(getattr(self, name)), f"{name} must be a positive int")
        _require(
            _is_positive_number(self.pan_and_scan_min_ratio_to_activate),
            "pan_and_scan_min_ratio_to_activate must be positive",
        )
        _require(
            self.do_resize or not self.do_pan_and_scan,
            "do_pan_and_scan needs do_resize: crops of different sizes cannot be batched",
        )

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "ImageProcessorConfig":
        """Build from a preprocessor_config.json dict; missing or null keys take the defaults.

        Keys this processor does not use (``image_processor_type``, ``image_seq_length``, ...)
        are ignored.
        """
        if not isinstance(config, Mapping):
            raise ConfigError(f"image processor config must be a dict, got {type(config).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        values = {name: config[name] for name in names if config.get(name) is not None}
        if "size" in values:
            values["size"] = _size_from_json(values["size"])
        for name in ("image_mean", "image_std"):
            if _is_number(values.get(name)):
                values[name] = (values[name],) * 3
        return cls(**values)

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | os.PathLike[str]) -> "ImageProcessorConfig":
        """Read the image processor settings of a checkpoint directory, from whichever file
        holds them (see `processor_files.image_processor_settings`)."""
        settings, path = image_processor_settings(checkpoint_dir)
        try:
            return cls.from_dict(settings)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e

    def with_overrides(self, **overrides: Any) -> "ImageProcessorConfig":
        """A copy with some fields replaced; unknown names raise TypeError."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown image processor option(s) {unknown}; valid: {sorted(names)}")
        return dataclasses.replace(self, **overrides)


@dataclass(frozen=True)
class ProcessedImage:
    """Pixels of one image: the whole image first, then its pan-and-scan crops. Normalized
    float32, or uint8 that `Gemma3ImageProcessor.to_model_input` turns into the same floats
    (the engine ships uint8 to the device, a quarter of the bytes, and normalizes there; on a GPU
    it also resizes there, and an image then travels at its own size)."""

    pixel_values: torch.Tensor  # [num_crops + 1, 3, H, W] float32 or uint8
    num_crops: int


class Gemma3ImageProcessor:
    """One PIL image -> Gemma3 pixel values, bit-exact with transformers' PIL backend.

    ``preprocess(image)`` is ``normalize(preprocess_uint8(image))``: the uint8 half is PIL work
    on the CPU; the float half is a table lookup that gives the same bits on any device.
    """

    def __init__(self, config: ImageProcessorConfig) -> None:
        self.config = config
        self._table = torch.from_numpy(_normalization_table(config))  # [3, 256] float32
        # Per device, made once: a copy to a GPU at each step would wait for its queued work.
        self._tables: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def from_pretrained(
        cls,
        checkpoint_dir: str | os.PathLike[str],
        mm_tokens_per_image: int,
        overrides: Mapping[str, Any] | None = None,
    ) -> "Gemma3ImageProcessor":
        """The checkpoint's image processor, its settings replaced by ``overrides`` (unknown
        names raise TypeError); `ConfigError` when its processor files expand an image into
        another number of tokens than the model's ``mm_tokens_per_image``."""
        check_image_seq_length(checkpoint_dir, mm_tokens_per_image)
        config = ImageProcessorConfig.from_pretrained(checkpoint_dir)
        return cls(config.with_overrides(**overrides) if overrides else config)

    def num_crops(self, width: int, height: int) -> int:
        """Pan-and-scan crops an image of this size gets (0 when off or not worth it)."""
        _check_image_size(width, height)
        cfg = self.config
        if not cfg.do_pan_and_scan:
            return 0
        long_side, short_side = max(width, height), min(width, height)
        # Float expressions as in transformers, so rounding at the thresholds agrees.
        if long_side / short_side < cfg.pan_and_scan_min_ratio_to_activate:
            return 0
        num = int(math.floor(long_side / short_side + 0.5))
        num = min(num, int(math.floor(long_side / cfg.pan_and_scan_min_crop_size)))
        num = min(cfg.pan_and_scan_max_num_crops, max(2, num))
        crop_long_side = int(math.ceil(long_side / num))
        if min(crop_long_side, short_side) < cfg.pan_and_scan_min_crop_size:
            return 0
        return num

    def preprocess(self, image: Image.Image) -> ProcessedImage:
        """Pixel values of the image and its crops: float32 ``[num_crops + 1, 3, H, W]``."""
        pixels, num_crops = self.preprocess_uint8(image)
        return ProcessedImage(pixel_values=self.normalize(pixels), num_crops=num_crops)

    def preprocess_uint8(self, image: Image.Image, resize: bool = True) -> tuple[torch.Tensor, int]:
        """uint8 pixels ``[num_crops + 1, 3, H, W]`` (image, then crops) and num_crops.

        With ``resize=False``, an image that `resizes_on_device` is returned at its own size
        ``[1, 3, h, w]``, for `to_model_input` to resize on the device (byte for byte the same).
        """
        pixels = self._rgb_pixels(image)  # [h, w, 3] uint8
        height, width = pixels.shape[:2]
        num_crops = self.num_crops(width, height)
        views = [pixels, *_pan_and_scan_crops(pixels, num_crops)]
        if self.config.do_resize and (resize or not self.resizes_on_device(width, height)):
            views = [self._resize(view) for view in views]
        # numpy, not torch: frontend threads run this at once, and torch's CPU ops would each
        # start a pool of intra-op threads that oversubscribe the cores the GPU's driver needs.
        batch = np.ascontiguousarray(np.stack(views).transpose(0, 3, 1, 2))  # [n, 3, H, W]
        return torch.from_numpy(batch), num_crops

    def resizes_on_device(self, width: int, height: int) -> bool:
        """Whether `preprocess_uint8(image, resize=False)` leaves this image's resize to the
        device: one view (no pan-and-scan crops, whose sizes differ), a filter `resize_uint8`
        reproduces, and at most DEVICE_RESIZE_MAX_SCALE times the model's input pixels."""
        cfg = self.config
        out_h, out_w = cfg.size
        return (
            cfg.do_resize
            and cfg.resample in (device_resize.BILINEAR, device_resize.BICUBIC)
            and self.num_crops(width, height) == 0
            and width * height <= DEVICE_RESIZE_MAX_SCALE * out_h * out_w
        )

    def to_model_input(self, items: list[torch.Tensor]) -> torch.Tensor:
        """The vision tower's input from `preprocess_uint8` outputs already on the device:
        those not yet at the model's size resized (PIL's arithmetic, see vision/resize.py; one
        batch per input size), then all of them normalized as one float32 ``[n, 3, H, W]``."""
        size = tuple(self.config.size)
        items = list(items)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, item in enumerate(items):
            if self.config.do_resize and tuple(item.shape[-2:]) != size:
                by_shape.setdefault(tuple(item.shape[-2:]), []).append(i)
        for indices in by_shape.values():
            batch = torch.cat([items[i] for i in indices])
            resized = device_resize.resize_uint8(batch, size, self.config.resample)
            parts = resized.split([items[i].shape[0] for i in indices])
            for i, part in zip(indices, parts, strict=True):
                items[i] = part
        return self.normalize(torch.cat(items))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``[..., 3, H, W]`` -> float32 of the same shape, on the device of ``pixels``.

        The table holds, per channel, what transformers computes for each byte value (rescale
        in float64, cast to float32, normalize in float32), so a lookup reproduces it exactly.
        """
        if pixels.dtype != torch.uint8 or pixels.dim() < 3 or pixels.shape[-3] != 3:
            raise ValueError(
                f"expected uint8 [..., 3, H, W], got {pixels.dtype} {tuple(pixels.shape)}"
            )
        table = self._tables.get(pixels.device)
        if table is None:
            table = self._tables.setdefault(pixels.device, self._table.to(pixels.device).flatten())
        offsets = torch.arange(0, 3 * 256, 256, dtype=torch.int32, device=pixels.device)
        index = pixels.to(torch.int32) + offsets.view(3, 1, 1)  # [..., 3, H, W]
        return table.index_select(0, index.flatten()).view(pixels.shape)

    def _rgb_pixels(self, image: Image.Image) -> np.ndarray:
        if not isinstance(image, Image.Image):
            raise InvalidImageError(f"expected a PIL image, got {type(image).__name__}")
        _check_image_size(image.width, image.height)
        try:
            if self.config.do_convert_rgb:
                image = convert_to_rgb(image)
            pixels = np.asarray(image)
        except (OSError, ValueError) as e:
            raise InvalidImageError(f"cannot decode image pixels: {e}") from e
        if image.mode != "RGB":
            raise InvalidImageError(
                f"image mode {image.mode!r} is not RGB and do_convert_rgb is off"
            )
        return pixels  # [h, w, 3] uint8

    def _resize(self, pixels: np.ndarray) -> np.ndarray:
        # [h, w, 3] -> [H, W, 3] uint8
        height, width = self.config.size
        image = Image.fromarray(pixels)
        resized = image.resize((width, height), resample=self.config.resample, reducing_gap=None)
        return np.asarray(resized)


def load_image_processor(
    model_config: ModelConfig, checkpoint_dir: str | os.PathLike[str], options: Mapping[str, Any]
) -> Gemma3ImageProcessor | None:
    """The checkpoint's image processor with ``options`` applied; None for a text-only model."""
    if not model_config.is_multimodal:
        return None
    tokens = model_config.image_tokens.mm_tokens_per_image
    return Gemma3ImageProcessor.from_pretrained(checkpoint_dir, tokens, options)


def convert_to_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels of ``image`` as transformers makes them: an image with an alpha band or a
    transparency entry (RGBA, LA, PA, a palette or grey or RGB image with a tRNS chunk) is
    composited onto opaque white first; any other mode goes through PIL's conversion."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _pan_and_scan_crops(pixels: np.ndarray, num_crops: int) -> list[np.ndarray]:
    """Views of ``pixels`` [h, w, 3] cut along the long side; the last crop may be shorter."""
    if num_crops == 0:
        return []
    height, width = pixels.shape[:2]
    crop = int(math.ceil(max(width, height) / num_crops))
    starts = range(0, num_crops * crop, crop)
    if width >= height:
        return [pixels[:, start : start + crop] for start in starts]
    return [pixels[start : start + crop] for start in starts]


def _normalization_table(config: ImageProcessorConfig) -> np.ndarray:
    """float32 [3, 256]: the output value of each channel for each byte value."""
    levels = np.arange(256, dtype=np.uint8)
    values = levels.astype(np.float32)
    if config.do_rescale:
        values = (levels.astype(np.float64) * config.rescale_factor).astype(np.float32)
    values = np.broadcast_to(values, (3, 256))
    if config.do_normalize:
        mean = np.asarray(config.image_mean, dtype=np.float32).reshape(3, 1)
        std = np.asarray(config.image_std, dtype=np.float32).reshape(3, 1)
        values = (values - mean) / std  # float32 arithmetic, as in transformers
    return np.ascontiguousarray(values, dtype=np.float32)


def _check_image_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise InvalidImageError(f"zero-size image ({width}x{height}) cannot be processed")


def _size_from_json(size: Any) -> tuple[int, int]:
    if _is_int(size):
        return (size, size)
    extra = isinstance(size, Mapping) and any(
        v is not None for k, v in size.items() if k not in ("height", "width")
    )
    if not isinstance(size, Mapping) or extra or "height" not in size or "width" not in size:
        raise ConfigError(f'size must be {{"height": H, "width": W}}, got {size!r}')
    return (size["height"], size["width"])


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_int(value: Any) -> bool:
    return _is_int(value) and value > 0


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_positive_number(value: Any) -> bool:
    return _is_number(value) and value > 0


def _is_tuple_of(value: Any, length: int, check: Callable[[Any], bool]) -> bool:
    return isinstance(value, tuple) and len(value) == length and all(check(v) for v in value)
