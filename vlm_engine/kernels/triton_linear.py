"""Triton `x @ W.T` for a few rows of x: the projections of a small decode step.

At batch 1 a decode step reads every weight once and does almost no arithmetic with it, so a
projection is a race to stream W through the SMs. A program owns BLOCK_N output columns and one
of SPLIT_K equal slices of the K dimension, so there are enough programs to keep every SM loading
even when N is small. Splits are summed without a second kernel: each program writes its float32
partial sums, counts itself in on a per-column-block counter, and the program that arrives last
adds the SPLIT_K partials in slice order and writes the output (then resets the counter for the
next call). The sum order is fixed by the config, so results do not depend on which program
finishes last.

Two kernels: `skinny_linear_kernel` multiplies on CUDA cores with whole W tiles in registers (one
or two rows of x: a decode step at batch 1), `skinny_linear_dot_kernel` on tensor cores with x
padded to 16 rows and the W loads pipelined (up to MAX_ROWS rows). Both can also
- apply the MLP's activation in their epilogue (`act="gelu_mul"`): W is a fused gate/up
  projection whose rows alternate ACT_GROUP gate rows and ACT_GROUP up rows
  (kernels/gate_up.py), so a program holds matching gate and up columns and writes
  `gelu_tanh(gate) * up`, rounded where the unfused modules round: no activation kernel;
- start while the kernel before them still runs (programmatic dependent launch, kernels/pdl.py):
  the CUDA-core kernel issues its first weight loads before it waits.

Accumulation is float32; products of bf16/fp16 inputs are exact in float32, so outputs differ
from cuBLAS only in the order of the additions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_engine.kernels.arrival import COUNTER_SLOTS, arrive_last, counter_buffer, reset
from vlm_engine.kernels.gate_up import GATE_UP_GROUP
from vlm_engine.kernels.pdl import pdl_options, pdl_wait
from vlm_engine.kernels.platform import interpreted, jit, tl, triton
from vlm_engine.kernels.triton_activation import gelu_tanh_mul

MAX_ROWS = 16  # rows of x the tensor-core kernel takes (the CUDA-core one: 2)
CUDA_CORE_MAX_ROWS = 2


@dataclass(frozen=True)
class LinearConfig:
    block_n: int = 4
    block_k: int = 1024
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 1
    use_dot: bool = False  # the tensor-core kernel


@jit
def _write_output(
    out_ptr,  # [T, N] or, with ACT_GELU_MUL, [T, N / 2]
    acc,  # [BLOCK_T, BLOCK_N] float32: this program's output columns (all K summed)
    rows,
    num_rows,
    pid_n,
    N,
    stride_out,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACT_GELU_MUL: tl.constexpr,
    ACT_GROUP: tl.constexpr,
    TANH_FROM_EXP: tl.constexpr,
):
    dtype = out_ptr.dtype.element_ty
    row_mask = rows < num_rows
    if ACT_GELU_MUL:
        # The block's columns alternate ACT_GROUP gate and ACT_GROUP up columns (the fused
        # weight's row order): round as the projection's output, then gelu(gate) * up.
        y = tl.reshape(acc.to(dtype), [BLOCK_T, BLOCK_N // (2 * ACT_GROUP), 2, ACT_GROUP])
        gate, up = tl.split(tl.permute(y, (0, 1, 3, 2)))
        half: tl.constexpr = BLOCK_N // 2
        h = gelu_tanh_mul(
            tl.reshape(gate, [BLOCK_T, half]), tl.reshape(up, [BLOCK_T, half]), dtype,
            TANH_FROM_EXP,
        )  # fmt: skip
        cols = pid_n * half + tl.arange(0, half)
        offsets = rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
        tl.store(out_ptr + offsets, h, mask=row_mask[:, None] & (cols < N // 2)[None, :])
    else:
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offsets = rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
        tl.store(out_ptr + offsets, acc.to(dtype), mask=row_mask[:, None] & (cols < N)[None, :])


@jit
def _finish(
    out_ptr,
    partial_ptr,
    counter_ptr,
    acc,
    rows,
    num_rows,
    pid_n,
    pid_k,
    N,
    stride_out,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
    ACT_GELU_MUL: tl.constexpr,
    ACT_GROUP: tl.constexpr,
    TANH_FROM_EXP: tl.constexpr,
):
    # One K slice: write the output. Several: leave the partial sums, and let the last program
    # of the column block add all slices in slice order and write the output.
    if SPLIT_K == 1:
        _write_output(
            out_ptr, acc, rows, num_rows, pid_n, N, stride_out, BLOCK_T, BLOCK_N, ACT_GELU_MUL,
            ACT_GROUP, TANH_FROM_EXP,
        )  # fmt: skip
    else:
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        tile = rows[:, None] * N + cols[None, :]
        mask = (rows < num_rows)[:, None] & (cols < N)[None, :]
        tl.store(partial_ptr + pid_k * BLOCK_T * N + tile, acc, mask=mask)
        if arrive_last(counter_ptr, pid_n, SPLIT_K):
            total = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
            for s in range(SPLIT_K):
                total += tl.load(
                    partial_ptr + s * BLOCK_T * N + tile, mask=mask, other=0.0,
                    cache_modifier=".cg",
                )  # fmt: skip
            _write_output(
                out_ptr, total, rows, num_rows, pid_n, N, stride_out, BLOCK_T, BLOCK_N,
                ACT_GELU_MUL, ACT_GROUP, TANH_FROM_EXP,
            )  # fmt: skip
            reset(counter_ptr, pid_n)


@jit
def _scaled(acc, scale_ptr, pid_n, N, BLOCK_N: tl.constexpr, HAS_SCALE: tl.constexpr):
    # float8 W: each output column times its row's scale (linear, so per K slice is the same)
    if HAS_SCALE:
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = acc * tl.load(scale_ptr + cols, mask=cols < N, other=0.0)[None, :]
    return acc


@jit
def _dot_f16(x, w, acc):
    """acc + x @ w.T on float16 tensor cores, for a float8 w and bf16 (or fp16) x: every float8
    value is a float16 one, and one conversion instruction makes two of them (bf16 has no such
    instruction). x is scaled per row by a power of two that puts its largest magnitude below
    2^14 (bf16's range is wider than float16's), so its values stay exact down to 2^-24 of
    that magnitude, and the tile's products are scaled back in float32, exactly."""
    xf = x.to(tl.float32)
    exponent = tl.max(tl.abs(xf), axis=1).to(tl.int32, bitcast=True) >> 23  # biased, >= 0
    row_scale = (tl.maximum(exponent - 13, 1) << 23).to(tl.float32, bitcast=True)
    xs = (xf * (1.0 / row_scale)[:, None]).to(tl.float16)
    return acc + tl.dot(xs, tl.trans(w.to(tl.float16))) * row_scale[:, None]


