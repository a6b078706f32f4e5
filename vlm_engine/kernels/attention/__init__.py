"""The decoder's attention: causal, sliding window and bidirectional image groups over a flat
batch of sequences and a paged KV cache.

`metadata.py` (the step's `ForwardContext`), `backends.py` (the backend for a device, and the
static metadata CUDA graphs replay), `reference.py` (the torch reference), `triton_paged.py`
(the Triton kernel) and `split_kv.py` (small decode batches split over the KV tiles).
"""

from __future__ import annotations

import torch

from vlm_engine.kernels.attention.backends import attention_backend
from vlm_engine.kernels.attention.metadata import ForwardContext


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    ctx: ForwardContext,
    layer_idx: int,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """query [T, heads, dim], this step's key/value [T, kv_heads, dim] -> [T, heads, dim], by
    the backend of the query's device."""
    return attention_backend(query.device).forward(query, key, value, ctx, layer_idx, scale, window)
