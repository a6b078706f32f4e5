"""Attention of the SigLIP vision tower over its fused q/k/v projection output: every patch sees
every patch of its own image, no mask.

Three implementations side by side, one dispatch (`vision_attention`):
- `gluon_hopper.py`: a Gluon kernel for Hopper (TMA loads, asynchronous wgmma, a producer warp
  and two consumer warpgroups). It takes the tower's head_dim 72 as 64 + a tail instead of
  padding to 128 as cuDNN does, and is the fastest where it applies: from two images on
  (`GLUON_MIN_IMAGES`), bf16/fp16 on sm_90.
- `triton_flash.py`: a portable flash-attention kernel that reads q, k and v in place (head_dim
  72 as 64 + 16). Opt-in, since on an H100 cuDNN is faster; it also recomputes the blocks the
  Gluon kernel flags.
- `sdpa.py`: torch's SDPA, the reference and the path for everything else.

Switches (vlm_engine/envs.py): VLM_ENGINE_VISION_GLUON_ATTN=0, VLM_ENGINE_VISION_TRITON_ATTN=1.
"""

from __future__ import annotations

import torch

from vlm_engine import envs
from vlm_engine.kernels.platform import runs_on_triton
from vlm_engine.kernels.vision_attention import gluon_hopper, triton_flash
from vlm_engine.kernels.vision_attention.sdpa import vision_attention_ref

__all__ = ["GLUON_MIN_IMAGES", "vision_attention", "vision_attention_ref"]

# One image (the first token's case) stays on SDPA: there the kernel's gain is within noise and
# its launch costs more host time per layer (docs/kernels.md).
GLUON_MIN_IMAGES = 2


def vision_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """qkv [N, P, 3 * H * D] -> [N, P, H * D], scale D ** -0.5, no mask."""
    if _takes_triton(qkv):
        return triton_flash.vision_attention(qkv, num_heads)
    if (
        envs.values.vision_gluon_attention
        and qkv.shape[0] >= GLUON_MIN_IMAGES
        and gluon_hopper.supported(qkv, num_heads)
    ):
        return gluon_hopper.vision_attention(qkv, num_heads)
    return vision_attention_ref(qkv, num_heads)


def _takes_triton(qkv: torch.Tensor) -> bool:
    return (
        envs.values.vision_triton_attention
        and qkv.dtype in (torch.bfloat16, torch.float16)
        and qkv.stride(-1) == 1
        and runs_on_triton(qkv)
    )
