"""FP8 projections: `x @ W.T` with W in float8_e4m3fn and one float32 scale per output channel,
x quantized per token at run time (each row's scale: its largest magnitude / 448).

On a GPU with FP8 tensor cores (compute capability 8.9 and up) the activations are quantized by
one Triton kernel (triton_fp8.py) and the product is one cuBLASLt FP8 GEMM (`torch._scaled_mm`)
with both sets of scales applied in its epilogue. Elsewhere (a CPU,
older GPUs) `fp8_linear_ref` computes the same quantized values in the activations' dtype:
each token's values rounded to float8 and back, the weight dequantized, then an ordinary matmul.
That is how compressed-tensors runs such a layer in transformers, so on a CPU in float32 the two
agree to rounding.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from vlm_engine.kernels.platform import cuda_capability, runs_on_triton
from vlm_engine.quant_config import FP8_MAX

FP8 = torch.float8_e4m3fn


@torch.no_grad()
def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (float8 [N, K], float32 scales [N, 1]): each output channel scaled so that its
    largest magnitude is 448 (a channel of zeros gets the dtype's epsilon). The arithmetic is in
    the weight's dtype, as compressed-tensors does it: the same bits as a checkpoint it wrote."""
    scale = weight.abs().amax(dim=1, keepdim=True) / FP8_MAX
    scale = torch.where(scale == 0, torch.finfo(weight.dtype).eps, scale)
    q = (weight / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale.float()


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, K] -> (float8 [T, K], scales [T, 1] in x's dtype), one scale per token."""
    scale = x.abs().amax(dim=-1, keepdim=True) / FP8_MAX
    scale = torch.where(scale == 0, torch.finfo(x.dtype).eps, scale)
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
    return weight.to(dtype) * scale.to(dtype)


def uses_scaled_mm(x: torch.Tensor) -> bool:
    """FP8 tensor cores, and bf16 activations (cuBLASLt's per-row and per-column scales give a
    bf16 output only); float16 and float32 take the reference."""
    return x.is_cuda and x.dtype == torch.bfloat16 and cuda_capability(x.device) >= (8, 9)


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    input_act: str | None = None,
) -> torch.Tensor:
    """x: [T, K] (or [..., K]), weight: float8 [N, K], scale: float32 [N, 1] -> [T, N] in x's
    dtype. input_act="gelu_tanh": the layer's input is gelu_tanh(x), rounded to x's dtype (on a
    GPU applied inside the quantization kernel)."""
    if input_act not in (None, "gelu_tanh"):
        raise ValueError(f"unknown input activation {input_act!r}")
    rows = x.reshape(-1, x.shape[-1])
    scaled_mm = uses_scaled_mm(x)
    if scaled_mm and runs_on_triton(rows) and rows.stride(-1) == 1:
        from vlm_engine.kernels.triton_fp8 import quantize_rows

        # one kernel, the same values as quantize_tokens of the activated rows
        xq, x_scale = quantize_rows(rows, gelu=input_act is not None)
    else:
        if input_act:
            rows = F.gelu(rows, approximate="tanh")
        if not scaled_mm:
            return fp8_linear_ref(rows, weight, scale, bias).view(*x.shape[:-1], weight.shape[0])
        xq, x_scale = quantize_tokens(rows)
    fused_bias = bias is not None and _epilogue_takes_bias(x.device)
    out = torch._scaled_mm(
        xq, weight.t(), scale_a=x_scale.float(), scale_b=scale.t(),
        bias=bias if fused_bias else None, out_dtype=x.dtype,
    )  # fmt: skip
    if bias is not None and not fused_bias:
        out += bias
    return out.view(*x.shape[:-1], weight.shape[0])


@functools.cache
def _epilogue_takes_bias(device: torch.device) -> bool:
    """Whether this torch's row-wise scaled GEMM adds a bias in its epilogue (and adds it
    right: within one bf16 rounding of the product plus the bias): tried once per device."""
    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn(32, 64, device=device, generator=generator).bfloat16()
    w = torch.randn(48, 64, device=device, generator=generator).bfloat16()
    bias = torch.randn(48, device=device, generator=generator).bfloat16() * 4
    (xq, x_scale), (wq, w_scale) = quantize_tokens(x), quantize_weight(w)
    args = dict(scale_a=x_scale.float(), scale_b=w_scale.t(), out_dtype=torch.bfloat16)
    try:
        out = torch._scaled_mm(xq, wq.t(), bias=bias, **args).float()
    except (RuntimeError, ValueError, TypeError):
        return False
    expected = torch._scaled_mm(xq, wq.t(), **args).float() + bias.float()
    return bool(((out - expected).abs() <= expected.abs() * 2**-7 + 1e-3).all())


def fp8_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same quantized values, computed in x's dtype: what compressed-tensors runs."""
    xq, x_scale = quantize_tokens(x)
    x_dq = xq.to(x.dtype) * x_scale
    return F.linear(x_dq, dequantize_weight(weight, scale, x.dtype), bias)
