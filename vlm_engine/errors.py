"""Typed errors of vlm_engine.

Every error a caller can cause is a ``ValueError`` subclass defined here, so that one
``except ValueError`` catches bad input while the kind of problem stays inspectable.
"""


class VlmEngineError(Exception):
    """Base of every error raised on purpose by vlm_engine."""


class ConfigError(VlmEngineError, ValueError):
    """A checkpoint configuration is malformed or lacks a required field."""


class UnsupportedModelError(ConfigError):
    """The checkpoint describes an architecture or feature vlm_engine does not implement."""


class CheckpointError(VlmEngineError, ValueError):
    """Checkpoint files are missing, unreadable, or do not match the model (missing/extra tensors)."""


class InvalidInputError(VlmEngineError, ValueError):
    """A request carries input that cannot be served."""


class InvalidImageError(InvalidInputError):
    """An image cannot be loaded: unsupported type, corrupt or truncated data, or zero size."""


class InvalidPromptError(InvalidInputError):
    """A prompt or chat message list is malformed, or its image placeholders do not match its images."""
