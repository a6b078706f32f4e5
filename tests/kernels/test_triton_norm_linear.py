"""A LayerNorm folded into the GEMM after it (kernels/norm_linear.py, triton_norm_linear.py) and
the row-statistics pass it reads (triton_norm.layer_norm_stats), against the unfolded float32
computation.

Without a GPU both kernels run on Triton's interpreter (the `interpret` fixture of conftest.py)
in float32 and float16 at small sizes, with tiles small enough that every dimension has several,
and partial ones; with one they run natively, and the bf16/fp16 test takes
the SigLIP tower's fc1 shape.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("triton")

from kernel_dtypes import LOW_PRECISION  # noqa: E402

from vlm_engine.kernels import norm_linear, triton_norm, triton_norm_linear  # noqa: E402
from vlm_engine.kernels.norm_linear import (  # noqa: E402
    fold_norm_linear,
    folds_norms,
    norm_linear_ref,
)

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
HOPPER = CUDA and torch.cuda.get_device_capability()[0] == 9


@pytest.fixture(autouse=True)
def interpret_on_cpu(interpret):
    if not CUDA:
        interpret(triton_norm, triton_norm_linear)


def _modules(dim: int, out_dim: int, seed: int, *, bias: bool = True, dtype=torch.float32):
    # a LayerNorm with weights around 1 and a nonzero bias, the linear layer after it
    torch.manual_seed(seed)
    norm = nn.LayerNorm(dim, eps=1e-6)
    linear = nn.Linear(dim, out_dim, bias=bias)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
        norm.bias.normal_(0.0, 0.3)
        linear.weight.normal_(0.0, dim**-0.5)
        if bias:
            linear.bias.normal_(0.0, 0.2)
    return norm.to(DEVICE, dtype), linear.to(DEVICE, dtype)


def _stream(rows: int, dim: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    # rows as a residual stream has them: off-centre, a few wide channels
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=gen) * 1.5 + torch.randn(dim, generator=gen)
    x[:, :3] *= 8
    return x.to(DEVICE, dtype)


def _shift(dim: int, seed: int) -> torch.Tensor:
    return (torch.randn(dim, generator=torch.Generator().manual_seed(seed)) * 0.5).to(DEVICE)


@pytest.mark.parametrize("with_shift", [False, True], ids=["plain", "shifted"])
def test_row_statistics_match_torch(with_shift):
    x = _stream(37, 72, seed=0)
    shift = _shift(72, seed=1) if with_shift else None
    before = x.clone()
    stats = triton_norm.layer_norm_stats(x, 1e-6, shift)
    assert torch.equal(x, before)
    t = x if shift is None else x + shift
    mean = t.mean(-1)
    rstd = torch.rsqrt(t.var(-1, unbiased=False) + 1e-6)
    torch.testing.assert_close(stats[:, 0], mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats[:, 1], rstd, rtol=1e-5, atol=1e-6)


# rows, K, N: one tile and less, partial tiles in every dimension (K not a multiple of the K
# step: TMA fills past the row with zeros), more tiles than persistent programs
SHAPES = [(5, 32, 32), (70, 72, 136), (129, 40, 96)]


@pytest.mark.parametrize("rows,dim,out_dim", SHAPES)
@pytest.mark.parametrize("gelu", [False, True], ids=["linear", "gelu"])
@pytest.mark.parametrize("with_shift", [False, True], ids=["plain", "shifted"])
def test_folded_matches_the_unfolded_computation(rows, dim, out_dim, gelu, with_shift):
    norm, linear = _modules(dim, out_dim, seed=rows)
    shift = _shift(dim, seed=2) if with_shift else None
    x = _stream(rows, dim, seed=3)
    folded = fold_norm_linear(norm, linear, shift)
    out = norm_linear.norm_linear(x, folded, gelu)
    assert out.shape == (rows, out_dim) and out.dtype == x.dtype
    torch.testing.assert_close(out, norm_linear_ref(x, norm, linear, shift, gelu), **_FP32)


# float32 end to end; the mean is subtracted after the product (cancellation in float32), and
# the products sum in another order
_FP32 = {"rtol": 2e-5, "atol": 2e-5}


def test_folded_linear_without_bias_and_leading_dimensions():
    norm, linear = _modules(48, 64, seed=7, bias=False)
    x = _stream(2 * 9, 48, seed=8).view(2, 9, 48)
    folded = fold_norm_linear(norm, linear)
    out = norm_linear.norm_linear(x, folded, gelu=False)
    assert out.shape == (2, 9, 64)
    torch.testing.assert_close(out, norm_linear_ref(x, norm, linear, None, False), **_FP32)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_folded_low_precision_is_as_close_as_the_unfolded_path(dtype):
    # The unfolded path rounds the normalized rows to the activation dtype, the folded one the
    # gamma-scaled weights: against the float32 computation, the folded output must be about as
    # close as the unfolded one (norm, then linear and GELU in the activation dtype).
    rows, dim, out_dim = (4096, 1152, 4304) if HOPPER else (64, 72, 96)
    norm, linear = _modules(dim, out_dim, seed=11, dtype=dtype)
    shift = _shift(dim, seed=12)
    x = _stream(rows, dim, seed=13, dtype=dtype)
    exact = norm_linear_ref(x, norm, linear, shift, gelu=True)
    h = F.layer_norm(x.float() + shift, (dim,), norm.weight.float(), norm.bias.float(), 1e-6)
    unfolded = F.gelu(linear(h.to(dtype)).float(), approximate="tanh").to(dtype)
    folded = norm_linear.norm_linear(x, fold_norm_linear(norm, linear, shift), gelu=True)
    assert folded.dtype == dtype
    err_folded = (folded.float() - exact).abs()
    err_unfolded = (unfolded.float() - exact).abs()
    assert err_folded.mean() <= 1.25 * err_unfolded.mean()
    assert err_folded.max() <= 2.0 * err_unfolded.max()


def test_fold_is_a_copy_of_the_weights():
    norm, linear = _modules(32, 32, seed=5)
    weights = [p.clone() for p in (*norm.parameters(), *linear.parameters())]
    folded = fold_norm_linear(norm, linear, _shift(32, seed=6))
    for before, after in zip(weights, (*norm.parameters(), *linear.parameters()), strict=True):
        assert torch.equal(before, after)
    assert folded.weight.data_ptr() != linear.weight.data_ptr()
    torch.testing.assert_close(folded.weight, linear.weight * norm.weight)


def test_bad_inputs_are_rejected():
    norm, linear = _modules(32, 32, seed=9)
    folded = fold_norm_linear(norm, linear)
    x = _stream(4, 32, seed=10)
    stats = triton_norm.layer_norm_stats(x, 1e-6)
    args = (folded.weight, folded.col_sum, folded.shift_out, folded.offset)
    with pytest.raises(ValueError, match="stats"):
        triton_norm_linear.norm_linear(x, stats[:3], *args, gelu=False)
    with pytest.raises(ValueError, match="weight"):
        triton_norm_linear.norm_linear(x, stats, folded.weight.half(), *args[1:], gelu=False)
    with pytest.raises(ValueError, match="contiguous"):
        triton_norm_linear.norm_linear(x.t(), stats, *args, gelu=False)
    odd = _stream(4, 30, seed=10).half()  # 60-byte rows: not TMA's 16-byte alignment
    norm, linear = _modules(30, 32, seed=9, dtype=torch.float16)
    folded = fold_norm_linear(norm, linear)
    with pytest.raises(ValueError, match="multiples"):
        norm_linear.norm_linear(odd, folded, gelu=False)
    with pytest.raises(ValueError, match="shift must be float32"):
        triton_norm.layer_norm_stats(x, 1e-6, torch.zeros(32, device=DEVICE, dtype=torch.half))


def test_no_rows():
    norm, linear = _modules(32, 48, seed=1)
    x = torch.empty(0, 32, device=DEVICE)
    assert norm_linear.norm_linear(x, fold_norm_linear(norm, linear), gelu=True).shape == (0, 48)


def test_where_the_fold_runs():
    assert not folds_norms(torch.device("cpu"), torch.bfloat16)
    if CUDA:
        cuda = torch.device("cuda")
        assert not folds_norms(cuda, torch.float32)
        assert folds_norms(cuda, torch.bfloat16) == HOPPER
