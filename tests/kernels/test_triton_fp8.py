"""The fused per-token FP8 quantization kernel against `fp8.quantize_tokens`: the same float8
values and scales, bit for bit, in every activation dtype.

GPU only: Triton's interpreter rounds to float8 without carrying into the next power of two
(125.6 becomes 64, not 128), so on a CPU it cannot check the rounding; the engine runs this
kernel only on GPUs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from vlm_engine.kernels import triton_fp8  # noqa: E402
from vlm_engine.kernels.fp8 import quantize_tokens  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda")
pytestmark = pytest.mark.skipif(
    not CUDA, reason="needs a GPU: Triton's interpreter rounds to float8 without the carry"
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, k", [(1, 64), (5, 1000), (3, 2560)])
def test_equals_the_reference_bit_for_bit(dtype, rows, k):
    generator = torch.Generator().manual_seed(rows * k)
    x = (torch.randn(rows, k, generator=generator) * 3).to(DEVICE, dtype)
    x[0, :7] = 0.0
    if rows > 2:
        x[2] = 0.0  # a row of zeros gets the dtype's epsilon as its scale
    q, scale = triton_fp8.quantize_rows(x)
    ref_q, ref_scale = quantize_tokens(x)
    assert torch.equal(scale, ref_scale.float())
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


def test_rejects_a_strided_row():
    with pytest.raises(ValueError, match="contiguous"):
        triton_fp8.quantize_rows(torch.randn(4, 64, device=DEVICE)[:, ::2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_on_the_way_in_equals_gelu_then_the_reference(dtype):
    """The vision tower's fc2 input: gelu_tanh applied inside the quantization kernel gives the
    float8 values and scales of torch's gelu followed by the reference quantization."""
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(7)
    x = (torch.randn(9, 4304, generator=generator) * 3).to(DEVICE, dtype)
    q, scale = triton_fp8.quantize_rows(x, gelu=True)
    ref_q, ref_scale = quantize_tokens(F.gelu(x, approximate="tanh"))
    assert torch.equal(scale, ref_scale.float())
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))
