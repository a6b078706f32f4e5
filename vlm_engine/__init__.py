"""vlm_engine: fast, correct inference for Gemma3 vision-language models.

The public names load on first use, so that a process needing one part (the engine core's own
process, the CLI's help) does not import the rest.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AsyncEngine": "vlm_engine.async_engine",
    "Engine": "vlm_engine.engine",
    "EngineConfig": "vlm_engine.engine_config",
    "ModelConfig": "vlm_engine.config",
    "CompletionOutput": "vlm_engine.outputs",
    "Logprob": "vlm_engine.outputs",
    "RequestMetrics": "vlm_engine.outputs",
    "RequestOutput": "vlm_engine.outputs",
    "SamplingParams": "vlm_engine.sampling_params",
    "StructuredOutputs": "vlm_engine.sampling_params",
    "VisionLanguagePipeline": "vlm_engine.pipeline",
    "CheckpointError": "vlm_engine.errors",
    "ConfigError": "vlm_engine.errors",
    "EngineDeadError": "vlm_engine.errors",
    "InvalidImageError": "vlm_engine.errors",
    "InvalidInputError": "vlm_engine.errors",
    "InvalidPromptError": "vlm_engine.errors",
    "UnsupportedModelError": "vlm_engine.errors",
    "VlmEngineError": "vlm_engine.errors",
}
__all__ = [
    "AsyncEngine",
    "CheckpointError",
    "CompletionOutput",
    "ConfigError",
    "Engine",
    "EngineConfig",
    "EngineDeadError",
    "InvalidImageError",
    "InvalidInputError",
    "InvalidPromptError",
    "Logprob",
    "ModelConfig",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutputs",
    "UnsupportedModelError",
    "VisionLanguagePipeline",
    "VlmEngineError",
]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from vlm_engine.async_engine import AsyncEngine
    from vlm_engine.config import ModelConfig
    from vlm_engine.engine import Engine
    from vlm_engine.engine_config import EngineConfig
    from vlm_engine.errors import (
        CheckpointError,
        ConfigError,
        EngineDeadError,
        InvalidImageError,
        InvalidInputError,
        InvalidPromptError,
        UnsupportedModelError,
        VlmEngineError,
    )
    from vlm_engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
    from vlm_engine.pipeline import VisionLanguagePipeline
    from vlm_engine.sampling_params import SamplingParams, StructuredOutputs


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vlm_engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
