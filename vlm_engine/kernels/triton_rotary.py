"""Triton neox-style rotary embedding, applied in place to q and k with no cos/sin cache.

Each program takes one token: it computes cos/sin of position x inv_freq in float32, rounds them
to the activation dtype as `rope_cos_sin` does, and rotates every q and k head of that token.
The rotation repeats the roundings of `apply_rotary_ref` in the activation dtype: each product
is rounded, then their sum (fp contraction into FMAs is turned off so float32 matches too).
The only possible difference from the reference is the float32 cos/sin implementation itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlm_engine.kernels.pdl import pdl_options, pdl_wait

ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TILE_ELEMENTS = 2048  # elements of each half a program rotates at once


@triton.jit
def _rotate(x1, x2, cos, sin, dtype: tl.constexpr):
    # x1, x2: the two halves (float32 holding dtype values); cos/sin: float32, rounded to dtype.
    # x * cos + rotate_half(x) * sin, rounding like torch's elementwise ops in `dtype`: each
    # product, then the sum.
    x1_cos = (x1 * cos[None, :]).to(dtype).to(tl.float32)
    x2_sin = (x2 * sin[None, :]).to(dtype).to(tl.float32)
    x2_cos = (x2 * cos[None, :]).to(dtype).to(tl.float32)
    x1_sin = (x1 * sin[None, :]).to(dtype).to(tl.float32)
    return (x1_cos - x2_sin).to(dtype), (x2_cos + x1_sin).to(dtype)


@triton.jit
def _rotate_heads(
    row_ptr,
    stride_head,
    num_heads,
    half,
    cos,
    sin,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # row_ptr: one token's first head.
    # cos/sin: [BLOCK_HALF] float32 holding values already rounded to the activation dtype.
    dtype = row_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < half
    for head_start in range(0, num_heads, BLOCK_H):
        heads = head_start + tl.arange(0, BLOCK_H)
        mask = (heads < num_heads)[:, None] & col_mask[None, :]
        ptrs = row_ptr + heads[:, None] * stride_head + cols[None, :]
        x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(ptrs + half, mask=mask, other=0.0).to(tl.float32)
        out1, out2 = _rotate(x1, x2, cos, sin, dtype)
        tl.store(ptrs, out1, mask=mask)
        tl.store(ptrs + half, out2, mask=mask)


@triton.jit
def rotary_kernel(
    q_ptr,
    k_ptr,
    positions_ptr,
    inv_freq_ptr,
    stride_q_token,
    stride_q_head,
    stride_k_token,
    stride_k_head,
    stride_position,
    num_q_heads,
    num_kv_heads,
    half,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    dtype = q_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_HALF)
    position = tl.load(positions_ptr + token * stride_position).to(tl.float32)
    inv_freq = tl.load(inv_freq_ptr + cols, mask=cols < half, other=0.0)
    # rope_cos_sin: float32 angles, cos/sin in float32, then cast to the activation dtype.
    angles = position * inv_freq
    cos = tl.cos(angles).to(dtype).to(tl.float32)
    sin = tl.sin(angles).to(dtype).to(tl.float32)
    q_row = q_ptr + token * stride_q_token
    k_row = k_ptr + token * stride_k_token
    _rotate_heads(q_row, stride_q_head, num_q_heads, half, cos, sin, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_row, stride_k_head, num_kv_heads, half, cos, sin, BLOCK_HK, BLOCK_HALF)


def apply_rotary_(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor
) -> None:
    """Rotate q: [T, Hq, D] and k: [T, Hk, D] in place, neox style (rotate half).

    positions: [T] int64 (or int32); inv_freq: [D // 2] float32 (see `rope_inv_freq`).
    q and k may be strided views (of a fused qkv projection) if their last dimension is contiguous.
    Equals `apply_rotary_ref(x, *rope_cos_sin(positions, inv_freq, x.dtype))` for x in (q, k).
    """
    _check_heads(q, "q")
    _check_heads(k, "k")
    num_tokens, num_q_heads, head_dim = q.shape
    if k.shape[0] != num_tokens or k.shape[2] != head_dim or k.dtype != q.dtype:
        raise ValueError(
            f"k {tuple(k.shape)} {k.dtype} must match q {tuple(q.shape)} {q.dtype} "
            "in tokens, head_dim and dtype"
        )
    if head_dim % 2:
        raise ValueError(f"rotary needs an even head_dim, got {head_dim}")
    if positions.shape != (num_tokens,) or positions.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"positions must be [{num_tokens}] int64, got {tuple(positions.shape)} {positions.dtype}"
        )
    half = head_dim // 2
    if inv_freq.shape != (half,) or inv_freq.dtype != torch.float32 or inv_freq.stride(0) != 1:
        raise ValueError(f"inv_freq must be a contiguous [{half}] float32 tensor")
    for name, tensor in (("k", k), ("positions", positions), ("inv_freq", inv_freq)):
        if tensor.device != q.device:
            raise ValueError(f"{name} is on {tensor.device} but q is on {q.device}")
    if num_tokens == 0:
        return
    block_half = triton.next_power_of_2(half)
    block_hq = _heads_per_tile(num_q_heads, block_half)
    block_hk = _heads_per_tile(k.shape[1], block_half)
    rotary_kernel[(num_tokens,)](
        q,
        k,
        positions,
        inv_freq,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        positions.stride(0),
        num_q_heads,
        k.shape[1],
        half,
        BLOCK_HQ=block_hq,
        BLOCK_HK=block_hk,
        BLOCK_HALF=block_half,
        **pdl_options(q.device),
        num_warps=max(1, min(8, block_hq * block_half // 256)),
        enable_fp_fusion=False,
    )


def _heads_per_tile(num_heads: int, block_half: int) -> int:
    return max(1, min(triton.next_power_of_2(num_heads), _TILE_ELEMENTS // block_half))


def _check_heads(x: torch.Tensor, name: str) -> None:
    if x.dim() != 3:
        raise ValueError(f"{name} must be [T, heads, head_dim], got {tuple(x.shape)}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.stride(2) != 1:
        raise ValueError(f"{name} must be contiguous in head_dim")
