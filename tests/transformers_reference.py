"""transformers as the reference, as its newest release behaves.

The engine preprocesses images as the newest transformers release does. Where the installed
release is older and known to differ, `as_transformers_input` changes what transformers is given
so that the reference is the current behaviour, and says so with an `OlderTransformersWarning`
(listed in pytest's warnings summary): no comparison is skipped.

Known differences of older releases:
- before 5.21, an image with transparency (an alpha band, or a tRNS entry on a palette, grey or
  RGB image) lost its alpha without being composited onto white.
"""

from __future__ import annotations

import warnings

import transformers
from PIL import Image
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil


class OlderTransformersWarning(UserWarning):
    """The installed transformers predates a behaviour the engine follows."""


def has_transparency(image: Image.Image) -> bool:
    return "A" in image.getbands() or image.info.get("transparency") is not None


def composited_on_white(image: Image.Image) -> Image.Image:
    """What transformers 5.21 and later make of an image with transparency (RGB, no alpha)."""
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _composites_transparency() -> bool:
    """Whether the installed transformers turns a transparent pixel white."""
    probe = Image.new("RGBA", (1, 1), (0, 0, 0, 0))
    processor = Gemma3ImageProcessorPil(do_resize=False, do_rescale=False, do_normalize=False)
    pixels = processor(images=probe, do_convert_rgb=True, return_tensors="np")["pixel_values"]
    return pixels[0, :, 0, 0].tolist() == [255, 255, 255]


COMPOSITES_TRANSPARENCY = _composites_transparency()


def as_transformers_input(image: Image.Image) -> Image.Image:
    """``image`` as the installed transformers must get it to process it as the newest release
    does: unchanged from 5.21 on; composited onto white here first on older releases."""
    if COMPOSITES_TRANSPARENCY or not has_transparency(image):
        return image
    warnings.warn(
        OlderTransformersWarning(
            f"transformers {transformers.__version__} drops transparency without compositing "
            "(changed in 5.21): its reference here is its output for the image composited onto "
            "white, as 5.21 and later do"
        ),
        stacklevel=2,
    )
    return composited_on_white(image)
