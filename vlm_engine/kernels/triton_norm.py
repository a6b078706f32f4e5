"""Triton RMSNorm with Gemma numerics, the fused residual step between two decoder norms, and
the SigLIP tower's LayerNorm, which can add a float32 vector to its input first.

Both follow `rms_norm_ref`: float32 statistics, a float32 scale by (1 + weight), one cast to the
activation dtype at the end. A program normalizes a tile of BLOCK_ROWS rows x BLOCK_D columns;
short rows (q_norm/k_norm over head_dim) share a program, hidden-size rows get one each.

Where results can differ from the torch reference: only the float32 statistics. The sum of
squares adds in a different order (and rsqrt and the mean's 1 / dim follow torch's CUDA kernels,
not its CPU ones), so rsqrt(mean + eps) can move by a few float32 ulp. Everything else is the same
sequence of roundings (fp contraction into FMAs is turned off so that float32 products are rounded
as torch rounds them), and the fused step rounds exactly where the unfused modules do. In
bf16/fp16 an output can therefore move by one ulp of the activation dtype, only where its float32
value sits next to a rounding boundary; in the fused step such a flip in the new residual then
feeds the second norm, as it would with the unfused Triton norm.

The LayerNorm follows torch's: float32 mean and biased variance, eps inside the rsqrt, one cast
at the end; its statistics are computed in two passes over the row held in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlm_engine.kernels.pdl import pdl_options, pdl_wait

ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TILE_ELEMENTS = 4096  # elements of one tensor a program holds at once when rows are short
_MAX_ROWS_PER_PROGRAM = 16


@triton.jit
def _gemma_rms_scale(x, weight_plus_one, inv_dim, eps):
    # x: [BLOCK_ROWS, BLOCK_D] float32, padding columns 0; weight_plus_one: [BLOCK_D] float32.
    # Same order as rms_norm_ref: (x * rsqrt(mean(x^2) + eps)) * (1 + w); torch's CUDA mean is
    # the sum times float32(1 / dim).
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) * inv_dim + eps)
    return x * rstd[:, None] * weight_plus_one[None, :]


@triton.jit
def _row_block(num_rows, dim, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    # this program's rows and columns of a [num_rows, dim] tensor, the column and element masks
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < dim
    return rows, cols, col_mask, (rows < num_rows)[:, None] & col_mask[None, :]


# num_rows changes every step: not specializing on it saves recompiles (and CUDA-graph warmups).
@triton.jit(do_not_specialize=["num_rows"])
def rms_norm_kernel(
    x_ptr,
    weight_ptr,
    out_ptr,
    num_rows,
    num_heads,
    stride_token,
    stride_head,
    dim,
    inv_dim,
    eps,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # Row r of the flattened [num_tokens * num_heads, dim] view is x[r // num_heads, r % num_heads].
    rows, cols, col_mask, mask = _row_block(num_rows, dim, BLOCK_ROWS, BLOCK_D)
    weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    pdl_wait(USE_PDL)  # the weight is older than the kernel before: read before waiting
    x_rows = (rows // num_heads) * stride_token + (rows % num_heads) * stride_head
    x = tl.load(x_ptr + x_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out = _gemma_rms_scale(x, 1.0 + weight, inv_dim, eps)
    out_offsets = rows[:, None] * dim + cols[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["num_rows"])
def post_norm_residual_pre_norm_kernel(
    h_ptr,
    residual_ptr,
    post_weight_ptr,
    pre_weight_ptr,
    new_residual_ptr,
    normed_ptr,
    num_rows,
    stride_h,
    stride_residual,
    dim,
    inv_dim,
    eps,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    dtype = new_residual_ptr.dtype.element_ty
    rows, cols, col_mask, mask = _row_block(num_rows, dim, BLOCK_ROWS, BLOCK_D)
    post_weight = tl.load(post_weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    pre_weight = tl.load(pre_weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    # Only h is the previous kernel's output (residual was written two or more kernels back,
    # finished once the previous kernel's programs all waited: kernels/pdl.py).
    residual = tl.load(
        residual_ptr + rows[:, None] * stride_residual + cols[None, :], mask=mask, other=0.0,
        cache_modifier=".cg",
    )  # fmt: skip
    pdl_wait(USE_PDL)
    h = tl.load(h_ptr + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0)
    # torch: `residual + post_norm(h)` -- the norm output is cast to the activation dtype, then
    # the add computes in float32 and rounds once more. The pre-norm reads the rounded sum.
    post = _gemma_rms_scale(h.to(tl.float32), 1.0 + post_weight, inv_dim, eps).to(dtype)
    new_residual = (residual.to(tl.float32) + post.to(tl.float32)).to(dtype)
    normed = _gemma_rms_scale(new_residual.to(tl.float32), 1.0 + pre_weight, inv_dim, eps)
    out_offsets = rows[:, None] * dim + cols[None, :]
    tl.store(new_residual_ptr + out_offsets, new_residual, mask=mask)
    tl.store(normed_ptr + out_offsets, normed.to(dtype), mask=mask)


@triton.jit(do_not_specialize=["num_rows"])
def layer_norm_kernel(
    x_ptr,
    weight_ptr,
    bias_ptr,
    shift_ptr,
    out_ptr,
    num_rows,
    dim,
    inv_dim,
    eps,
    HAS_SHIFT: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    dtype = x_ptr.dtype.element_ty
    rows, cols, col_mask, mask = _row_block(num_rows, dim, BLOCK_ROWS, BLOCK_D)
    weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    pdl_wait(USE_PDL)
    offsets = rows[:, None] * dim + cols[None, :]
    centered, _, rstd = _layer_norm_rows(
        x_ptr + offsets, shift_ptr + cols, mask, col_mask, inv_dim, eps, HAS_SHIFT
    )
    out = centered * rstd[:, None] * weight[None, :] + bias[None, :]  # torch's order
    tl.store(out_ptr + offsets, out.to(dtype), mask=mask)


@triton.jit
def _layer_norm_rows(x_ptrs, shift_ptrs, mask, col_mask, inv_dim, eps, HAS_SHIFT: tl.constexpr):
    # -> (x + shift - mean, zero in padding columns; mean; rstd), float32, two passes over the
    # rows held in registers. The shift is written just before the tower's first norm: the
    # caller reads it after its PDL wait.
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        x += tl.load(shift_ptrs, mask=col_mask, other=0.0)[None, :]
    mean = tl.sum(x, axis=1) * inv_dim
    centered = tl.where(mask, x - mean[:, None], 0.0)  # padding columns must not count
    rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) * inv_dim + eps)
    return centered, mean, rstd


@triton.jit(do_not_specialize=["num_rows"])
def layer_norm_stats_kernel(
    x_ptr,
    shift_ptr,
    stats_ptr,  # [num_rows, 2] float32: mean, rstd
    num_rows,
    dim,
    inv_dim,
    eps,
    HAS_SHIFT: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    rows, cols, col_mask, mask = _row_block(num_rows, dim, BLOCK_ROWS, BLOCK_D)
    pdl_wait(USE_PDL)
    _, mean, rstd = _layer_norm_rows(
        x_ptr + rows[:, None] * dim + cols[None, :],
        shift_ptr + cols,
        mask,
        col_mask,
        inv_dim,
        eps,
        HAS_SHIFT,
    )
    row_mask = rows < num_rows
    tl.store(stats_ptr + rows * 2, mean, mask=row_mask)
    tl.store(stats_ptr + rows * 2 + 1, rstd, mask=row_mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma RMSNorm over the last dimension of x: [N, D] or [N, H, D] -> a new contiguous tensor.

    The last dimension must be contiguous; tokens and heads may be strided (q sliced from a fused
    qkv projection). weight: [D], any float dtype; it is used as float32 (1 + weight).
    """
    if x.dim() not in (2, 3):
        raise ValueError(f"rms_norm takes x of shape [N, D] or [N, H, D], got {tuple(x.shape)}")
    _check_rows(x, "x")
    _check_weight(weight, x, "weight")
    num_tokens, dim = x.shape[0], x.shape[-1]
    num_heads, stride_head = (x.shape[1], x.stride(1)) if x.dim() == 3 else (1, 0)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    num_rows = num_tokens * num_heads
    if num_rows == 0:
        return out
    block_rows, block_d, num_warps = _row_tiling(dim)
    grid = (triton.cdiv(num_rows, block_rows),)
    rms_norm_kernel[grid](
        x,
        weight,
        out,
        num_rows,
        num_heads,
        x.stride(0),
        stride_head,
        dim,
        1.0 / dim,
        eps,
        BLOCK_ROWS=block_rows,
        BLOCK_D=block_d,
        **pdl_options(x.device),
        num_warps=num_warps,
        enable_fp_fusion=False,
    )
    return out


