"""The Triton vision-tower attention kernel against `vision_attention_ref`, and the dispatch.

Without CUDA the kernel runs in float32 on Triton's interpreter (the `interpret` fixture of
conftest.py), on small shapes and 16 x 16 tiles so that short sequences still span several query
and key tiles; with CUDA the same tests run natively, plus bf16/fp16 at the tower's shape.
"""

from __future__ import annotations

import pytest
import torch

from vlm_engine import envs
from vlm_engine.kernels import vision_attention
from vlm_engine.kernels.vision_attention import triton_flash, vision_attention_ref
from vlm_engine.kernels.vision_attention.triton_flash import VisionAttentionConfig, split_head_dim

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
SMALL_TILES = VisionAttentionConfig(block_m=16, block_n=16, num_warps=4, num_stages=2)
FP32_TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}

needs_triton = pytest.mark.skipif(triton_flash.triton is None, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device: bf16/fp16 run natively only")


@pytest.fixture
def kernel(interpret):
    """The kernel wrapper; without CUDA on Triton's interpreter (see conftest.py)."""
    if not CUDA:
        interpret(triton_flash)
    return triton_flash.vision_attention


def make_qkv(num_images, num_patches, num_heads, head_dim, *, dtype=torch.float32, seed=0):
    # [N, P, 3 * H * D], random (never zeros)
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(num_images, num_patches, 3 * num_heads * head_dim, generator=gen)
    return qkv.to(DEVICE, dtype)


def naive_attention(qkv, num_heads):
    # Per image and head, softmax(q k^T / sqrt(D)) v in float64, written into [N, P, H * D].
    head_dim = qkv.shape[-1] // (3 * num_heads)
    out = torch.empty(*qkv.shape[:2], num_heads * head_dim, dtype=torch.float64)
    x = qkv.double().cpu()
    for n in range(qkv.shape[0]):
        for h in range(num_heads):
            q, k, v = (x[n, :, (i * num_heads + h) * head_dim :][:, :head_dim] for i in range(3))
            probs = torch.softmax(q @ k.T * head_dim**-0.5, dim=-1)
            out[n, :, h * head_dim : (h + 1) * head_dim] = probs @ v
    return out


# --- the reference and the head-dim split (CPU, no triton needed) ---


@pytest.mark.parametrize(
    "num_images,num_patches,num_heads,head_dim", [(2, 9, 3, 8), (1, 20, 2, 72)]
)
def test_reference_is_attention_per_image_and_head(num_images, num_patches, num_heads, head_dim):
    qkv = make_qkv(num_images, num_patches, num_heads, head_dim).cpu()
    out = vision_attention_ref(qkv, num_heads)
    assert out.shape == (num_images, num_patches, num_heads * head_dim) and out.is_contiguous()
    torch.testing.assert_close(out.double(), naive_attention(qkv, num_heads), **FP32_TOLERANCE)


@pytest.mark.parametrize(
    "head_dim,parts",
    [(8, (16, 0)), (16, (16, 0)), (24, (16, 16)), (32, (32, 0)), (48, (32, 16)), (64, (64, 0)),
     (72, (64, 16)), (80, (64, 16)), (96, (64, 32)), (112, (64, 64)), (128, (128, 0))],
)  # fmt: skip
def test_split_head_dim(head_dim, parts):
    assert split_head_dim(head_dim) == parts


# --- the kernel against the reference ---

SHAPES = {  # num_patches -> (num_images, num_heads): every P in several tiles, small enough
    1: (3, 4),
    17: (3, 4),  # one full 16-tile and one key past it
    64: (3, 2),  # whole tiles: the unmasked key path
    100: (3, 1),
}


@needs_triton
@pytest.mark.parametrize("num_patches", list(SHAPES))
@pytest.mark.parametrize("head_dim", [16, 32, 64, 72])
def test_kernel_matches_reference(kernel, head_dim, num_patches):
    num_images, num_heads = SHAPES[num_patches]
    qkv = make_qkv(num_images, num_patches, num_heads, head_dim, seed=head_dim + num_patches)
    out = kernel(qkv, num_heads, config=SMALL_TILES)
    assert out.shape == (num_images, num_patches, num_heads * head_dim) and out.is_contiguous()
    torch.testing.assert_close(out, vision_attention_ref(qkv, num_heads), **FP32_TOLERANCE)


@needs_triton
@pytest.mark.parametrize("num_heads", [1, 2, 4])
@pytest.mark.parametrize("num_images", [1, 3])
def test_kernel_images_and_heads(kernel, num_images, num_heads):
    qkv = make_qkv(num_images, 17, num_heads, 72, seed=num_images * 10 + num_heads)
    out = kernel(qkv, num_heads, config=SMALL_TILES)
    torch.testing.assert_close(out, vision_attention_ref(qkv, num_heads), **FP32_TOLERANCE)


@needs_triton
@pytest.mark.parametrize("head_dim", [8, 24, 48, 96])
def test_kernel_other_head_dims(kernel, head_dim):
    # below 16 (a masked main part), and tails of 8, 16 and 32 lanes
    qkv = make_qkv(2, 23, 2, head_dim, seed=head_dim)
    out = kernel(qkv, 2, config=SMALL_TILES)
    torch.testing.assert_close(out, vision_attention_ref(qkv, 2), **FP32_TOLERANCE)


@needs_triton
@pytest.mark.parametrize(
    "config",
    [
        VisionAttentionConfig(block_m=16, block_n=16, load_k_transposed=True),
        VisionAttentionConfig(block_m=32, block_n=16, max_registers=128),
        VisionAttentionConfig(block_m=16, block_n=32, load_k_transposed=True),
        None,  # default_config
    ],
    ids=["k-transposed", "32x16-capped-registers", "16x32-k-transposed", "default"],
)
@pytest.mark.parametrize("num_patches", [64, 100])
def test_kernel_tile_configs(kernel, config, num_patches):
    qkv = make_qkv(1, num_patches, 2, 72, seed=num_patches)
    out = kernel(qkv, 2, config=config)
    torch.testing.assert_close(out, vision_attention_ref(qkv, 2), **FP32_TOLERANCE)


@needs_triton
@pytest.mark.parametrize("head_dim", [32, 72])
def test_kernel_float16(kernel, head_dim):
    # bf16 only natively: the interpreter's bf16 tl.dot is wrong (numpy has no bf16)
    qkv = make_qkv(2, 33, 2, head_dim, dtype=torch.float16, seed=head_dim)
    out = kernel(qkv, 2, config=SMALL_TILES)
    assert out.dtype == torch.float16
    expected = vision_attention_ref(qkv.float(), 2)
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=2e-3)


