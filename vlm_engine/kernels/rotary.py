"""Rotary position embedding, neox style (rotate half), with optional linear position scaling."""

import torch


def rope_inv_freq(
    head_dim: int, theta: float, scaling_factor: float, device: torch.device
) -> torch.Tensor:
    # [head_dim // 2] float32; linear scaling divides the frequencies (stretches positions).
    # Computed on the CPU like transformers does, so GPU runs see bit-identical frequencies.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    return (1.0 / (theta**exponents) / scaling_factor).to(device)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    # positions: [T] -> cos, sin: [T, head_dim], computed in float32 then cast like transformers.
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, head_dim]  cos/sin: [T, head_dim]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return apply_rotary_ref(x, cos, sin)
