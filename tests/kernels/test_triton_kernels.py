"""Triton norm, rotary, KV-store and activation kernels against their torch references.

Without a GPU the kernels run on Triton's interpreter (numpy on the CPU) in float32, plus float16
at small sizes; with one, the same tests run natively and the bf16/fp16 tests use model sizes.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")


from kernel_dtypes import LOW_PRECISION  # noqa: E402

from vlm_engine.kernels import (  # noqa: E402
    triton_activation,
    triton_kv_store,
    triton_norm,
    triton_qk_norm_rope,
    triton_rotary,
)
from vlm_engine.kernels.activation import gelu_and_mul_ref  # noqa: E402
from vlm_engine.kernels.kv_store import store_kv_ref  # noqa: E402
from vlm_engine.kernels.norm import post_norm_residual_pre_norm_ref, rms_norm_ref  # noqa: E402
from vlm_engine.kernels.rotary import apply_rotary_ref, rope_cos_sin, rope_inv_freq  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
EPS = 1e-6
FP32_TOLERANCE = {"rtol": 2e-6, "atol": 2e-6}  # the sum of squares adds in another order
# (hidden sizes of Gemma3 1B/4B/27B, head_dim) on a GPU; small enough for the interpreter on CPU.
LOW_PRECISION_SIZES = {"num_tokens": 300, "hidden": (1152, 2560, 5376), "head_dim": (128, 256)}
if not CUDA:
    LOW_PRECISION_SIZES = {"num_tokens": 9, "hidden": (1152,), "head_dim": (256,)}


@pytest.fixture(autouse=True)
def interpret_on_cpu(interpret):
    """Without CUDA the kernels run on Triton's interpreter (see conftest.py)."""
    if not CUDA:
        interpret(
            triton_norm, triton_rotary, triton_kv_store, triton_activation, triton_qk_norm_rope
        )


def _randn(*shape: int, gen: torch.Generator, scale: float = 1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)


def _norm_weight(dim: int, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    # Gemma norm weights sit around 0, so the (1 + w) scale is what carries them.
    return _randn(dim, gen=gen, scale=0.5, dtype=dtype)


def _ulp(x: torch.Tensor) -> torch.Tensor:
    # Spacing of x.dtype's values at |x| (as float32).
    _, exponent = torch.frexp(x.float())
    return torch.ldexp(
        torch.full_like(x, torch.finfo(x.dtype).eps, dtype=torch.float32), exponent - 1
    )


def assert_equal_up_to_rounding(
    actual: torch.Tensor, expected: torch.Tensor, intermediate: torch.Tensor | None = None
) -> None:
    # Low precision: the kernels repeat the reference's roundings, so values are identical
    # except where the float32 result lies at a rounding boundary; there they are one ulp apart.
    # With an `intermediate` (a rounded value the result was computed from, such as the post-norm
    # output that is added to the residual), one ulp of it may also carry into the result.
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    exact = (actual == expected).float().mean().item()
    assert exact >= 0.99, f"only {exact:.4f} of the values are bit-identical"
    diff = (actual.float() - expected.float()).abs()
    bound = torch.maximum(_ulp(actual), _ulp(expected))
    if intermediate is not None:
        bound = torch.maximum(bound, _ulp(intermediate))
    assert (diff <= bound).all(), diff.max()


def _fused_qkv(num_tokens, num_heads, num_kv_heads, head_dim, gen, dtype=torch.float32):
    # q, k, v as strided views of one [T, (Hq + 2 Hk) * D] projection output, as a fused
    # qkv_proj gives them.
    widths = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    qkv = _randn(num_tokens, sum(widths), gen=gen, dtype=dtype)
    q, k, v = qkv.split(widths, dim=-1)
    heads = (num_heads, num_kv_heads, num_kv_heads)
    return qkv, [x.view(num_tokens, n, head_dim) for x, n in zip((q, k, v), heads, strict=True)]


# ---- RMSNorm ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [16, 64, 80, 256])
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
def test_rms_norm_rows(dim, num_tokens):
    gen = torch.Generator().manual_seed(dim * 100 + num_tokens)
    x = _randn(num_tokens, dim, gen=gen, scale=3.0)
    weight = _norm_weight(dim, gen)
    out = triton_norm.rms_norm(x, weight, EPS)
    torch.testing.assert_close(out, rms_norm_ref(x, weight, EPS), **FP32_TOLERANCE)


@pytest.mark.parametrize("head_dim", [16, 64, 256])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 1), (8, 2), (3, 3)])
def test_rms_norm_heads_of_fused_qkv(head_dim, num_heads, num_kv_heads):
    # q_norm / k_norm: rows are heads of strided [T, H, D] views.
    gen = torch.Generator().manual_seed(head_dim + num_heads)
    qkv, (q, k, _) = _fused_qkv(7, num_heads, num_kv_heads, head_dim, gen)
    before = qkv.clone()
    for x in (q, k):
        weight = _norm_weight(head_dim, gen)
        out = triton_norm.rms_norm(x, weight, EPS)
        assert out.shape == x.shape and out.is_contiguous()
        torch.testing.assert_close(out, rms_norm_ref(x, weight, EPS), **FP32_TOLERANCE)
    assert torch.equal(qkv, before)


