"""Building an engine core from a checkpoint: load the weights, size the KV cache, open the
encoder-cache connector. The same steps run in-process (`Engine`) or in the core process."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from vlm_engine.config import ModelConfig
from vlm_engine.core.engine_core import EngineCore
from vlm_engine.device import resolve_device
from vlm_engine.engine_config import EngineConfig
from vlm_engine.frontend.image_processor import load_image_processor
from vlm_engine.frontend.tokenizer import load_tokenizer
from vlm_engine.models.loader import load_model
from vlm_engine.runtime.connectors import make_connector, model_fingerprint
from vlm_engine.runtime.memory import plan_num_kv_blocks

logger = logging.getLogger("vlm_engine")
DEFAULT_MAX_MODEL_LEN = 8192


def build_core(checkpoint_dir: Path, config: EngineConfig) -> EngineCore:
    model_config = ModelConfig.from_hf(checkpoint_dir)
    device = resolve_device(config)
    dtype = config.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    used_before_load = allocated_before_load = 0
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used_before_load = total - free
        allocated_before_load = torch.cuda.memory_allocated(device)  # another engine's, say
    model = load_model(
        model_config, checkpoint_dir, dtype=dtype, device=device, load_format=config.load_format,
        quantization=config.quantization,
    )  # fmt: skip
    model.fuse_projections()  # before the memory profile: the vision tower's folded copies count
    wanted_len = config.max_model_len or min(
        model_config.text.max_position_embeddings, DEFAULT_MAX_MODEL_LEN
    )
    num_blocks = plan_num_kv_blocks(
        model, config, wanted_len, used_before_load, allocated_before_load
    )
    capacity = num_blocks * config.block_size
    if wanted_len > capacity:
        logger.warning(
            "max_model_len %d exceeds the KV cache (%d tokens); using %d",
            wanted_len,
            capacity,
            capacity,
        )
    connector = None
    if config.ec_connector:  # entries are keyed by the model's fingerprint
        fingerprint = model_fingerprint(checkpoint_dir, dtype)
        connector = make_connector(config.ec_connector, fingerprint)
    image_processor = load_image_processor(model_config, checkpoint_dir, config.processor_options)
    to_model_input = image_processor.to_model_input if image_processor is not None else None
    return EngineCore(
        model, config, num_blocks, min(wanted_len, capacity), connector, to_model_input,
        load_tokenizer=lambda: load_tokenizer(checkpoint_dir),  # for structured outputs
    )  # fmt: skip
