"""Typed errors of vlm_engine.

Every error a caller can cause is a ``ValueError`` subclass defined here, so that one
``except ValueError`` catches bad input while the kind of problem stays inspectable.

Bad request input is an ``InvalidInputError``, one subclass per kind of problem::

    InvalidInputError
      InputTypeError (also a TypeError)     an argument of the wrong type
        PromptTypeError, ImageTypeError, SamplingParamsTypeError
      InvalidImageError                     an image that cannot be served
        ImageFileError, NotAnImageError, CorruptImageError, EmptyImageError, ImageTooLargeError
      InvalidPromptError                    a prompt that cannot be served
        MalformedPromptError, EmptyPromptError, PromptTooLongError,
        ImagePlaceholderError, TooManyImagesError
      InvalidSamplingParamsError            a sampling value out of range
      RequestIdInUseError

A wrong type is an input error like any other (one ``except ValueError`` still catches every bad
request), and also a ``TypeError``, so code that expects Python's usual exception for a wrong
type sees one.
"""

from __future__ import annotations


class VlmEngineError(Exception):
    """Base of every error raised on purpose by vlm_engine."""


class EngineDeadError(VlmEngineError, RuntimeError):
    """The engine can serve no more: its core failed or exited, or it was closed. Requests in
    flight end with this error, and `is_healthy` turns False."""


class ConfigError(VlmEngineError, ValueError):
    """A checkpoint configuration is malformed or lacks a required field."""


class UnsupportedModelError(ConfigError):
    """The checkpoint describes an architecture or feature vlm_engine does not implement."""


class CheckpointError(VlmEngineError, ValueError):
    """Checkpoint files are missing, unreadable, or do not match the model (missing/extra tensors)."""


class InvalidInputError(VlmEngineError, ValueError):
    """A request carries input that cannot be served; the engine goes on with other requests."""

    def add_context(self, where: str) -> None:
        """Prefix the message with where the bad input sits (a request, an image)."""
        self.args = (f"{where}: {self.args[0]}" if self.args else where, *self.args[1:])


class InputTypeError(InvalidInputError, TypeError):
    """An argument of a request has the wrong type (a request id, a priority, a cache salt)."""


class RequestIdInUseError(InvalidInputError):
    """A request id is already taken by a request that has not finished."""


# ---- images ------------------------------------------------------------------------------------


class InvalidImageError(InvalidInputError):
    """An image cannot be served; the subclasses say why."""


class ImageTypeError(InvalidImageError, InputTypeError):
    """An image source is neither a PIL image, a path, nor encoded bytes."""


class ImageFileError(InvalidImageError):
    """An image path does not exist or cannot be read."""


class NotAnImageError(InvalidImageError):
    """The data is in no image format PIL recognizes (a text file named .png, random bytes)."""


class CorruptImageError(InvalidImageError):
    """The data starts as an image but is corrupt or truncated."""


class EmptyImageError(InvalidImageError):
    """The image has zero width or height, or its data has zero bytes."""


class ImageTooLargeError(InvalidImageError):
    """More pixels than ``max_image_pixels`` (or PIL's decompression-bomb limit), or more image
    tokens than one engine step can take."""


# ---- prompts -----------------------------------------------------------------------------------


class InvalidPromptError(InvalidInputError):
    """A prompt cannot be served; the subclasses say why."""


class PromptTypeError(InvalidPromptError, InputTypeError):
    """A prompt, or a part of it, has the wrong type: not a str or dict, a dict with unknown or
    missing keys, a chat message that is not a dict."""


class MalformedPromptError(InvalidPromptError):
    """A prompt of the right types whose content cannot be used: an unknown chat role, an item
    type that is not text or image, a reserved token in the text, a template that rejects it."""


class EmptyPromptError(InvalidPromptError):
    """A prompt with neither text nor images."""


class PromptTooLongError(InvalidPromptError):
    """A prompt of ``max_model_len`` tokens or more (no room left for output)."""


class ImagePlaceholderError(InvalidPromptError):
    """The prompt's image placeholders (``<start_of_image>``) do not match its images in number."""


class TooManyImagesError(InvalidPromptError):
    """More images than ``max_images_per_prompt`` allows (any image, for a text-only model)."""


# ---- sampling ----------------------------------------------------------------------------------


class InvalidSamplingParamsError(InvalidInputError):
    """A sampling value is out of range, for any model or for this one (a stop token id outside
    its vocabulary)."""


class SamplingParamsTypeError(InvalidSamplingParamsError, InputTypeError):
    """A sampling field, or the sampling params object itself, has the wrong type."""
