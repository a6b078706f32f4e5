"""The skinny Triton projection (decode steps of a few tokens) against torch.

Without a GPU it runs on Triton's interpreter in float32 at small sizes; with one, natively, and
the bf16 test uses the Gemma3-4B projection shapes with the tile configs the engine picks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from vlm_engine.kernels import (  # noqa: E402
    arrival,  # noqa: E402
    triton_activation,
    triton_linear,
)
from vlm_engine.kernels import linear as linear_module  # noqa: E402
from vlm_engine.kernels.activation import gelu_and_mul_ref  # noqa: E402
from vlm_engine.kernels.triton_linear import LinearConfig, skinny_linear  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
GEMMA3_4B = {
    "qkv": (4096, 2560),
    "o": (2560, 2048),
    "gate_up": (20480, 2560),
    "down": (2560, 10240),
}


@pytest.fixture(autouse=True)
def interpret_on_cpu(interpret):
    if not CUDA:
        interpret(triton_linear, triton_activation, arrival)


def _randn(*shape: int, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)


CONFIGS = [
    LinearConfig(block_n=8, block_k=64, split_k=1),
    LinearConfig(block_n=8, block_k=64, split_k=3),  # K slices of unequal tile counts
    LinearConfig(block_n=4, block_k=32, split_k=16),  # more splits than a slice has tiles
    LinearConfig(block_n=16, block_k=32, split_k=2, use_dot=True),
    LinearConfig(block_n=32, block_k=64, split_k=1, use_dot=True),
]


@pytest.mark.parametrize(
    ("config", "num_rows"),
    [(c, rows) for c in CONFIGS for rows in ((1, 2, 5, 16) if c.use_dot else (1, 2))],
    ids=lambda v: (
        v
        if isinstance(v, int)
        else f"n{v.block_n}k{v.block_k}s{v.split_k}" + ("dot" if v.use_dot else "")
    ),
)
@pytest.mark.parametrize(("n", "k"), [(40, 96), (20, 300), (64, 1024)])
def test_matches_torch(n, k, config, num_rows):
    gen = torch.Generator().manual_seed(n * 1000 + k + num_rows)
    x, w = _randn(num_rows, k, gen=gen), _randn(n, k, gen=gen) * k**-0.5  # outputs ~ N(0, 1)
    torch.testing.assert_close(skinny_linear(x, w, config=config), x @ w.T, rtol=1e-5, atol=1e-4)
    # as a fused gate/up projection: the activation applied in the epilogue
    torch.testing.assert_close(
        skinny_linear(x, w, act="gelu_mul", config=config),
        gelu_and_mul_ref(x @ w.T),
        rtol=1e-4,  # a product of two sums: both sums' rounding differences
        atol=1e-4,
    )


def test_split_sums_are_deterministic_and_leave_counters_at_zero():
    gen = torch.Generator().manual_seed(3)
    x, w = _randn(2, 640, gen=gen), _randn(48, 640, gen=gen)
    config = LinearConfig(block_n=8, block_k=32, split_k=8)
    first = skinny_linear(x, w, config=config)
    for _ in range(3):
        assert torch.equal(skinny_linear(x, w, config=config), first)
    assert not arrival.counter_buffer(DEVICE).any()
    # a split whose sum order differed would round differently somewhere in float32
    one_split = skinny_linear(x, w, config=LinearConfig(block_n=8, block_k=32, split_k=1))
    torch.testing.assert_close(one_split, first, rtol=1e-5, atol=1e-4)


def test_rejects_bad_inputs():
    gen = torch.Generator().manual_seed(5)
    w = _randn(8, 32, gen=gen)
    with pytest.raises(ValueError, match="at most"):
        skinny_linear(_randn(triton_linear.CUDA_CORE_MAX_ROWS + 1, 32, gen=gen), w)
    with pytest.raises(ValueError, match="at most"):
        dot = LinearConfig(block_n=16, block_k=32, use_dot=True)
        skinny_linear(_randn(triton_linear.MAX_ROWS + 1, 32, gen=gen), w, config=dot)
    with pytest.raises(ValueError, match="does not match"):
        skinny_linear(_randn(1, 31, gen=gen), w)
    with pytest.raises(ValueError, match="divisible"):
        skinny_linear(_randn(1, 32, gen=gen), _randn(6, 32, gen=gen), act="gelu_mul")
    with pytest.raises(ValueError, match="activation"):
        skinny_linear(_randn(1, 32, gen=gen), w, act="relu")
    with pytest.raises(ValueError, match="contiguous"):
        skinny_linear(_randn(1, 64, gen=gen)[:, ::2], w)


@pytest.mark.skipif(not CUDA, reason="bf16 at model sizes needs a GPU (the interpreter is slow)")
@pytest.mark.parametrize("num_rows", [1, 2, 4])
@pytest.mark.parametrize("name", list(GEMMA3_4B))
def test_gemma3_4b_shapes_bf16(name, num_rows):
    # The engine's configs, bf16 weights and activations: the float32 sum differs from a float64
    # reference only by float32 rounding, so the bf16 output is within one bf16 ulp of it.
    n, k = GEMMA3_4B[name]
    gen = torch.Generator().manual_seed(num_rows)
    w = (_randn(n, k, gen=gen) * 0.02).bfloat16()
    x = _randn(num_rows, k, gen=gen).bfloat16()
    layer = torch.nn.Linear(k, n, bias=False, device=DEVICE, dtype=torch.bfloat16)
    layer.weight.data.copy_(w)
    exact = x.double() @ w.double().T
    out = linear_module.linear(x, layer)
    ulp = torch.finfo(torch.bfloat16).eps * exact.abs().clamp_min(1e-3)
    assert ((out.double() - exact).abs() <= ulp).all()
    assert (out.float() - F.linear(x, w).float()).abs().max() <= 2 * ulp.max()
    if name == "gate_up":  # the activation in the epilogue rounds as gelu_and_mul on the output
        torch.testing.assert_close(
            linear_module.linear(x, layer, act="gelu_mul"), gelu_and_mul_ref(out), rtol=0, atol=0
        )


@pytest.mark.skipif(not CUDA, reason="which kernel a projection takes matters on a GPU only")
def test_dispatch_takes_the_skinny_kernel_for_few_rows(monkeypatch):
    calls = []
    monkeypatch.setattr(triton_linear, "skinny_linear", lambda *a, **kw: calls.append(a) or 0)
    layer = torch.nn.Linear(64, 32, bias=False, device=DEVICE)
    rows = linear_module.SKINNY_MAX_ROWS
    assert 1 <= rows <= triton_linear.MAX_ROWS
    linear_module.linear(torch.zeros(rows, 64, device=DEVICE), layer)
    assert len(calls) == 1
    out = linear_module.linear(torch.zeros(rows + 1, 64, device=DEVICE), layer)
    assert len(calls) == 1 and out.shape == (rows + 1, 32)


@pytest.mark.skipif(not CUDA, reason="the 262k-row LM head needs a GPU")
def test_tied_lm_head_takes_the_skinny_kernel():
    # More column blocks than arrival counters: fine without split-K. The head is an Embedding.
    vocab, hidden = 262_208, 2560
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    head = torch.nn.Embedding(vocab, hidden, device=DEVICE, dtype=torch.bfloat16)
    head.weight.data.normal_(0, 0.02, generator=gen)
    x = torch.randn(1, hidden, device=DEVICE, generator=gen).bfloat16()
    exact = x.double() @ head.weight.double().T
    out = linear_module.linear(x, head)
    ulp = torch.finfo(torch.bfloat16).eps * exact.abs().clamp_min(1e-3)
    assert ((out.double() - exact).abs() <= ulp).all()


@pytest.mark.parametrize("act", [None, "gelu_mul"])
@pytest.mark.parametrize(
    "config",
    [
        LinearConfig(block_n=4, block_k=64, split_k=2),
        LinearConfig(block_n=16, block_k=32, use_dot=True),
    ],
)
def test_float8_weights_with_their_scales(config, act):
    """An FP8 layer's decode step: float8 weights streamed, each output column times its scale,
    the activations as they are."""
    from vlm_engine.kernels.fp8 import quantize_weight

    num_rows = 3 if config.use_dot else 2
    weight, scale = quantize_weight(torch.randn(64, 96, device=DEVICE) * 0.1)
    x = torch.randn(num_rows, 96, device=DEVICE)
    out = skinny_linear(x, weight, act, config, scale)
    y = x @ (weight.float() * scale).T
    expected = y if act is None else gelu_and_mul_ref(y)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs its scales"):
        skinny_linear(x, weight, act, config)


@pytest.mark.parametrize("k", [96, 100])  # 100: a last K tile only partly inside the rows
@pytest.mark.parametrize("act", [None, "gelu_mul"])
def test_float8_weights_with_bf16_activations_beyond_float16_range(act, k):
    """The tensor-core kernel multiplies float8 weights with bf16 activations in float16, each
    row scaled by a power of two first: rows whose values float16 cannot hold (1e6, 1e-9) come
    out as exactly as ordinary ones."""
    from vlm_engine.kernels.fp8 import quantize_weight

    gen = torch.Generator().manual_seed(3)
    weight, scale = quantize_weight(_randn(64, k, gen=gen) * 0.1)
    x = _randn(3, k, gen=gen)
    x[0] *= 1e6  # float16 overflows at 65504
    x[1] *= 1e-9  # and flushes below 6e-8
    x = x.bfloat16()
    out = skinny_linear(x, weight, act, LinearConfig(block_n=16, block_k=32, use_dot=True), scale)
    exact = x.double() @ (weight.double() * scale.double()).T
    if act is not None:
        exact = gelu_and_mul_ref(exact.bfloat16()).double()
    assert torch.isfinite(out.float()).all()
    for row in range(3):  # each row within bf16 rounding of its own magnitude
        ulp = torch.finfo(torch.bfloat16).eps * exact[row].abs().max()
        assert (out[row].double() - exact[row]).abs().max() <= 2 * ulp, row