@needs_triton
def test_kernel_reads_strided_rows_in_place(kernel):
    # qkv as a column slice of a wider buffer (rows strided), poisoned around it
    num_images, num_patches, num_heads, head_dim = 2, 30, 2, 72
    qkv = make_qkv(num_images, num_patches, num_heads, head_dim, seed=5)
    wide = torch.full((num_images, num_patches, qkv.shape[-1] + 40), float("nan"), device=DEVICE)
    wide[..., 24 : 24 + qkv.shape[-1]] = qkv
    view = wide[..., 24 : 24 + qkv.shape[-1]]
    out = kernel(view, num_heads, config=SMALL_TILES)
    torch.testing.assert_close(out, vision_attention_ref(qkv, num_heads), **FP32_TOLERANCE)


@needs_triton
def test_kernel_empty_batch(kernel):
    out = kernel(make_qkv(0, 16, 2, 72), 2)
    assert out.shape == (0, 16, 144)


@needs_triton
@pytest.mark.parametrize("num_patches", [64, 72])
def test_redo_flagged_computes_exactly_the_flagged_blocks(kernel, num_patches):
    # flags in (image, head, block) order; only the flagged blocks' rows and head columns are
    # written, with the same result as the reference (72 patches: a last block of 8 rows)
    num_images, num_heads, head_dim, block = 2, 2, 72, 16
    qkv = make_qkv(num_images, num_patches, num_heads, head_dim, seed=5)
    expected = vision_attention_ref(qkv, num_heads)
    out = torch.full_like(expected, float("nan"))
    blocks = -(-num_patches // block)
    flags = torch.zeros(num_images * num_heads * blocks, dtype=torch.int32, device=DEVICE)
    chosen = [1, 2 * blocks + 3, len(flags) - 1]  # image 0 head 0; image 1 head 0; the last
    flags[chosen] = torch.tensor([1, 7, -2], dtype=torch.int32, device=DEVICE)

    triton_flash.redo_flagged(out, qkv, num_heads, flags, block)

    written = torch.zeros_like(out, dtype=torch.bool)
    for index in chosen:
        pair, b = divmod(index, blocks)
        image, head = divmod(pair, num_heads)
        written[image, b * block : (b + 1) * block, head * head_dim : (head + 1) * head_dim] = True
    torch.testing.assert_close(out[written], expected[written], **FP32_TOLERANCE)
    assert out[~written].isnan().all()
    with pytest.raises(ValueError, match="flags must be int32"):
        triton_flash.redo_flagged(out, qkv, num_heads, flags[1:], block)
    with pytest.raises(ValueError, match="flags must be int32"):
        triton_flash.redo_flagged(out, qkv, num_heads, flags.long(), block)
    with pytest.raises(ValueError, match="out must be"):
        triton_flash.redo_flagged(out[:, :, 1:], qkv, num_heads, flags, block)


# --- bf16 / fp16 at the tower's shape, and the dispatch ---


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_low_precision_at_tower_shape(dtype):
    num_heads, head_dim = 16, 72
    qkv = make_qkv(2, 4096, num_heads, head_dim, dtype=dtype, seed=1)
    out = triton_flash.vision_attention(qkv, num_heads)
    assert out.dtype == dtype and out.shape == (2, 4096, num_heads * head_dim)
    expected = vision_attention_ref(qkv.float(), num_heads)
    # bf16's 8-bit mantissa on outputs of ~0.1: a wrong head or tile is off by ~0.1
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=4e-3)


