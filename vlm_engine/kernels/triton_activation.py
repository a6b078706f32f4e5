"""Triton `gelu_tanh(gate) * up` in one pass over a [T, 2 * I] fused gate/up projection.

It rounds where torch does: gelu computes in float32 and rounds to the activation dtype, the
product multiplies the two rounded values in float32 and rounds again, and tanh is libdevice's
tanhf, the function torch's CUDA kernel calls. (The form x * sigmoid(2y) would avoid the
cancellation in 1 + tanh(y) for negative inputs, but then results would differ from torch's.)
Under Triton's interpreter, which lacks libdevice, tanh is 1 - 2 / (exp(2y) + 1) instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from vlm_engine.kernels.gate_up import GATE_UP_GROUP
from vlm_engine.kernels.pdl import pdl_options, pdl_wait
from vlm_engine.kernels.platform import interpreted

ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BLOCK = 1024


@triton.jit
def gelu_tanh(x, dtype: tl.constexpr, TANH_FROM_EXP: tl.constexpr):
    """gelu_tanh(x) computed in float32, rounded to `dtype` (returned as float32)."""
    x = x.to(tl.float32)
    # 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3))), the tanh approximation of GELU
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    if TANH_FROM_EXP:  # noqa: SIM108 (Triton's interpreter, for CPU tests, has no libdevice)
        tanh = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)
    else:
        tanh = libdevice.tanh(inner)
    return (0.5 * x * (1.0 + tanh)).to(dtype).to(tl.float32)


@triton.jit
def gelu_tanh_mul(gate, up, dtype: tl.constexpr, TANH_FROM_EXP: tl.constexpr):
    """`gelu_tanh(gate) * up` in float32, rounded to `dtype` after the gelu and after the product."""
    gelu = gelu_tanh(gate, dtype, TANH_FROM_EXP)
    return (gelu * up.to(tl.float32)).to(dtype)


@triton.jit(do_not_specialize=["num_tokens"])
def gelu_and_mul_kernel(
    gate_up_ptr,
    out_ptr,
    num_tokens,
    intermediate,
    stride_in,
    stride_out,
    BLOCK: tl.constexpr,
    GROUP: tl.constexpr,
    TANH_FROM_EXP: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    row = gate_up_ptr + token * stride_in
    gate_cols = (cols // GROUP) * (2 * GROUP) + cols % GROUP  # interleaved: GROUP gate, GROUP up
    gate = tl.load(row + gate_cols, mask=mask, other=0.0)
    up = tl.load(row + gate_cols + GROUP, mask=mask, other=0.0)
    out = gelu_tanh_mul(gate, up, out_ptr.dtype.element_ty, TANH_FROM_EXP)
    tl.store(out_ptr + token * stride_out + cols, out, mask=mask)


def gelu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2 * I] with gate and up columns interleaved (kernels/activation.py), last
    dimension contiguous -> a new [T, I] tensor."""
    if gate_up.dim() != 2 or gate_up.shape[1] % (2 * GATE_UP_GROUP):
        raise ValueError(
            f"gate_up must be [T, 2 * I] with I divisible by {GATE_UP_GROUP}, "
            f"got {tuple(gate_up.shape)}"
        )
    if gate_up.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"gate_up must be float32, bfloat16 or float16, got {gate_up.dtype}")
    if gate_up.stride(1) != 1:
        raise ValueError("gate_up must be contiguous in its last dimension")
    num_tokens, intermediate = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(num_tokens, intermediate, dtype=gate_up.dtype, device=gate_up.device)
    if num_tokens == 0:
        return out
    grid = (num_tokens, triton.cdiv(intermediate, _BLOCK))
    gelu_and_mul_kernel[grid](
        gate_up,
        out,
        num_tokens,
        intermediate,
        gate_up.stride(0),
        out.stride(0),
        BLOCK=_BLOCK,
        GROUP=GATE_UP_GROUP,
        TANH_FROM_EXP=interpreted(gelu_and_mul_kernel),
        **pdl_options(gate_up.device),
        num_warps=4,
        enable_fp_fusion=False,
    )
    return out
