"""RMSNorm as Gemma computes it: float32 statistics, scaled by (1 + weight), cast back last."""

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [..., dim]  weight: [dim]
    # Gemma multiplies by (1 + w) in float32 and only then casts; casting first changes bf16 outputs.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * (1.0 + weight.float())).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm_ref(x, weight, eps)
