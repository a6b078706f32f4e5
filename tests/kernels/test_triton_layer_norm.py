"""The Triton LayerNorm that adds a bias into its input in place, against its torch reference.

Without a GPU the kernel runs on Triton's interpreter (the `interpret` fixture of conftest.py) in
float32, plus float16 at small sizes; with one, the same tests run natively and the bf16/fp16
test uses the SigLIP tower's width over many rows.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from vlm_engine.kernels import triton_norm  # noqa: E402
from vlm_engine.kernels.norm import layer_norm_add_bias_ref  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
EPS = 1e-6
FP32_TOLERANCE = {"rtol": 2e-6, "atol": 2e-6}  # the float32 statistics sum in another order
LOW_PRECISION = [
    torch.float16,
    pytest.param(
        torch.bfloat16,
        marks=pytest.mark.skipif(
            not CUDA, reason="the Triton interpreter truncates float32 -> bfloat16 casts"
        ),
    ),
]
LOW_PRECISION_ROWS = 2 * 4096 if CUDA else 9  # two images of the tower on a GPU


@pytest.fixture(autouse=True)
def interpret_on_cpu(interpret):
    if not CUDA:
        interpret(triton_norm)


def _inputs(shape: tuple[int, ...], seed: int, dtype=torch.float32):
    # -> x (off-centre, as a residual stream is), weight (around 1), bias, add_bias
    gen = torch.Generator().manual_seed(seed)
    dim = shape[-1]

    def randn(*size: int, scale: float, shift: float = 0.0) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) * scale + shift).to(DEVICE, dtype)

    x = randn(*shape, scale=3.0, shift=1.5)
    return x, randn(dim, scale=0.5, shift=1.0), randn(dim, scale=0.5), randn(dim, scale=2.0)


def _run_both(x, weight, bias, add_bias):
    # -> (kernel output, kernel's x after), (reference output, reference's x after)
    x_kernel, x_ref = x.clone(), x.clone()
    out = triton_norm.layer_norm_add_bias_(x_kernel, weight, bias, EPS, add_bias)
    expected = layer_norm_add_bias_ref(x_ref, weight, bias, EPS, add_bias)
    return (out, x_kernel), (expected, x_ref)


@pytest.mark.parametrize("dim", [16, 72, 100, 1152])
@pytest.mark.parametrize("num_rows", [1, 7, 33])
@pytest.mark.parametrize("with_add_bias", [True, False], ids=["add-bias", "no-add-bias"])
def test_layer_norm_add_bias(dim, num_rows, with_add_bias):
    # 7 and 33 rows leave the last program of every tiling (16 rows of 16..100, 2 of 1152) short.
    x, weight, bias, add_bias = _inputs((num_rows, dim), seed=dim * 100 + num_rows)
    (out, x_after), (expected, x_expected) = _run_both(
        x, weight, bias, add_bias if with_add_bias else None
    )
    assert out.shape == x.shape and out.is_contiguous()
    torch.testing.assert_close(out, expected, **FP32_TOLERANCE)
    # the add is one float32 sum from the row as loaded: bit-identical to torch's
    assert torch.equal(x_after, x + add_bias if with_add_bias else x)
    assert torch.equal(x_after, x_expected)


def test_layer_norm_add_bias_keeps_leading_dims():
    # [images, patches, hidden], as the tower calls it
    x, weight, bias, add_bias = _inputs((3, 5, 72), seed=5)
    (out, x_after), (expected, x_expected) = _run_both(x, weight, bias, add_bias)
    assert out.shape == (3, 5, 72)
    torch.testing.assert_close(out, expected, **FP32_TOLERANCE)
    assert torch.equal(x_after, x_expected)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("dim", [72, 1152])
def test_layer_norm_add_bias_low_precision(dtype, dim):
    x, weight, bias, add_bias = _inputs((LOW_PRECISION_ROWS, dim), seed=dim, dtype=dtype)
    (out, x_after), (expected, x_expected) = _run_both(x, weight, bias, add_bias)
    # One cast of a float32 result each: the outputs differ only where the statistics' last
    # float32 bits (or a fused multiply-add) move a value across a rounding boundary. Against
    # float64 the kernel is never off by more than torch's own error plus two ulps (two: near a
    # power of two the kernel's value may sit in the binade above torch's, whose ulp is half),
    # plus float32 rounding of the two terms w * x_hat and b, which is all that is left where
    # they cancel to almost 0 (outputs of 1e-7, whose ulp says nothing).
    exact = (out == expected).float().mean().item()
    assert exact >= 0.99, f"only {exact:.4f} of the values are bit-identical"
    x_hat = F.layer_norm(x.double(), (dim,), None, None, EPS)
    exact64 = x_hat * weight.double() + bias.double()
    terms = (x_hat * weight.double()).abs() + bias.double().abs()
    kernel_error = (out.double() - exact64).abs()
    torch_error = (expected.double() - exact64).abs()
    bound = torch_error + 2 * _ulp(expected).double() + 4 * torch.finfo(torch.float32).eps * terms
    assert (kernel_error <= bound).all()
    assert torch.equal(x_after, x_expected)


def test_layer_norm_add_bias_rejects_mismatched_inputs():
    x, weight, bias, add_bias = _inputs((4, 16), seed=3)
    with pytest.raises(ValueError, match="contiguous"):
        triton_norm.layer_norm_add_bias_(x[:, :8], weight[:8], bias[:8], EPS, add_bias[:8])
    with pytest.raises(ValueError, match="bias"):
        triton_norm.layer_norm_add_bias_(x, weight, bias[:8], EPS)
    with pytest.raises(ValueError, match="add_bias"):
        triton_norm.layer_norm_add_bias_(x, weight, bias, EPS, add_bias[None])
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        triton_norm.layer_norm_add_bias_(x.double(), weight, bias, EPS)


def _ulp(x: torch.Tensor) -> torch.Tensor:
    # spacing of x.dtype's values at |x|, as float32
    _, exponent = torch.frexp(x.float())
    info = torch.finfo(x.dtype)
    eps = torch.full_like(x, info.eps, dtype=torch.float32)
    # below the smallest normal, values are spaced evenly (subnormals: fp16 outputs near 0)
    return torch.clamp(torch.ldexp(eps, exponent - 1), min=info.smallest_normal * info.eps)
