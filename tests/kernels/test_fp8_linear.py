"""The FP8 projection on a GPU with FP8 tensor cores (cuBLASLt through `torch._scaled_mm`) against
its dequantized reference, at the Gemma3-4B projection shapes and step sizes from one decode
token to a prompt chunk. Without such a GPU the reference is the only path (tests/unit and
tests/e2e/test_fp8.py check it against compressed-tensors and transformers)."""

from __future__ import annotations

import pytest
import torch

from vlm_engine.kernels.fp8 import fp8_linear, quantize_tokens, quantize_weight, uses_scaled_mm
from vlm_engine.kernels.gate_up import split_gate_up
from vlm_engine.kernels.linear import linear

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    not (CUDA and uses_scaled_mm(torch.empty(1, device="cuda", dtype=torch.bfloat16))),
    reason="needs a GPU with FP8 tensor cores (compute capability 8.9 or newer)",
)
SHAPES = {"qkv": (4096, 2560), "o": (2560, 2048), "gate_up": (20480, 2560), "down": (2560, 10240)}


@pytest.mark.parametrize("rows", [1, 3, 16, 100, 2048])
@pytest.mark.parametrize("shape", SHAPES)
def test_scaled_mm_equals_the_reference(shape, rows):
    n, k = SHAPES[shape]
    generator = torch.Generator("cuda").manual_seed(rows)
    weight, scale = quantize_weight(
        torch.randn(n, k, device="cuda", generator=generator).to(torch.bfloat16) * 0.02
    )
    x = torch.randn(rows, k, device="cuda", generator=generator).to(torch.bfloat16)
    out = fp8_linear(x, weight, scale)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
    # The same quantized values (the activations quantized in bf16, as the engine does) in
    # float32: only the accumulation order and the bf16 output rounding differ.
    reference = _dequantized_product(x, weight, scale)
    error = (out.float() - reference).abs().max() / reference.abs().max()
    assert error < 1e-2, f"relative error {error:.2e}"


def _dequantized_product(x, weight, scale):
    xq, x_scale = quantize_tokens(x)
    return (xq.float() * x_scale.float()) @ (weight.float() * scale).T


def test_the_projection_dispatches_fp8_layers_with_the_activation():
    from vlm_engine.models.fp8 import Fp8Linear

    gate_up = torch.nn.Linear(256, 512, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = Fp8Linear.quantized(gate_up)
    x = torch.randn(5, 256, device="cuda", dtype=torch.bfloat16)
    out = linear(x, layer, act="gelu_mul")
    assert out.shape == (5, 256)
    y = _dequantized_product(x, layer.weight, layer.weight_scale).bfloat16()
    gate, up = split_gate_up(y)  # the fused layer's rows alternate gate and up groups
    expected = torch.nn.functional.gelu(gate.float(), approximate="tanh") * up.float()
    error = (out.float() - expected).abs().max() / expected.abs().max()
    assert error < 2e-2, f"relative error {error:.2e}"


@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_decode_steps_read_the_float8_weights(shape, rows):
    """Steps of up to four tokens take the skinny kernels, which stream the float8 weights and
    multiply them with the activations unrounded (the larger steps' FP8 GEMM rounds them)."""
    from vlm_engine.models.fp8 import Fp8Linear

    n, k = SHAPES[shape]
    generator = torch.Generator("cuda").manual_seed(rows)
    weight, scale = quantize_weight(
        torch.randn(n, k, device="cuda", generator=generator).to(torch.bfloat16) * 0.02
    )
    x = torch.randn(rows, k, device="cuda", generator=generator).to(torch.bfloat16)
    out = linear(x, Fp8Linear.from_tensors(weight, scale))
    expected = x.float() @ (weight.float() * scale).T
    error = (out.float() - expected).abs().max() / expected.abs().max()
    assert error < 1e-2, f"relative error {error:.2e}"


def test_a_bias_is_added_to_the_product():
    n, k = 1152, 1152
    generator = torch.Generator("cuda").manual_seed(11)
    weight, scale = quantize_weight(
        torch.randn(n, k, device="cuda", generator=generator).to(torch.bfloat16) * 0.02
    )
    bias = torch.randn(n, device="cuda", generator=generator).to(torch.bfloat16)
    x = torch.randn(300, k, device="cuda", generator=generator).to(torch.bfloat16)
    out = fp8_linear(x, weight, scale, bias)
    reference = _dequantized_product(x, weight, scale) + bias.float()
    error = (out.float() - reference).abs().max() / reference.abs().max()
    assert error < 1e-2, f"relative error {error:.2e}"