@pytest.mark.parametrize("dim", [16, 64, 80, 256])
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
def test_post_norm_residual_pre_norm(dim, num_tokens):
    gen = torch.Generator().manual_seed(dim * 1000 + num_tokens)
    h = _randn(num_tokens, dim, gen=gen, scale=4.0)
    residual = _randn(num_tokens, dim, gen=gen)
    post_weight, pre_weight = _norm_weight(dim, gen), _norm_weight(dim, gen)
    new_residual, normed = triton_norm.post_norm_residual_pre_norm(
        h, residual, post_weight, pre_weight, EPS
    )
    ref_residual, ref_normed = post_norm_residual_pre_norm_ref(
        h, residual, post_weight, pre_weight, EPS
    )
    torch.testing.assert_close(new_residual, ref_residual, **FP32_TOLERANCE)
    torch.testing.assert_close(normed, ref_normed, **FP32_TOLERANCE)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_norms_low_precision(dtype):
    gen = torch.Generator().manual_seed(11)
    num_tokens = LOW_PRECISION_SIZES["num_tokens"]
    for dim in LOW_PRECISION_SIZES["hidden"]:
        h = _randn(num_tokens, dim, gen=gen, scale=8.0, dtype=dtype)
        residual = _randn(num_tokens, dim, gen=gen, scale=30.0, dtype=dtype)
        post, pre = _norm_weight(dim, gen, dtype), _norm_weight(dim, gen, dtype)
        out = triton_norm.rms_norm(h, post, EPS)
        assert_equal_up_to_rounding(out, rms_norm_ref(h, post, EPS))
        new_residual, normed = triton_norm.post_norm_residual_pre_norm(h, residual, post, pre, EPS)
        ref_residual, _ = post_norm_residual_pre_norm_ref(h, residual, post, pre, EPS)
        # residual + post_norm(h): a one-ulp flip of the norm output survives the add where
        # the sum is smaller than the norm output (the residual cancels it).
        assert_equal_up_to_rounding(new_residual, ref_residual, rms_norm_ref(h, post, EPS))
        # The second norm reads the kernel's own rounded sum: a one-ulp flip there moves the
        # normed value by more than one of its ulps, so each step is checked on its own inputs.
        assert_equal_up_to_rounding(normed, rms_norm_ref(new_residual, pre, EPS))
    for head_dim in LOW_PRECISION_SIZES["head_dim"]:
        _, (q, _, _) = _fused_qkv(num_tokens, 16, 8, head_dim, gen, dtype)
        weight = _norm_weight(head_dim, gen, dtype)
        assert_equal_up_to_rounding(
            triton_norm.rms_norm(q, weight, EPS), rms_norm_ref(q, weight, EPS)
        )


# ---- Rotary -------------------------------------------------------------------------------------


