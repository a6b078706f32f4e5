"""Triton per-token FP8 quantization of a projection's input: one kernel instead of the five
elementwise and reduction passes of `fp8.quantize_tokens` (abs, row maximum, division, clamp,
cast), each of which reads or writes the whole activation.

A program takes one row. Up to 8192 columns it reads the row once and keeps it in registers;
longer rows take a first sweep for the largest magnitude and a second that divides by the row's
scale and stores float8. The arithmetic follows `quantize_tokens` in the
activation's dtype: the scale is max / 448 rounded to that dtype (the dtype's epsilon for a row
of zeros), each value divided by it is rounded to that dtype, clamped to +-448, then rounded to
float8 (nearest, ties to even). So the float8 values and scales are the reference's bit for bit.

With `gelu=True` the kernel quantizes gelu_tanh(x) instead (the input of the vision tower's fc2),
computed as torch computes it (float32, rounded to the activation dtype): the activation is never
written out in bf16 and read back.
"""

from __future__ import annotations

import torch

from vlm_engine.kernels.platform import interpreted, jit, tl, triton
from vlm_engine.kernels.triton_activation import gelu_tanh
from vlm_engine.quant_config import FP8_MAX

_WHOLE_ROW_MAX = 8192  # rows up to this long are read once, held in registers
_BLOCK = 1024


@jit
def quantize_rows_kernel(
    x_ptr,  # [T, K]
    out_ptr,  # [T, K] float8_e4m3fn
    scale_ptr,  # [T] float32
    K,
    stride_x,
    stride_out,
    eps,
    FP8_LIMIT: tl.constexpr,
    BLOCK: tl.constexpr,
    WHOLE_ROW: tl.constexpr,  # BLOCK >= K: the row is read once and kept in registers
    GELU: tl.constexpr,  # quantize gelu_tanh(x), rounded to x's dtype
    TANH_FROM_EXP: tl.constexpr,
):
    row = tl.program_id(0)
    dtype = x_ptr.dtype.element_ty
    x_row = x_ptr + row.to(tl.int64) * stride_x
    out_row = out_ptr + row.to(tl.int64) * stride_out
    if WHOLE_ROW:
        cols = tl.arange(0, BLOCK)
        x = _activated(x_row, cols, K, dtype, GELU, TANH_FROM_EXP)
        scale = _scale(tl.max(tl.abs(x), axis=0), dtype, eps, FP8_LIMIT)
        _store_quantized(out_row, cols, K, x, scale, dtype, FP8_LIMIT)
    else:  # a first sweep for the row's largest magnitude, a second to quantize
        peak = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            cols = k0 + tl.arange(0, BLOCK)
            x = _activated(x_row, cols, K, dtype, GELU, TANH_FROM_EXP)
            peak = tl.maximum(peak, tl.abs(x))
        scale = _scale(tl.max(peak, axis=0), dtype, eps, FP8_LIMIT)
        for k0 in range(0, K, BLOCK):
            cols = k0 + tl.arange(0, BLOCK)
            x = _activated(x_row, cols, K, dtype, GELU, TANH_FROM_EXP)
            _store_quantized(out_row, cols, K, x, scale, dtype, FP8_LIMIT)
    tl.store(scale_ptr + row, scale)


@jit
def _activated(
    x_row, cols, K, dtype: tl.constexpr, GELU: tl.constexpr, TANH_FROM_EXP: tl.constexpr
):
    x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
    if GELU:
        x = gelu_tanh(x, dtype, TANH_FROM_EXP)
    return x


@jit
def _scale(peak, dtype: tl.constexpr, eps, FP8_LIMIT: tl.constexpr):
    # max / 448 rounded to the activation dtype; a row of zeros gets the dtype's epsilon
    scale = (peak / FP8_LIMIT).to(dtype).to(tl.float32)
    return tl.where(scale == 0.0, eps, scale)


@jit
def _store_quantized(out_row, cols, K, x, scale, dtype: tl.constexpr, FP8_LIMIT: tl.constexpr):
    q = (x / scale).to(dtype).to(tl.float32)
    q = tl.minimum(tl.maximum(q, -FP8_LIMIT), FP8_LIMIT)
    tl.store(out_row + cols, q.to(out_row.dtype.element_ty), mask=cols < K)


def quantize_rows(x: torch.Tensor, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, K] (last dimension contiguous) -> (float8 [T, K], float32 scales [T, 1]) of x,
    or with `gelu` of gelu_tanh(x)."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError("quantize_rows takes a 2-D tensor contiguous in its last dimension")
    rows, k = x.shape
    out = torch.empty(rows, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    if rows:
        whole = k <= _WHOLE_ROW_MAX
        block = triton.next_power_of_2(k) if whole else _BLOCK
        quantize_rows_kernel[(rows,)](
            x, out, scale, k, x.stride(0), out.stride(0), torch.finfo(x.dtype).eps,
            FP8_LIMIT=FP8_MAX, BLOCK=block, WHOLE_ROW=whole, GELU=gelu,
            TANH_FROM_EXP=interpreted(quantize_rows_kernel),
            num_warps=max(4, min(16, block // 512)),
        )  # fmt: skip
    return out, scale
