"""Projections of the decoder: cuBLAS, except for steps of a few tokens on a GPU.

A decode step of up to `SKINNY_MAX_ROWS` tokens takes the Triton kernels of `triton_linear`,
which stream the weights at a higher share of the memory bandwidth than cuBLAS at that size, can
be launched before the kernel ahead of them finishes (PDL), and apply the MLP's activation in
the gate/up projection's epilogue. Larger steps are compute-bound GEMMs and stay on cuBLAS.

FP8 layers (a float8 weight with a `weight_scale` per output channel, kernels/fp8.py): larger
steps are FP8 GEMMs with the activations quantized per token; the skinny kernels read the float8
weight, multiply it with the activations as they are and scale each output column (the weight is
all they stream, and its bytes are halved).
VLM_ENGINE_SKINNY_LINEAR=0 (vlm_engine/envs.py) sends every step to cuBLAS.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from vlm_engine import envs
from vlm_engine.kernels.activation import gelu_and_mul
from vlm_engine.kernels.fp8 import fp8_linear, uses_scaled_mm
from vlm_engine.kernels.platform import runs_on_triton

SKINNY_MAX_ROWS = 4  # the largest step that takes the Triton kernels (<= triton_linear.MAX_ROWS)


def _takes_skinny(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (
        bias is None
        and x.dim() == 2
        and x.shape[0] <= SKINNY_MAX_ROWS
        and envs.values.skinny_linear
        and runs_on_triton(x)
    )


def linear(x: torch.Tensor, layer: nn.Module, act: str | None = None) -> torch.Tensor:
    """x @ layer.weight.T (+ layer.bias, if it has one) for x: [T, in] -> [T, out]; `layer` is
    an nn.Linear, or an nn.Embedding used as a tied LM head, or an FP8 layer (float8 weight and a
    `weight_scale` per output channel: kernels/fp8.py). act="gelu_mul" for a fused gate/up
    projection (rows interleaved, kernels/activation.py) gives gelu_tanh(gate) * up: [T, out/2]."""
    weight, bias = layer.weight, getattr(layer, "bias", None)
    scale = getattr(layer, "weight_scale", None)
    if _takes_skinny(x, bias) and (scale is None or uses_scaled_mm(x)):
        from vlm_engine.kernels.triton_linear import skinny_linear

        return skinny_linear(x, weight, act, skinny_config(weight, x.shape[0]), scale)
    if scale is not None:
        y = fp8_linear(x, weight, scale, bias)
        return y if act is None else gelu_and_mul(y)
    y = F.linear(x, weight, bias)
    return y if act is None else gelu_and_mul(y)


def skinny_config(weight: torch.Tensor, num_rows: int):
    if weight.dtype == torch.float8_e4m3fn:
        return _float8_config(*weight.shape, num_rows)
    return _skinny_config(*weight.shape, num_rows)


@functools.cache
def _float8_config(n: int, k: int, num_rows: int):
    """Tiles for float8 weights: the fastest of `benchmarks/skinny_linear.py --fp8` on an H100
    at the Gemma3-4B shapes. Half the bytes per weight tile leave the short-K projections (o)
    and the long-K one (down) at one row on the CUDA-core tiles of bf16; the rest take the
    tensor-core kernel (float16 products, triton_linear._dot_f16) in 64 x 128 tiles, K split four
    ways unless N alone gives enough programs (gate/up)."""
    from vlm_engine.kernels.triton_linear import LinearConfig

    if num_rows == 1 and (k <= 2048 or k >= 8192):
        return _skinny_config(n, k, num_rows)
    if num_rows <= 2 and k <= 2048:
        return LinearConfig(block_n=4, block_k=1024)
    split = 1 if n >= 8192 else 4
    return LinearConfig(block_n=64, block_k=128, split_k=split, num_stages=4, use_dot=True)


@functools.cache
def _skinny_config(n: int, k: int, num_rows: int):
    """Tiles for [num_rows, k] @ [n, k].T: the fastest of a sweep on an H100 for the Gemma3-4B
    projections (benchmarks/skinny_linear.py --sweep times them).

    One row (CUDA cores): 1024-wide K tiles, the down projection (long K, narrow N) split in
    two for enough programs; the o projection (K 2048) in one 8 x 2048 tile per program; gate/up
    and the LM head in 4-row blocks, q/k/v in 2-row blocks on two warps. Two to four rows (tensor
    cores): pipelined 32 x 256 or 64 x 128 tiles, K split four ways for the down projection.
    """
    from vlm_engine.kernels.triton_linear import LinearConfig

    if num_rows == 1:
        if k >= 8192:
            return LinearConfig(block_n=8, block_k=1024, split_k=2)
        if k <= 2048:
            return LinearConfig(block_n=8, block_k=2048)
        if n >= 65536:  # the LM head
            return LinearConfig(block_n=4, block_k=1024)
        return LinearConfig(block_n=4 if n >= 8192 else 2, block_k=1024, num_warps=2)
    if k >= 8192:
        return LinearConfig(block_n=64, block_k=128, split_k=4, num_stages=3, use_dot=True)
    if n >= 8192:
        return LinearConfig(block_n=64, block_k=128, num_stages=3, use_dot=True)
    return LinearConfig(block_n=32, block_k=256, num_stages=5, use_dot=True)
