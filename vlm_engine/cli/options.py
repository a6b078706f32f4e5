"""The options and argument types that several `vlm-engine` commands share, and the errors every
command reports as usage errors."""

from __future__ import annotations

import argparse

from vlm_engine.caption_file import CaptionFileError
from vlm_engine.errors import CheckpointError, ConfigError, InvalidSamplingParamsError
from vlm_engine.quant_config import QUANTIZATIONS

# Errors a user fixes by changing the command line: reported as usage errors, no traceback.
USAGE_ERRORS = (
    CaptionFileError,
    InvalidSamplingParamsError,
    ConfigError,
    CheckpointError,
    FileNotFoundError,
)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text}")
    return value


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        metavar="DIR",
        help="HF Gemma3 checkpoint directory (default: the built-in demo model)",
    )
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="weights and activations (default: auto, bfloat16 on a GPU, float32 on a CPU)",
    )
    parser.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default=None,
        help="fp8: quantize the decoder's projections to FP8 at load; fp8-all: the vision tower's "
        "linear layers too (FP8 checkpoints are FP8 already)",
    )
