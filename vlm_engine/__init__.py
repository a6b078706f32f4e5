"""vlm_engine: fast, correct inference for Gemma3 vision-language models."""

from vlm_engine.async_engine import AsyncEngine, EngineDeadError
from vlm_engine.config import ModelConfig
from vlm_engine.engine import Engine
from vlm_engine.engine_config import EngineConfig
from vlm_engine.errors import (
    CheckpointError,
    ConfigError,
    InvalidImageError,
    InvalidInputError,
    InvalidPromptError,
    UnsupportedModelError,
    VlmEngineError,
)
from vlm_engine.outputs import Logprob, RequestMetrics, RequestOutput
from vlm_engine.pipeline import VisionLanguagePipeline
from vlm_engine.sampling_params import SamplingParams

__all__ = [
    "AsyncEngine",
    "Engine",
    "EngineDeadError",
    "EngineConfig",
    "Logprob",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
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
