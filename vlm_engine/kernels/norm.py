"""RMSNorm as Gemma computes it: float32 statistics, scaled by (1 + weight), cast back last; and
the SigLIP tower's LayerNorm, which can add a float32 vector to its input first."""

import torch
import torch.nn.functional as F

from vlm_engine.kernels.platform import runs_on_triton


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [..., dim]  weight: [dim]
    # Gemma multiplies by (1 + w) in float32 and only then casts; casting first changes bf16 outputs.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * (1.0 + weight.float())).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if runs_on_triton(x) and x.dim() in (2, 3):
        from vlm_engine.kernels import triton_norm

        return triton_norm.rms_norm(x if x.stride(-1) == 1 else x.contiguous(), weight, eps)
    return rms_norm_ref(x, weight, eps)


def post_norm_residual_pre_norm(
    h: torch.Tensor,
    residual: torch.Tensor,
    post_weight: torch.Tensor,
    pre_weight: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`residual + post_norm(h)` and its `pre_norm`, fused into one kernel on a GPU."""
    if runs_on_triton(h):
        from vlm_engine.kernels import triton_norm

        return triton_norm.post_norm_residual_pre_norm(h, residual, post_weight, pre_weight, eps)
    return post_norm_residual_pre_norm_ref(h, residual, post_weight, pre_weight, eps)


def post_norm_residual_pre_norm_ref(
    h: torch.Tensor,
    residual: torch.Tensor,
    post_weight: torch.Tensor,
    pre_weight: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    # h, residual: [N, D] -> (new_residual, normed): [N, D] each.
    # The decoder layer's `x = x + post_norm(h)` followed by `pre_norm(x)`; the add runs in the
    # activation dtype on the already-cast norm output, exactly as the unfused modules do.
    new_residual = residual + rms_norm_ref(h, post_weight, eps)
    return new_residual, rms_norm_ref(new_residual, pre_weight, eps)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """LayerNorm of `x + shift` (float32 [dim] or None, added in float32); one kernel on a GPU."""
    if runs_on_triton(x):
        from vlm_engine.kernels import triton_norm

        return triton_norm.layer_norm(x, weight, bias, eps, shift)
    return layer_norm_ref(x, weight, bias, eps, shift)


def layer_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    # x: [..., dim]  weight, bias: [dim]  shift: [dim] float32 -> [..., dim] in x's dtype
    if shift is None:
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    shifted = x.float() + shift
    return F.layer_norm(shifted, x.shape[-1:], weight.float(), bias.float(), eps).to(x.dtype)