def _check_rotary(num_tokens, num_heads, num_kv_heads, head_dim, dtype, gen, theta, scaling):
    # -> (q, expected q), (k, expected k) after rotating q and k, strided views of a fused qkv.
    _, (q, k, v) = _fused_qkv(num_tokens, num_heads, num_kv_heads, head_dim, gen, dtype)
    positions = torch.randint(0, 40_000, (num_tokens,), generator=gen).to(DEVICE)
    inv_freq = rope_inv_freq(head_dim, theta, scaling, DEVICE)
    cos, sin = rope_cos_sin(positions, inv_freq, dtype)
    expected_q, expected_k = apply_rotary_ref(q, cos, sin), apply_rotary_ref(k, cos, sin)
    v_before = v.clone()
    triton_rotary.apply_rotary_(q, k, positions, inv_freq)
    assert torch.equal(v, v_before)
    return (q, expected_q), (k, expected_k)


@pytest.mark.parametrize("head_dim", [16, 64, 80, 256])
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 1), (8, 2), (24, 20)])
def test_rotary(head_dim, num_tokens, num_heads, num_kv_heads):
    gen = torch.Generator().manual_seed(head_dim * 100 + num_tokens + num_heads)
    # Sliding layers' RoPE (base 1e4) and full layers' (base 1e6, linear scaling x8).
    theta, scaling = (1e4, 1.0) if num_tokens % 2 else (1e6, 8.0)
    for actual, expected in _check_rotary(
        num_tokens, num_heads, num_kv_heads, head_dim, torch.float32, gen, theta, scaling
    ):
        torch.testing.assert_close(actual, expected, **FP32_TOLERANCE)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_rotary_low_precision(dtype):
    gen = torch.Generator().manual_seed(13)
    num_tokens = LOW_PRECISION_SIZES["num_tokens"]
    for head_dim in LOW_PRECISION_SIZES["head_dim"]:
        for theta, scaling in ((1e4, 1.0), (1e6, 8.0)):
            pairs = _check_rotary(num_tokens, 16, 8, head_dim, dtype, gen, theta, scaling)
            for actual, expected in pairs:
                assert_equal_up_to_rounding(actual, expected)


# ---- KV store -----------------------------------------------------------------------------------


