"""Rotary position embedding, neox style (rotate half), with optional linear position scaling."""

import torch

from vlm_engine.kernels.platform import runs_on_triton


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


class Rotary:
    """RoPE inputs of one forward pass for one layer type; `apply` rotates q and k.

    On a GPU a Triton kernel rotates in place, computing cos/sin itself; elsewhere cos/sin are
    computed once per pass (on first use) and the torch reference rotates."""

    def __init__(self, positions: torch.Tensor, inv_freq: torch.Tensor):
        self.positions = positions
        self.inv_freq = inv_freq
        self._cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None

    def apply(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [T, heads, dim]  k: [T, kv_heads, dim]
        if runs_on_triton(q):
            from vlm_engine.kernels.triton_rotary import apply_rotary_

            apply_rotary_(q, k, self.positions, self.inv_freq)
            return q, k
        if self._cos_sin is None:
            self._cos_sin = rope_cos_sin(self.positions, self.inv_freq, q.dtype)
        return apply_rotary_ref(q, *self._cos_sin), apply_rotary_ref(k, *self._cos_sin)
