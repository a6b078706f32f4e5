"""How many KV-cache blocks to allocate, and allocating them.

On a GPU the cache takes what is left of `gpu_memory_utilization` of the device after the
weights and the activation peak of a worst-case step (a full token budget of prefill plus a full
encoder budget of images), found by running that step once. On a CPU, or when
`kv_cache_memory_gb` is given, a fixed amount. Never more than `max_num_seqs` full-length
sequences need.
"""

from __future__ import annotations

import logging

import torch

from vlm_engine.config import ModelConfig
from vlm_engine.engine_config import EngineConfig
from vlm_engine.errors import ConfigError
from vlm_engine.kernels.attention.metadata import ForwardContext
from vlm_engine.models.gemma3 import Gemma3Model

logger = logging.getLogger("vlm_engine")
CPU_KV_CACHE_GB = 0.25


def kv_block_bytes(model_config: ModelConfig, block_size: int, element_size: int) -> int:
    text = model_config.text
    return (2 * text.num_hidden_layers * block_size * text.num_key_value_heads * text.head_dim
            * element_size)  # fmt: skip


def allocate_kv_caches(model: Gemma3Model, num_blocks: int, block_size: int) -> list[torch.Tensor]:
    text = model.config.text
    weight = model.language_model.embed_tokens.weight
    shape = (2, num_blocks, block_size, text.num_key_value_heads, text.head_dim)
    return [
        torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        for _ in range(text.num_hidden_layers)
    ]


def plan_num_kv_blocks(
    model: Gemma3Model,
    config: EngineConfig,
    max_model_len: int,
    used_before_load: int,
    allocated_before_load: int = 0,
) -> int:
    """`used_before_load`: device bytes in use (other processes, the CUDA context, another engine
    of this process) before loading; `allocated_before_load`: of those, the bytes this process's
    torch allocator held, which its peak statistics count again."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    weight = model.language_model.embed_tokens.weight
    per_block = kv_block_bytes(model.config, config.block_size, weight.element_size())
    needed = config.max_num_seqs * -(-max_model_len // config.block_size)
    if config.kv_cache_memory_gb is not None or not weight.is_cuda:
        budget = int((config.kv_cache_memory_gb or CPU_KV_CACHE_GB) * 2**30)
    else:
        budget = _gpu_kv_budget(model, config, used_before_load, allocated_before_load)
    min_blocks = -(-min(max_model_len, 4096) // config.block_size)
    if budget // per_block < min_blocks:
        raise ConfigError(
            f"the model does not fit: {budget / 2**30:.2f} GiB left for the KV cache, "
            f"{min_blocks * per_block / 2**30:.2f} GiB needed for one {min_blocks * config.block_size}"
            "-token sequence; raise gpu_memory_utilization or lower max_num_batched_tokens"
        )
    return max(2, min(budget // per_block, needed))


def _gpu_kv_budget(
    model: Gemma3Model, config: EngineConfig, used_before_load: int, allocated_before_load: int
) -> int:
    device = model.language_model.embed_tokens.weight.device
    # this engine's own peak: the allocator's also counts what was allocated before it loaded
    peak = profile_peak_memory(model, config) - allocated_before_load
    total = torch.cuda.get_device_properties(device).total_memory
    budget = int(total * config.gpu_memory_utilization) - used_before_load - peak
    logger.info(
        "memory: %.2f GiB in use before loading, %.2f GiB peak (weights + activations), "
        "%.2f GiB for the KV cache",
        used_before_load / 2**30,
        peak / 2**30,
        budget / 2**30,
    )
    return budget


@torch.inference_mode()
def profile_peak_memory(model: Gemma3Model, config: EngineConfig) -> int:
    """Peak allocated bytes over one worst-case step, run for real on zeros."""
    device = model.language_model.embed_tokens.weight.device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    num_tokens = config.max_num_batched_tokens
    ctx = ForwardContext.full_sequences([num_tokens], device=device)
    hidden = model(torch.zeros(num_tokens, dtype=torch.long, device=device), ctx)
    model.compute_logits(hidden[-min(num_tokens, config.max_num_seqs) :])
    del hidden
    vision = model.config.vision
    if vision is not None:
        items = max(
            1, config.encoder_compute_budget // model.config.image_tokens.mm_tokens_per_image
        )
        pixels = torch.zeros(items, 3, vision.image_size, vision.image_size, device=device)
        model.embed_images(pixels)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.empty_cache()
    return peak