def _spy(monkeypatch) -> list:
    calls = []
    real = triton_flash.vision_attention

    def spy(qkv, num_heads, **kwargs):
        calls.append(qkv.dtype)
        return real(qkv, num_heads, **kwargs)

    monkeypatch.setattr(triton_flash, "vision_attention", spy)
    return calls


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dispatch_takes_kernel_on_gpu_when_enabled(monkeypatch, dtype):
    calls = _spy(monkeypatch)
    monkeypatch.setattr(envs.values, "vision_triton_attention", True)  # opt-in
    qkv = make_qkv(2, 256, 4, 72, dtype=dtype, seed=2)
    out = vision_attention.vision_attention(qkv, 4)
    assert calls == [dtype]
    expected = vision_attention_ref(qkv.float(), 4)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=4e-3)


@needs_cuda
def test_dispatch_keeps_reference_for_float32_and_when_disabled(monkeypatch):
    calls = _spy(monkeypatch)
    monkeypatch.setattr(envs.values, "vision_triton_attention", True)
    vision_attention.vision_attention(make_qkv(1, 64, 2, 72), 2)
    monkeypatch.setattr(envs.values, "vision_triton_attention", False)
    vision_attention.vision_attention(make_qkv(1, 64, 2, 72, dtype=torch.bfloat16), 2)
    assert calls == []


def test_dispatch_on_cpu_is_the_reference(monkeypatch):
    calls = _spy(monkeypatch)
    qkv = make_qkv(2, 10, 2, 72, dtype=torch.bfloat16).cpu()
    torch.testing.assert_close(
        vision_attention.vision_attention(qkv, 2), vision_attention_ref(qkv, 2), rtol=0, atol=0
    )
    assert calls == []


# --- errors ---


@pytest.mark.parametrize(
    "shape,num_heads,match",
    [
        ((10, 3 * 2 * 72), 2, "must be \\[num_images"),
        ((1, 10, 100), 4, "not 3 \\* num_heads \\* head_dim"),
        ((1, 10, 0), 1, "not 3 \\* num_heads \\* head_dim"),
        ((1, 10, 3 * 72), 0, "num_heads must be >= 1"),
    ],
)
def test_bad_shapes_raise(shape, num_heads, match):
    qkv = torch.randn(*shape)
    with pytest.raises(ValueError, match=match):
        vision_attention_ref(qkv, num_heads)
    if triton_flash.triton is not None:
        with pytest.raises(ValueError, match=match):
            triton_flash.vision_attention(qkv, num_heads)


@needs_triton
def test_bad_layouts_raise():
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        triton_flash.vision_attention(torch.ones(1, 4, 48, dtype=torch.int32), 1)
    transposed = torch.randn(1, 48, 4, device=DEVICE).transpose(1, 2)  # last stride 4
    with pytest.raises(ValueError, match="contiguous in its last dimension"):
        triton_flash.vision_attention(transposed, 1)


@needs_triton
def test_cpu_tensor_without_interpreter_raises():
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        triton_flash.vision_attention(torch.randn(1, 4, 48), 1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"block_m": 48}, "block_m must be a power of two >= 16"),
        ({"block_n": 8}, "block_n must be a power of two >= 16"),
        ({"num_warps": 3}, "num_warps"),
        ({"num_stages": 0}, "num_stages"),
        ({"max_registers": 300}, "max_registers"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VisionAttentionConfig(**kwargs)