def _check_store_kv(num_tokens, num_kv_heads, head_dim, dtype, gen):
    block_size, num_blocks = 16, 8
    _, (_, key, value) = _fused_qkv(num_tokens, 2, num_kv_heads, head_dim, gen, dtype)
    # Cache filled with random values: a write to a wrong slot or a padding token shows up.
    cache = _randn(2, num_blocks, block_size, num_kv_heads, head_dim, gen=gen, dtype=dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[torch.rand(num_tokens, generator=gen) < 0.3] = -1
    slot_mapping = slots.to(DEVICE)
    expected = cache.clone()
    store_kv_ref(key, value, expected, slot_mapping)
    triton_kv_store.store_kv(key, value, cache, slot_mapping)
    assert torch.equal(cache, expected)
    return slot_mapping


@pytest.mark.parametrize("head_dim", [16, 64, 80, 256])
@pytest.mark.parametrize("num_kv_heads", [1, 4, 20])
def test_store_kv(head_dim, num_kv_heads):
    gen = torch.Generator().manual_seed(head_dim + num_kv_heads)
    slot_mapping = _check_store_kv(33, num_kv_heads, head_dim, torch.float32, gen)
    assert (slot_mapping < 0).any() and (slot_mapping >= 0).any()


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_store_kv_low_precision(dtype):
    gen = torch.Generator().manual_seed(17)
    for head_dim in LOW_PRECISION_SIZES["head_dim"]:
        _check_store_kv(LOW_PRECISION_SIZES["num_tokens"] // 3, 8, head_dim, dtype, gen)


def test_store_kv_casts_to_the_cache_dtype():
    gen = torch.Generator().manual_seed(19)
    key, value = _randn(5, 2, 16, gen=gen), _randn(5, 2, 16, gen=gen)
    cache = _randn(2, 2, 4, 2, 16, gen=gen, dtype=torch.float16)
    slot_mapping = torch.tensor([3, -1, 0, 7, 5], device=DEVICE)
    expected = cache.clone()
    store_kv_ref(key, value, expected, slot_mapping)
    triton_kv_store.store_kv(key, value, cache, slot_mapping)
    assert torch.equal(cache, expected)


# ---- q/k norms + rotary + KV store in one kernel -------------------------------------------------


def _check_qk_norm_rope(num_tokens, num_heads, num_kv_heads, head_dim, dtype, gen, with_cache):
    # -> [(actual, expected, the rounded norm output it was computed from)] for q, k and the cache
    _, (q, k, v) = _fused_qkv(num_tokens, num_heads, num_kv_heads, head_dim, gen, dtype)
    q_weight, k_weight = _norm_weight(head_dim, gen), _norm_weight(head_dim, gen)
    positions = torch.randint(0, 40_000, (num_tokens,), generator=gen).to(DEVICE)
    theta, scaling = (1e4, 1.0) if num_tokens % 2 else (1e6, 8.0)
    inv_freq = rope_inv_freq(head_dim, theta, scaling, DEVICE)
    cos, sin = rope_cos_sin(positions, inv_freq, dtype)
    normed_q, normed_k = rms_norm_ref(q, q_weight, EPS), rms_norm_ref(k, k_weight, EPS)
    expected_q = apply_rotary_ref(normed_q, cos, sin)
    expected_k = apply_rotary_ref(normed_k, cos, sin)
    cache = slot_mapping = None
    if with_cache:
        block_size, num_blocks = 4, -(-2 * num_tokens // 4)
        cache = _randn(2, num_blocks, block_size, num_kv_heads, head_dim, gen=gen, dtype=dtype)
        distinct = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
        slots = distinct.masked_fill(torch.rand(num_tokens, generator=gen) < 0.3, -1)
        slots[0], slots[-1] = distinct[0], -1  # at least one written and one padding token
        slot_mapping = slots.to(DEVICE)
        expected_cache = cache.clone()
        store_kv_ref(expected_k, v, expected_cache, slot_mapping)
    q_out, k_out = triton_qk_norm_rope.qk_norm_rope_store(
        q, k, v, q_weight, k_weight, EPS, positions, inv_freq, cache, slot_mapping
    )
    assert q_out.is_contiguous() and k_out.is_contiguous()
    pairs = [(q_out, expected_q, normed_q)]
    if with_cache:
        valid = slot_mapping >= 0  # a padding token's k is left unwritten
        pairs += [(k_out[valid], expected_k[valid], normed_k[valid])]
        # The cache holds exactly the kernel's k, and v as it is; padding slots are untouched.
        kv = torch.stack([torch.zeros_like(expected_k), v])
        kv[0, valid] = k_out[valid]
        written = cache.clone()
        store_kv_ref(kv[0], kv[1], written, slot_mapping)
        assert torch.equal(cache, written)
        pairs += [(cache, expected_cache, torch.cat([normed_k, v]))]
    else:
        pairs += [(k_out, expected_k, normed_k)]
    return pairs


@pytest.mark.parametrize("head_dim", [16, 64, 80, 256])
@pytest.mark.parametrize("num_tokens", [1, 7])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 1), (8, 2)])
@pytest.mark.parametrize("with_cache", [True, False], ids=["cache", "no-cache"])
def test_qk_norm_rope_store(head_dim, num_tokens, num_heads, num_kv_heads, with_cache):
    if with_cache and num_tokens == 1:
        num_tokens = 5  # room for both a written and a padding token
    gen = torch.Generator().manual_seed(head_dim * 10 + num_tokens + num_heads)
    for actual, expected, _ in _check_qk_norm_rope(
        num_tokens, num_heads, num_kv_heads, head_dim, torch.float32, gen, with_cache
    ):
        torch.testing.assert_close(actual, expected, **FP32_TOLERANCE)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_qk_norm_rope_store_low_precision(dtype):
    gen = torch.Generator().manual_seed(23)
    num_tokens = LOW_PRECISION_SIZES["num_tokens"]
    for head_dim in LOW_PRECISION_SIZES["head_dim"]:
        pairs = _check_qk_norm_rope(num_tokens, 8, 4, head_dim, dtype, gen, with_cache=True)
        for actual, expected, normed in pairs:
            # A norm output one ulp off (float32 statistics) carries into the rotation.
            diff = (actual.float() - expected.float()).abs()
            bound = 2 * torch.maximum(_ulp(expected), _ulp(normed).amax())
            assert (actual == expected).float().mean() >= 0.99
            assert (diff <= bound).all(), diff.max()


