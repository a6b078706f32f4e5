"""Triton: a token's q/k RMS norms, their rotary embedding and the KV-cache write, in one kernel.

What `rms_norm` on q and on k, `apply_rotary_` and `store_kv` do one after another, with the same
roundings: the norm's output is rounded to the activation dtype, the rotation rounds each product
and then their sum, the cache gets the rotated key and the value as they are. One program per
token normalizes and rotates its heads a tile at a time, writes q and k to new contiguous
tensors and, given a cache, stores k and v at the token's slot (a negative slot is padding).
Where results can differ from the unfused kernels: the float32 sum of squares, which adds the
two halves of a head separately (a few float32 ulp in the statistics; see `triton_norm`).
Saves three launches per layer, which is what a prefill's first token waits for on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlm_engine.kernels.pdl import pdl_options, pdl_wait
from vlm_engine.kernels.triton_kv_store import _copy_heads
from vlm_engine.kernels.triton_rotary import _rotate

ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TILE_ELEMENTS = 2048  # elements of each half a program holds at once


@triton.jit
def _norm_rotate_heads(
    src_row_ptr,
    stride_head,
    dst_row_ptr,
    cache_row_ptr,
    num_heads,
    half,
    inv_dim,
    eps,
    weight_lo,
    weight_hi,
    cos,
    sin,
    STORE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # src_row_ptr: one token's first head (strided heads); dst_row_ptr: its contiguous
    # [num_heads, 2 * half] output; cache_row_ptr: its cache slot (when STORE).
    # weight_lo/hi: (1 + weight) of each half, float32; cos/sin: float32, rounded to the dtype.
    dtype = dst_row_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < half
    for head_start in range(0, num_heads, BLOCK_H):
        heads = head_start + tl.arange(0, BLOCK_H)
        mask = (heads < num_heads)[:, None] & col_mask[None, :]
        src = src_row_ptr + heads[:, None] * stride_head + cols[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
        # rms_norm_ref: (x * rsqrt(mean(x^2) + eps)) * (1 + w), rounded to the dtype.
        rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) * inv_dim + eps)
        n1 = (x1 * rstd[:, None] * weight_lo[None, :]).to(dtype).to(tl.float32)
        n2 = (x2 * rstd[:, None] * weight_hi[None, :]).to(dtype).to(tl.float32)
        out1, out2 = _rotate(n1, n2, cos, sin, dtype)  # as apply_rotary_ref rounds
        dst = dst_row_ptr + heads[:, None] * (2 * half) + cols[None, :]
        tl.store(dst, out1, mask=mask)
        tl.store(dst + half, out2, mask=mask)
        if STORE:
            cache = cache_row_ptr + heads[:, None] * (2 * half) + cols[None, :]
            cache_dtype = cache_row_ptr.dtype.element_ty
            tl.store(cache, out1.to(cache_dtype), mask=mask)
            tl.store(cache + half, out2.to(cache_dtype), mask=mask)


@triton.jit
def qk_norm_rope_store_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    q_weight_ptr,
    k_weight_ptr,
    positions_ptr,
    inv_freq_ptr,
    q_out_ptr,
    k_out_ptr,
    kv_cache_ptr,
    slot_mapping_ptr,
    stride_q_token,
    stride_q_head,
    stride_k_token,
    stride_k_head,
    stride_v_token,
    stride_v_head,
    value_cache_offset,
    num_q_heads,
    num_kv_heads,
    half,
    inv_dim,
    eps,
    STORE: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # Program (token, part): part 0 normalizes and rotates q, part 1 k (and stores it), part 2
    # stores v; the parts of a token run side by side.
    token = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    dtype = q_out_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < half
    # Nothing up to pdl_wait reads what the kernel before this one wrote (positions, slots and
    # weights are older), so with PDL it overlaps that kernel.
    # rope_cos_sin: float32 angles, cos/sin in float32, then cast to the activation dtype.
    position = tl.load(positions_ptr + token).to(tl.float32)
    angles = position * tl.load(inv_freq_ptr + cols, mask=col_mask, other=0.0)
    cos = tl.cos(angles).to(dtype).to(tl.float32)
    sin = tl.sin(angles).to(dtype).to(tl.float32)
    weight_ptr = q_weight_ptr if part == 0 else k_weight_ptr
    w_lo = 1.0 + tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    w_hi = 1.0 + tl.load(weight_ptr + half + cols, mask=col_mask, other=0.0).to(tl.float32)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)  # positions when not STORE (unused)
    head_dim = 2 * half
    k_out_row = k_out_ptr + token * num_kv_heads * head_dim
    key_slot_ptr = kv_cache_ptr + slot * num_kv_heads * head_dim
    pdl_wait(USE_PDL)
    if part == 0:
        _norm_rotate_heads(
            q_ptr + token * stride_q_token, stride_q_head,
            q_out_ptr + token * num_q_heads * head_dim, q_out_ptr, num_q_heads, half, inv_dim,
            eps, w_lo, w_hi, cos, sin, False, BLOCK_HQ, BLOCK_HALF,
        )  # fmt: skip
    elif part == 1:
        k_row = k_ptr + token * stride_k_token
        if STORE and slot >= 0:  # a padding token (negative slot) leaves the cache alone
            _norm_rotate_heads(
                k_row, stride_k_head, k_out_row, key_slot_ptr, num_kv_heads, half, inv_dim, eps,
                w_lo, w_hi, cos, sin, True, BLOCK_HK, BLOCK_HALF,
            )  # fmt: skip
        else:
            _norm_rotate_heads(
                k_row, stride_k_head, k_out_row, k_out_row, num_kv_heads, half, inv_dim, eps,
                w_lo, w_hi, cos, sin, False, BLOCK_HK, BLOCK_HALF,
            )  # fmt: skip
    elif slot >= 0:  # part 2, only when STORE
        _copy_heads(
            v_ptr + token * stride_v_token, stride_v_head, key_slot_ptr + value_cache_offset,
            num_kv_heads, head_dim, BLOCK_HK, 2 * BLOCK_HALF,
        )  # fmt: skip


def qk_norm_rope_store(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    kv_cache: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized and rotated q: [T, Hq, D] and k: [T, Hk, D] as new contiguous tensors; with a
    kv_cache ([2, blocks, block_size, Hk, D], contiguous) also k and v written at slot_mapping.

    q, k, v may be strided views of a fused qkv projection with a contiguous last dimension.
    Equals rms_norm_ref, then apply_rotary_ref(x, *rope_cos_sin(positions, inv_freq, dtype)),
    then store_kv_ref, up to the float32 statistics of the norm.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if k.shape != v.shape or k.shape[0] != num_tokens or k.shape[2] != head_dim or head_dim % 2:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: need [T, H, D] with "
            "matching T and an even D, and k and v of one shape"
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype != q.dtype or x.dtype not in ACTIVATION_DTYPES or x.stride(2) != 1:
            raise ValueError(f"{name} must be float32/bf16/fp16 like q, contiguous in head_dim")
    half = head_dim // 2
    if inv_freq.shape != (half,) or inv_freq.dtype != torch.float32 or inv_freq.stride(0) != 1:
        raise ValueError(f"inv_freq must be a contiguous [{half}] float32 tensor")
    if q_weight.shape != (head_dim,) or k_weight.shape != (head_dim,):
        raise ValueError(f"norm weights must be [{head_dim}]")
    store = kv_cache is not None
    if store and (
        kv_cache.shape[0] != 2 or kv_cache.shape[3:] != k.shape[1:] or not kv_cache.is_contiguous()
    ):
        raise ValueError(f"kv_cache must be a contiguous [2, blocks, block_size, {num_kv_heads}, "
                         f"{head_dim}] tensor, got {tuple(kv_cache.shape)}")  # fmt: skip
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    block_half = triton.next_power_of_2(half)
    block_hq = max(1, min(triton.next_power_of_2(num_q_heads), _TILE_ELEMENTS // block_half))
    block_hk = max(1, min(triton.next_power_of_2(num_kv_heads), _TILE_ELEMENTS // block_half))
    qk_norm_rope_store_kernel[(num_tokens, 3 if store else 2)](
        q, k, v, q_weight, k_weight, positions, inv_freq, q_out, k_out,
        kv_cache if store else q_out, slot_mapping if store else positions,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0) if store else 0,
        num_q_heads, num_kv_heads, half, 1.0 / head_dim, eps,
        STORE=store, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half,
        **pdl_options(q.device),
        num_warps=max(1, min(8, block_hq * block_half // 256)),
        enable_fp_fusion=False,
    )  # fmt: skip
    return q_out, k_out