def post_norm_residual_pre_norm(
    h: torch.Tensor,
    residual: torch.Tensor,
    post_weight: torch.Tensor,
    pre_weight: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One residual step of a Gemma decoder layer in a single pass over the rows.

    h, residual: [N, D] (rows may be strided, the last dimension contiguous).
    Returns (new_residual, normed), both new [N, D] tensors:
        new_residual = residual + rms_norm(h, post_weight)   (the add in the activation dtype)
        normed = rms_norm(new_residual, pre_weight)
    It covers post_attention_layernorm -> add -> pre_feedforward_layernorm, and
    post_feedforward_layernorm -> add -> the next layer's input_layernorm (or the final norm).
    With PDL the kernel reads `residual` before waiting on the kernel launched just before it,
    so `residual` must come from an earlier one (in a decoder layer it always does).
    """
    if h.dim() != 2 or h.shape != residual.shape:
        raise ValueError(
            f"h and residual must both be [N, D], got {tuple(h.shape)} and {tuple(residual.shape)}"
        )
    if residual.dtype != h.dtype or residual.device != h.device:
        raise ValueError("h and residual must share dtype and device")
    _check_rows(h, "h")
    _check_rows(residual, "residual")
    _check_weight(post_weight, h, "post_weight")
    _check_weight(pre_weight, h, "pre_weight")
    num_rows, dim = h.shape
    new_residual = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    normed = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    if num_rows == 0:
        return new_residual, normed
    block_rows, block_d, num_warps = _row_tiling(dim)
    grid = (triton.cdiv(num_rows, block_rows),)
    post_norm_residual_pre_norm_kernel[grid](
        h,
        residual,
        post_weight,
        pre_weight,
        new_residual,
        normed,
        num_rows,
        h.stride(0),
        residual.stride(0),
        dim,
        1.0 / dim,
        eps,
        BLOCK_ROWS=block_rows,
        BLOCK_D=block_d,
        **pdl_options(h.device),
        num_warps=num_warps,
        enable_fp_fusion=False,
    )
    return new_residual, normed


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """LayerNorm over the last dimension of `x + shift`, the sum taken in float32; x is only read.

    x: [..., D], contiguous; weight, bias: [D], any float dtype (used as float32); shift: [D]
    float32 or None. Returns a new tensor shaped like x, in x's dtype. (The SigLIP tower keeps
    its residual stream without the closing projections' biases; their running sum comes in as
    `shift`.)
    """
    _check_layer_norm_input(x, shift)
    _check_weight(weight, x, "weight")
    _check_weight(bias, x, "bias")
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    _launch_layer_norm_rows(layer_norm_kernel, x, (weight, bias, shift, out), eps, shift)
    return out


def layer_norm_stats(
    x: torch.Tensor, eps: float, shift: torch.Tensor | None = None
) -> torch.Tensor:
    """The LayerNorm statistics of each row of `x + shift` (as `layer_norm` computes them),
    without the normalized rows: x [..., D] contiguous -> [rows, 2] float32 (mean, rstd).
    It only reads x, where the norm also writes its output: the SigLIP tower folds the rest of
    the norm into the GEMM that follows it (kernels/triton_norm_linear.py)."""
    _check_layer_norm_input(x, shift)
    dim = x.shape[-1]
    num_rows = x.numel() // max(dim, 1)
    stats = torch.empty(num_rows, 2, dtype=torch.float32, device=x.device)
    if num_rows == 0:
        return stats
    # Read-only rows want fewer warps than the norm: 2 rows of 1152 on 2 warps took 0.118 ms
    # for 131072 rows on an H100, 4 warps 0.131, 8 warps 0.153.
    _launch_layer_norm_rows(
        layer_norm_stats_kernel, x, (shift, stats), eps, shift, elements_per_warp=2048
    )
    return stats


def _launch_layer_norm_rows(
    kernel, x: torch.Tensor, tensors: tuple, eps: float, shift, elements_per_warp: int = 512
) -> None:
    # kernel(x, *tensors, num_rows, dim, inv_dim, eps, HAS_SHIFT, BLOCK_ROWS, BLOCK_D, USE_PDL)
    # over the rows of x; a None in `tensors` (no shift: never read) is passed as x.
    dim = x.shape[-1]
    num_rows = x.numel() // dim
    block_rows, block_d, num_warps = _row_tiling(dim, elements_per_warp)
    kernel[(triton.cdiv(num_rows, block_rows),)](
        x,
        *(x if t is None else t for t in tensors),
        num_rows,
        dim,
        1.0 / dim,
        eps,
        HAS_SHIFT=shift is not None,
        BLOCK_ROWS=block_rows,
        BLOCK_D=block_d,
        **pdl_options(x.device),
        num_warps=num_warps,
    )


def _check_layer_norm_input(x: torch.Tensor, shift: torch.Tensor | None) -> None:
    _check_rows(x, "x")
    if not x.is_contiguous():
        raise ValueError("x must be contiguous")
    if shift is not None:
        _check_weight(shift, x, "shift")
        if shift.dtype != torch.float32:
            raise ValueError(f"shift must be float32, got {shift.dtype}")


def _row_tiling(dim: int, elements_per_warp: int = 512) -> tuple[int, int, int]:
    # (rows per program, padded row length, warps): whole rows in registers, ~4k elements a tile.
    block_d = triton.next_power_of_2(dim)
    block_rows = max(1, min(_MAX_ROWS_PER_PROGRAM, _TILE_ELEMENTS // block_d))
    num_warps = max(1, min(16, block_rows * block_d // elements_per_warp))
    return block_rows, block_d, num_warps


def _check_rows(x: torch.Tensor, name: str) -> None:
    if x.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension")


def _check_weight(weight: torch.Tensor, x: torch.Tensor, name: str) -> None:
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"{name} must be [{x.shape[-1]}], got {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"{name} must be a float tensor, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"{name} is on {weight.device} but the activations are on {x.device}")
    if weight.shape[0] > 1 and weight.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous")