# ---- gelu_tanh(gate) * up --------------------------------------------------------------------


@pytest.mark.parametrize("intermediate", [16, 80, 1100])
@pytest.mark.parametrize("num_tokens", [1, 5])
def test_gelu_and_mul(intermediate, num_tokens):
    gen = torch.Generator().manual_seed(intermediate + num_tokens)
    gate_up = _randn(num_tokens, 2 * intermediate, gen=gen, scale=3.0)
    out = triton_activation.gelu_and_mul(gate_up)
    assert out.shape == (num_tokens, intermediate) and out.is_contiguous()
    # On a GPU tanh is the same tanhf as torch's; the interpreter's exp form differs by ulps of
    # 1 + tanh(y), which is large relative error where gelu is tiny (very negative gates).
    tolerance = FP32_TOLERANCE if CUDA else {"rtol": 2e-6, "atol": 1e-5}
    torch.testing.assert_close(out, gelu_and_mul_ref(gate_up), **tolerance)


@pytest.mark.skipif(not CUDA, reason="bit-level agreement needs libdevice's tanhf (GPU only)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gelu_and_mul_low_precision(dtype):
    gen = torch.Generator().manual_seed(29)
    intermediate = 10240
    gate_up = _randn(LOW_PRECISION_SIZES["num_tokens"], 2 * intermediate, gen=gen, scale=3.0)
    gate_up = gate_up.to(dtype)
    assert_equal_up_to_rounding(triton_activation.gelu_and_mul(gate_up), gelu_and_mul_ref(gate_up))


# ---- Wrappers -----------------------------------------------------------------------------------


def test_wrappers_reject_mismatched_inputs():
    gen = torch.Generator().manual_seed(23)
    x = _randn(4, 8, 16, gen=gen)
    with pytest.raises(ValueError, match="weight"):
        triton_norm.rms_norm(x, _randn(8, gen=gen), EPS)
    with pytest.raises(ValueError, match="last dimension"):
        triton_norm.rms_norm(x.transpose(1, 2), _randn(8, gen=gen), EPS)
    with pytest.raises(ValueError, match="residual"):
        triton_norm.post_norm_residual_pre_norm(
            x[0], x[1:, 0], _randn(16, gen=gen), _randn(16, gen=gen), EPS
        )
    positions = torch.arange(4, device=DEVICE)
    inv_freq = rope_inv_freq(16, 1e4, 1.0, DEVICE)
    with pytest.raises(ValueError, match="positions"):
        triton_rotary.apply_rotary_(x, x[:, :2], positions.float(), inv_freq)
    with pytest.raises(ValueError, match="inv_freq"):
        triton_rotary.apply_rotary_(x, x[:, :2], positions, inv_freq.double())
    cache = _randn(2, 2, 4, 8, 16, gen=gen)
    with pytest.raises(ValueError, match="kv_cache"):
        triton_kv_store.store_kv(x, x, cache[:, :, :, :4], positions)
    with pytest.raises(ValueError, match="slot_mapping"):
        triton_kv_store.store_kv(x, x, cache, positions[:3])
    with pytest.raises(ValueError, match="gate_up"):
        triton_activation.gelu_and_mul(x[:, :, :15].reshape(4, -1)[:, :15])
