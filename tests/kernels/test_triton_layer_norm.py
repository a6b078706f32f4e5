"""The Triton LayerNorm (of x plus an optional float32 shift) against its torch reference.

Without a GPU the kernel runs on Triton's interpreter (the `interpret` fixture of conftest.py) in
float32, plus float16 at small sizes; with one, the same tests run natively and the bf16/fp16
test uses the SigLIP tower's width over many rows.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from kernel_dtypes import LOW_PRECISION  # noqa: E402

from vlm_engine.kernels import triton_norm  # noqa: E402
from vlm_engine.kernels.norm import layer_norm_ref  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
EPS = 1e-6
FP32_TOLERANCE = {"rtol": 2e-6, "atol": 2e-6}  # the float32 statistics sum in another order
LOW_PRECISION_ROWS = 2 * 4096 if CUDA else 9  # two images of the tower on a GPU


@pytest.fixture(autouse=True)
def interpret_on_cpu(interpret):
    if not CUDA:
        interpret(triton_norm)


def _inputs(shape: tuple[int, ...], seed: int, dtype=torch.float32):
    # -> x (off-centre, as a residual stream is), weight (around 1), bias, shift (float32)
    gen = torch.Generator().manual_seed(seed)
    dim = shape[-1]

    def randn(*size: int, scale: float, shift: float = 0.0) -> torch.Tensor:
        return torch.randn(*size, generator=gen) * scale + shift

    x = randn(*shape, scale=3.0, shift=1.5).to(DEVICE, dtype)
    weight = randn(dim, scale=0.5, shift=1.0).to(DEVICE, dtype)
    return x, weight, randn(dim, scale=0.5).to(DEVICE, dtype), randn(dim, scale=2.0).to(DEVICE)


def _run_both(x, weight, bias, shift):
    # -> kernel output, reference output; the kernel must leave x as it was
    before = x.clone()
    out = triton_norm.layer_norm(x, weight, bias, EPS, shift)
    assert torch.equal(x, before)
    return out, layer_norm_ref(x, weight, bias, EPS, shift)


@pytest.mark.parametrize("dim", [16, 72, 100, 1152])
@pytest.mark.parametrize("num_rows", [1, 7, 33])
@pytest.mark.parametrize("with_shift", [True, False], ids=["shift", "no-shift"])
def test_layer_norm(dim, num_rows, with_shift):
    # 7 and 33 rows leave the last program of every tiling (16 rows of 16..100, 2 of 1152) short.
    x, weight, bias, shift = _inputs((num_rows, dim), seed=dim * 100 + num_rows)
    out, expected = _run_both(x, weight, bias, shift if with_shift else None)
    assert out.shape == x.shape and out.is_contiguous()
    torch.testing.assert_close(out, expected, **FP32_TOLERANCE)
    if with_shift:  # the shift moves the row's mean, which the norm must not cancel away
        plain = F.layer_norm(x, (dim,), weight, bias, EPS)
        assert not torch.allclose(out, plain, **FP32_TOLERANCE)


def test_layer_norm_keeps_leading_dims():
    # [images, patches, hidden], as the tower calls it
    x, weight, bias, shift = _inputs((3, 5, 72), seed=5)
    out, expected = _run_both(x, weight, bias, shift)
    assert out.shape == (3, 5, 72)
    torch.testing.assert_close(out, expected, **FP32_TOLERANCE)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("dim", [72, 1152])
def test_layer_norm_low_precision(dtype, dim):
    x, weight, bias, shift = _inputs((LOW_PRECISION_ROWS, dim), seed=dim, dtype=dtype)
    out, expected = _run_both(x, weight, bias, shift)
    # One cast of a float32 result each: the outputs differ only where the statistics' last
    # float32 bits (or a fused multiply-add) move a value across a rounding boundary. Against
    # float64 the kernel is never off by more than torch's own error plus two ulps (two: near a
    # power of two the kernel's value may sit in the binade above torch's, whose ulp is half),
    # plus float32 rounding of the two terms w * x_hat and b, which is all that is left where
    # they cancel to almost 0 (outputs of 1e-7, whose ulp says nothing).
    exact = (out == expected).float().mean().item()
    assert exact >= 0.99, f"only {exact:.4f} of the values are bit-identical"
    x_hat = F.layer_norm(x.double() + shift.double(), (dim,), None, None, EPS)
    exact64 = x_hat * weight.double() + bias.double()
    terms = (x_hat * weight.double()).abs() + bias.double().abs()
    kernel_error = (out.double() - exact64).abs()
    torch_error = (expected.double() - exact64).abs()
    bound = torch_error + 2 * _ulp(expected).double() + 4 * torch.finfo(torch.float32).eps * terms
    assert (kernel_error <= bound).all()


def test_layer_norm_rejects_mismatched_inputs():
    x, weight, bias, shift = _inputs((4, 16), seed=3)
    with pytest.raises(ValueError, match="contiguous"):
        triton_norm.layer_norm(x[:, :8], weight[:8], bias[:8], EPS, shift[:8])
    with pytest.raises(ValueError, match="bias"):
        triton_norm.layer_norm(x, weight, bias[:8], EPS)
    with pytest.raises(ValueError, match="shift"):
        triton_norm.layer_norm(x, weight, bias, EPS, shift[None])
    with pytest.raises(ValueError, match="shift must be float32"):
        triton_norm.layer_norm(x, weight, bias, EPS, shift.half())
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        triton_norm.layer_norm(x.double(), weight, bias, EPS)


def _ulp(x: torch.Tensor) -> torch.Tensor:
    # spacing of x.dtype's values at |x|, as float32
    _, exponent = torch.frexp(x.float())
    info = torch.finfo(x.dtype)
    eps = torch.full_like(x, info.eps, dtype=torch.float32)
    # below the smallest normal, values are spaced evenly (subnormals: fp16 outputs near 0)
    return torch.clamp(torch.ldexp(eps, exponent - 1), min=info.smallest_normal * info.eps)
