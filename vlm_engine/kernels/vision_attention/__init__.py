"""Attention of the SigLIP vision tower over the fused q/k/v projection output: every patch sees
every patch of its own image.

On a Hopper GPU, for the inputs it takes (SigLIP-so400m's head_dim 72 at 896 px among them), the
Gluon kernel (kernels/gluon_hopper.py): in bf16 4.8 ms against ~7 ms for SDPA and its
output copy at [32, 16, 4096, 72] on an H100. VLM_ENGINE_VISION_GLUON_ATTN=0 turns it off
(`GLUON_ENABLED`, read at each call). Otherwise `vision_attention_ref`: SDPA on [N, H, P, D]
views (cuDNN's flash kernel on an H100). The Triton kernel (kernels/triton_flash.py)
reads q, k and v in place and computes head_dim 72 as 64 + 16 where cuDNN pads it to 128, but on
an H100 it is still slower (best config 6.80 ms against 6.66 for SDPA and its output copy at
[32, 16, 4096, 72]; the tower 73 against 81 images/s): it is opt-in, for bf16/fp16 on a GPU,
with VLM_ENGINE_VISION_TRITON_ATTN=1 (`ENABLED`, read at each call).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from vlm_engine.kernels.platform import runs_on_triton
from vlm_engine.kernels.vision_attention import gluon_hopper, triton_flash
from vlm_engine.kernels.vision_attention.triton_flash import qkv_head_dim

ENABLED = os.environ.get("VLM_ENGINE_VISION_TRITON_ATTN", "0") == "1"
GLUON_ENABLED = os.environ.get("VLM_ENGINE_VISION_GLUON_ATTN", "1") != "0"
# One image (the time to first token's case) stays on SDPA: there the kernel's gain is within
# noise (tower 12.6 against 12.3 ms with SDPA, 12.95 against 13.2 in another run) and its launch
# costs ~90 us of host time per layer against ~30 for SDPA. From two images on it is ahead
# (24.4 against 25.0 ms at 2; 360-372 against 382-393 ms at 32).
GLUON_MIN_IMAGES = 2


def vision_attention_ref(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    # qkv: [N, P, 3 * H * D] (q, k, v, each head-major) -> [N, P, H * D], contiguous
    head_dim = qkv_head_dim(qkv, num_heads)
    num_images, num_patches, _ = qkv.shape
    q, k, v = qkv.unflatten(-1, (3, num_heads, head_dim)).permute(2, 0, 3, 1, 4)  # [N, H, P, D]
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(num_images, num_patches, num_heads * head_dim)


def vision_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """qkv [N, P, 3 * H * D] -> [N, P, H * D], scale D ** -0.5, no mask."""
    if _takes_triton(qkv):
        return triton_flash.vision_attention(qkv, num_heads)
    if (
        GLUON_ENABLED
        and qkv.shape[0] >= GLUON_MIN_IMAGES
        and gluon_hopper.supported(qkv, num_heads)
    ):
        return gluon_hopper.vision_attention(qkv, num_heads)
    return vision_attention_ref(qkv, num_heads)


def _takes_triton(qkv: torch.Tensor) -> bool:
    return (
        ENABLED
        and qkv.dtype in (torch.bfloat16, torch.float16)
        and qkv.stride(-1) == 1
        and runs_on_triton(qkv)
    )