@jit
def _program_tile(
    x_ptr, w_ptr, pid_n, pid_k, N, K, k_per_split, stride_x, stride_w,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Program (pid_n, pid_k): rows of x, its W rows (output columns) and its K slice.
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_T)
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
    return rows, cols < N, k_begin, k_end, x_rows, w_rows


@jit
def skinny_linear_kernel(
    x_ptr,  # [T, K]
    w_ptr,  # [N, K]
    scale_ptr,  # [N] float32: W's per-row scales, read when HAS_SCALE (float8 W)
    out_ptr,  # [T, N] or, with ACT_GELU_MUL, [T, N / 2]
    partial_ptr,  # [SPLIT_K, BLOCK_T, N] float32, used when SPLIT_K > 1
    counter_ptr,  # [>= cdiv(N, BLOCK_N)] int32, zero between calls
    num_rows,
    N,
    K,
    k_per_split,
    stride_x,
    stride_w,
    stride_out,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    ACT_GELU_MUL: tl.constexpr,
    ACT_GROUP: tl.constexpr,
    TANH_FROM_EXP: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # CUDA-core products, for one or two rows: W tiles in registers, the next one loaded
    # before the current one is used.
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rows, col_mask, k_begin, k_end, x_rows, w_rows = _program_tile(
        x_ptr, w_ptr, pid_n, pid_k, N, K, k_per_split, stride_x, stride_w, BLOCK_T, BLOCK_N
    )

    # The first weight tile does not depend on the previous kernel: load it before waiting.
    ks = k_begin + tl.arange(0, BLOCK_K)
    w = tl.load(w_rows + ks[None, :], mask=col_mask[:, None] & (ks < k_end)[None, :], other=0.0)
    pdl_wait(USE_PDL)
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x_mask = (rows < num_rows)[:, None] & (ks < k_end)[None, :]
        x = tl.load(x_rows + ks[None, :], mask=x_mask, other=0.0).to(tl.float32)
        next_ks = ks + BLOCK_K
        next_mask = col_mask[:, None] & (next_ks < k_end)[None, :]
        w_next = tl.load(w_rows + next_ks[None, :], mask=next_mask, other=0.0)
        acc += tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        w = w_next
    acc = _scaled(acc, scale_ptr, pid_n, N, BLOCK_N, HAS_SCALE)
    _finish(
        out_ptr, partial_ptr, counter_ptr, acc, rows, num_rows, pid_n, pid_k, N, stride_out,
        BLOCK_T, BLOCK_N, SPLIT_K, ACT_GELU_MUL, ACT_GROUP, TANH_FROM_EXP,
    )  # fmt: skip


@jit
def skinny_linear_dot_kernel(
    x_ptr,  # [T, K]
    w_ptr,  # [N, K]
    scale_ptr,  # [N] float32: W's per-row scales, read when HAS_SCALE (float8 W)
    out_ptr,  # [T, N] or, with ACT_GELU_MUL, [T, N / 2]
    partial_ptr,  # [SPLIT_K, BLOCK_T, N] float32, used when SPLIT_K > 1
    counter_ptr,  # [>= cdiv(N, BLOCK_N)] int32, zero between calls
    num_rows,
    N,
    K,
    k_per_split,
    stride_x,
    stride_w,
    stride_out,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    ACT_GELU_MUL: tl.constexpr,
    ACT_GROUP: tl.constexpr,
    TANH_FROM_EXP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    F16_DOT: tl.constexpr,  # float8 W and 16-bit x: multiply in float16 (_dot_f16)
    USE_PDL: tl.constexpr,
):
    # Tensor cores, for up to 16 rows (x padded to BLOCK_T = 16): W streamed through the
    # software pipeline, num_stages tiles in flight per program.
    pdl_wait(USE_PDL)
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rows, col_mask, k_begin, k_end, x_rows, w_rows = _program_tile(
        x_ptr, w_ptr, pid_n, pid_k, N, K, k_per_split, stride_x, stride_w, BLOCK_T, BLOCK_N
    )
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < k_end
        x_mask = (rows < num_rows)[:, None] & k_mask[None, :]
        x = tl.load(x_rows + ks[None, :], mask=x_mask, other=0.0)  # zeros: _dot_f16's row max
        w = tl.load(w_rows + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        if F16_DOT:
            acc = _dot_f16(x, w, acc)
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=DOT_PRECISION)
    acc = _scaled(acc, scale_ptr, pid_n, N, BLOCK_N, HAS_SCALE)
    _finish(
        out_ptr, partial_ptr, counter_ptr, acc, rows, num_rows, pid_n, pid_k, N, stride_out,
        BLOCK_T, BLOCK_N, SPLIT_K, ACT_GELU_MUL, ACT_GROUP, TANH_FROM_EXP,
    )  # fmt: skip


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    act: str | None = None,
    config: LinearConfig | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x: [T, K] with T <= MAX_ROWS, weight: [N, K] -> x @ weight.T: [T, N]; with
    act="gelu_mul", weight is a fused gate/up projection and the result gelu(gate) * up: [T, N/2].
    A float8 weight comes with `scale` (float32, one per row, [N] or [N, 1]): x, in its own
    dtype, times the float8 values, each output column times its scale."""
    if act not in (None, "gelu_mul"):
        raise ValueError(f"unknown activation {act!r}")
    cfg = config or LinearConfig()
    num_rows = x.shape[0]
    n, k = weight.shape
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x {tuple(x.shape)} does not match weight {tuple(weight.shape)}")
    max_rows = MAX_ROWS if cfg.use_dot else CUDA_CORE_MAX_ROWS
    if num_rows > max_rows:
        raise ValueError(f"this kernel takes at most {max_rows} rows, got {num_rows}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("x and weight must be contiguous in their last dimension")
    if (scale is not None) != (weight.dtype == torch.float8_e4m3fn):
        raise ValueError("a float8 weight needs its scales, and only a float8 weight takes them")
    if scale is not None and scale.numel() != n:
        raise ValueError(f"{scale.numel()} scales for a weight of {n} rows")
    if act and (n % (2 * GATE_UP_GROUP) or cfg.block_n % (2 * GATE_UP_GROUP)):
        raise ValueError(f"gelu_mul needs N and block_n divisible by {2 * GATE_UP_GROUP}")
    out = torch.empty(num_rows, n // 2 if act else n, dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return out
    block_t = 16 if cfg.use_dot else triton.next_power_of_2(num_rows)
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    split_k = triton.cdiv(k, k_per_split)
    grid = (triton.cdiv(n, cfg.block_n), split_k)
    if split_k > 1 and grid[0] > COUNTER_SLOTS:  # one arrival counter per column block
        raise ValueError(f"N={n} needs more column blocks than the counter buffer holds")
    partials = (
        torch.empty(split_k, block_t, n, dtype=torch.float32, device=x.device)
        if split_k > 1
        else out
    )
    in_interpreter = interpreted(skinny_linear_kernel)
    kernel, extra = skinny_linear_kernel, {}
    if cfg.use_dot:
        kernel = skinny_linear_dot_kernel
        extra["DOT_PRECISION"] = "ieee" if x.dtype == torch.float32 else "tf32"
        extra["F16_DOT"] = scale is not None and x.dtype in (torch.bfloat16, torch.float16)
    kernel[grid](
        x, weight, scale if scale is not None else weight, out, partials, counter_buffer(x.device),
        num_rows, n, k, k_per_split, x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_T=block_t, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split_k,
        ACT_GELU_MUL=act == "gelu_mul", ACT_GROUP=GATE_UP_GROUP, TANH_FROM_EXP=in_interpreter,
        HAS_SCALE=scale is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False,
        **extra, **pdl_options(x.device),
    )  # fmt: skip
    return out
