"""A LayerNorm folded into the GEMM after it: `act(LayerNorm(x + shift) @ W^T + b)` from the rows'
statistics and x itself, without writing the normalized rows.

The SigLIP tower's second norm feeds fc1 (and its tanh-GELU). With t = x + shift and
LayerNorm(t) = (t - mean) * rstd * gamma + beta,

    LayerNorm(t) @ W^T + b = rstd * (x @ W'^T + d - mean * c) + e

where W' = W * gamma (each column of W scaled by its gamma, rounded to x's dtype once), c = the
sum of W' over its input dimension, d = W' @ shift and e = W @ beta + b: three float32 vectors
over the output columns (kernels/norm_linear.py builds them). So a pass that only reads x for
each row's mean and rstd (triton_norm.layer_norm_stats) and this GEMM replace the norm, which
read x and wrote a normalized copy that the GEMM then read.

The GEMM: persistent (one program per SM walks the output tiles, GROUP_M row tiles at a time so
that the programs running together share W's tiles in L2), TMA loads of x and W' into a
NUM_STAGES-deep ring that Triton pipelines, float32 accumulation; the epilogue applies the
statistics and the vectors, then tanh-GELU, and stores the tile as two half-width TMA stores (a
half-size staging buffer leaves shared memory for a fourth stage).

Numerics: the products are x's values times W's rounded gamma-scaled values, where the unfolded
path rounds the normalized x instead and multiplies by W: the same size of rounding error, on the
other factor. The mean is subtracted in float32 after the product (x @ W'^T and mean * c are
both large where a row's mean is large next to its spread; float32 keeps ~7 digits of them).
GELU's tanh is the GPU's tanh.approx.f32 (max relative error ~2^-11, below the bf16 output's
2^-8); under Triton's interpreter, which has no inline assembly, the same function is computed as
x * sigmoid(2u).

Only fc1 is folded: it is wide enough (4304 columns) for this GEMM to match cuBLAS, where the
q/k/v GEMM's 3456 columns are not (docs/kernels.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vlm_engine.kernels.platform import interpreted, num_sms

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # a triton without host-side TMA descriptors
    TensorDescriptor = None

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class NormLinearConfig:
    block_m: int = 128
    block_n: int = 256
    block_k: int = 64
    group_m: int = 8
    num_stages: int = 4
    num_warps: int = 8


# Small tiles for Triton's interpreter (CPU tests: several tiles in each dimension, several K
# steps) and for float32 on a GPU (tests only; the default's stages would not fit).
SMALL_CONFIG = NormLinearConfig(block_m=32, block_n=32, block_k=32, num_stages=2, num_warps=4)


@triton.jit
def _gelu_tanh(x, FAST_TANH: tl.constexpr):
    # 0.5 x (1 + tanh(u)), u = sqrt(2 / pi) (x + 0.044715 x^3): the tanh approximation of GELU
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2 / pi)
    if FAST_TANH:
        tanh = tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=f,f", [u], dtype=tl.float32, is_pure=True, pack=1
        )
        return 0.5 * x * (1.0 + tanh)
    return x / (1.0 + tl.exp2(-2.8853900817779268 * u))  # 0.5 (1 + tanh u) = sigmoid(2u)


@triton.jit
def norm_linear_kernel(
    x_desc,  # [M, K]: rows of the stream, less the shift
    w_desc,  # [N, K]: W'
    out_desc,  # [M, N], in blocks of [BLOCK_M, BLOCK_N / 2]
    stats_ptr,  # [M, 2] float32: each row's mean and rstd (of x + shift)
    col_sum_ptr,  # [N] float32: c
    shift_out_ptr,  # [N] float32: d
    offset_ptr,  # [N] float32: e
    M,
    N,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
    GELU: tl.constexpr,
    FAST_TANH: tl.constexpr,
    PRECISION: tl.constexpr,  # float32 inputs: "ieee", not TF32
):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    tiles_per_group = GROUP_M * num_pid_n
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=True):
        first_m = (tile // tiles_per_group) * GROUP_M
        group_rows = min(num_pid_m - first_m, GROUP_M)
        off_m = (first_m + tile % group_rows) * BLOCK_M
        off_n = ((tile % tiles_per_group) // group_rows) * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            w_tile = w_desc.load([off_n, k]).T
            acc = tl.dot(x_desc.load([off_m, k]), w_tile, acc, input_precision=PRECISION)

        rows = off_m + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        mean = tl.load(stats_ptr + rows * 2, mask=row_mask, other=0.0)
        rstd = tl.load(stats_ptr + rows * 2 + 1, mask=row_mask, other=0.0)
        cols = off_n + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        col_sum = tl.load(col_sum_ptr + cols, mask=col_mask, other=0.0)
        shift_out = tl.load(shift_out_ptr + cols, mask=col_mask, other=0.0)
        offset = tl.load(offset_ptr + cols, mask=col_mask, other=0.0)
        y = acc + shift_out[None, :] - mean[:, None] * col_sum[None, :]
        y = rstd[:, None] * y + offset[None, :]
        if GELU:
            y = _gelu_tanh(y, FAST_TANH)
        halves = tl.permute(tl.reshape(y, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
        left, right = tl.split(halves)
        out_desc.store([off_m, off_n], left.to(out_desc.dtype))
        out_desc.store([off_m, off_n + BLOCK_N // 2], right.to(out_desc.dtype))


def norm_linear(
    x: torch.Tensor,
    stats: torch.Tensor,
    weight: torch.Tensor,
    col_sum: torch.Tensor,
    shift_out: torch.Tensor,
    offset: torch.Tensor,
    gelu: bool,
    config: NormLinearConfig | None = None,
) -> torch.Tensor:
    """x: [M, K] contiguous; stats: [M, 2] float32 (mean, rstd of each row of x + shift);
    weight: W' [N, K] in x's dtype; col_sum, shift_out, offset: [N] float32 (c, d, e above).
    Returns a new [M, N] tensor in x's dtype. K and N must keep TMA's 16-byte row alignment."""
    if TensorDescriptor is None:
        raise RuntimeError("this triton has no TMA tensor descriptors")
    if x.dim() != 2 or not x.is_contiguous() or x.dtype not in DTYPES:
        raise ValueError(f"x must be a contiguous [M, K] float tensor, got {tuple(x.shape)}")
    num_rows, dim = x.shape
    out_dim = weight.shape[0]
    if weight.shape != (out_dim, dim) or weight.dtype != x.dtype or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous [N, {dim}] {x.dtype} tensor")
    if stats.shape != (num_rows, 2) or stats.dtype != torch.float32:
        raise ValueError(f"stats must be [{num_rows}, 2] float32, got {tuple(stats.shape)}")
    for name, vector in (("col_sum", col_sum), ("shift_out", shift_out), ("offset", offset)):
        if vector.shape != (out_dim,) or vector.dtype != torch.float32:
            raise ValueError(f"{name} must be [{out_dim}] float32, got {tuple(vector.shape)}")
    alignment = 16 // x.element_size()
    if dim % alignment or out_dim % alignment:
        raise ValueError(f"K ({dim}) and N ({out_dim}) must be multiples of {alignment}")
    out = torch.empty(num_rows, out_dim, dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return out
    in_interpreter = interpreted(norm_linear_kernel)
    small = in_interpreter or x.dtype == torch.float32
    cfg = config or (SMALL_CONFIG if small else NormLinearConfig())
    num_tiles = triton.cdiv(num_rows, cfg.block_m) * triton.cdiv(out_dim, cfg.block_n)
    # the interpreter: a few persistent programs, each taking several tiles
    sms = 4 if in_interpreter else num_sms(x.device.index or 0)
    num_programs = min(num_tiles, sms)
    norm_linear_kernel[(num_programs,)](
        TensorDescriptor.from_tensor(x, [cfg.block_m, cfg.block_k]),
        TensorDescriptor.from_tensor(weight, [cfg.block_n, cfg.block_k]),
        TensorDescriptor.from_tensor(out, [cfg.block_m, cfg.block_n // 2]),
        stats,
        col_sum,
        shift_out,
        offset,
        num_rows,
        out_dim,
        dim,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        NUM_PROGRAMS=num_programs,
        GELU=gelu,
        FAST_TANH=not in_interpreter,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_stages=cfg.num_stages,
        num_warps=cfg.num_warps,
    )
    return out
