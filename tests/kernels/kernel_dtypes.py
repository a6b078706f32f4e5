"""The low-precision dtypes the kernel tests take: float16 everywhere, bfloat16 on a GPU only."""

import pytest
import torch

LOW_PRECISION = [
    torch.float16,
    pytest.param(
        torch.bfloat16,
        marks=pytest.mark.skipif(
            not torch.cuda.is_available(),
            reason="the Triton interpreter truncates float32 -> bfloat16 casts",
        ),
    ),
]
