"""The SigLIP tower's attention in torch's SDPA: the reference, and the path wherever no kernel
of this package applies (cuDNN's flash kernel on a GPU)."""

import torch
import torch.nn.functional as F

from vlm_engine.kernels.vision_attention.triton_flash import qkv_head_dim


def vision_attention_ref(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    # qkv: [N, P, 3 * H * D] (q, k, v, each head-major) -> [N, P, H * D], contiguous
    head_dim = qkv_head_dim(qkv, num_heads)
    num_images, num_patches, _ = qkv.shape
    q, k, v = qkv.unflatten(-1, (3, num_heads, head_dim)).permute(2, 0, 3, 1, 4)  # [N, H, P, D]
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(num_images, num_patches, num_heads * head_dim)
