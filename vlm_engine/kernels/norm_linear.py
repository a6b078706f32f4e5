"""`act(LayerNorm(x + shift) @ W^T + b)` with the norm folded into the GEMM (triton_norm_linear.py
gives the algebra): the folded weights, where the fold runs, and the unfolded reference."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlm_engine.kernels.platform import cuda_capability, triton_available


@dataclass(frozen=True)
class FoldedNormLinear:
    """A LayerNorm and the linear layer after it, as the folded GEMM takes them."""

    weight: torch.Tensor  # W' = W * gamma: [N, K], the linear's dtype
    col_sum: torch.Tensor  # c = W' summed over K: [N] float32
    shift_out: torch.Tensor  # d = W' @ shift: [N] float32
    offset: torch.Tensor  # e = W @ beta + b: [N] float32
    shift: torch.Tensor | None  # [K] float32, added to x before the statistics
    eps: float


@torch.no_grad()
def fold_norm_linear(
    norm: nn.LayerNorm, linear: nn.Linear, shift: torch.Tensor | None = None
) -> FoldedNormLinear:
    """Fold `norm` (with `shift`, float32 [K], added to its input) into `linear`. The result is a
    copy: fold again after changing either module's weights."""
    weight = linear.weight
    folded = (weight.float() * norm.weight.float()).to(weight.dtype)
    exact = folded.float()  # c and d from the rounded W' that the GEMM multiplies by
    offset = (weight.float() * norm.bias.float()).sum(1)
    if linear.bias is not None:
        offset += linear.bias.float()
    if shift is None:
        shift_out = torch.zeros_like(offset)
    else:
        shift = shift.float().contiguous()
        shift_out = (exact * shift).sum(1)
    return FoldedNormLinear(
        weight=folded.contiguous(),
        col_sum=exact.sum(1),
        shift_out=shift_out,
        offset=offset,
        shift=shift,
        eps=norm.eps,
    )


def folds_norms(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `norm_linear` runs for activations of this device and dtype: a Hopper GPU (the
    tiles are sized for it) and bf16/fp16, with a triton that has TMA descriptors."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    if not triton_available(device) or cuda_capability(device)[0] != 9:
        return False
    from vlm_engine.kernels import triton_norm_linear

    return triton_norm_linear.TensorDescriptor is not None


def norm_linear(x: torch.Tensor, folded: FoldedNormLinear, gelu: bool) -> torch.Tensor:
    """x: [..., K] contiguous, in the folded weight's dtype -> [..., N]: two kernels, the rows'
    LayerNorm statistics (a read of x) and the GEMM with the norm in its epilogue."""
    from vlm_engine.kernels import triton_norm, triton_norm_linear

    rows = x.reshape(-1, x.shape[-1])
    stats = triton_norm.layer_norm_stats(rows, folded.eps, folded.shift)
    out = triton_norm_linear.norm_linear(
        rows, stats, folded.weight, folded.col_sum, folded.shift_out, folded.offset, gelu
    )
    return out.view(*x.shape[:-1], out.shape[-1])


def norm_linear_ref(
    x: torch.Tensor,
    norm: nn.LayerNorm,
    linear: nn.Linear,
    shift: torch.Tensor | None,
    gelu: bool,
) -> torch.Tensor:
    """The unfolded computation in float32, nothing rounded in between: what the folded kernels
    and the unfolded low-precision path both approximate."""
    t = x.float() if shift is None else x.float() + shift.float()
    h = F.layer_norm(t, t.shape[-1:], norm.weight.float(), norm.bias.float(), norm.eps)
    bias = None if linear.bias is None else linear.bias.float()
    y = F.linear(h, linear.weight.float(), bias)
    return F.gelu(y, approximate="tanh") if gelu else y
