"""vlm_engine: fast, correct inference for Gemma3 vision-language models."""

from vlm_engine.config import ModelConfig
from vlm_engine.errors import (
    CheckpointError,
    ConfigError,
    InvalidImageError,
    InvalidInputError,
    InvalidPromptError,
    UnsupportedModelError,
    VlmEngineError,
)
from vlm_engine.pipeline import VisionLanguagePipeline

__all__ = [
    "CheckpointError",
    "ConfigError",
    "InvalidImageError",
    "InvalidInputError",
    "InvalidPromptError",
    "ModelConfig",
    "UnsupportedModelError",
    "VisionLanguagePipeline",
    "VlmEngineError",
]
__version__ = "0.1.0"
