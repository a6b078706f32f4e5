"""Triton write of a step's keys and values into the paged KV cache through the slot mapping.

One program per token copies its [kv_heads, head_dim] key and value rows to slot
`slot_mapping[t]` of the cache; a negative slot marks a padding token (CUDA-graph batches) and
its program returns without touching the cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlm_engine.kernels.pdl import pdl_options, pdl_wait

CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TILE_ELEMENTS = 4096  # elements of key (and of value) a program copies at once


@triton.jit
def _copy_heads(
    src_row_ptr,
    stride_head,
    dst_row_ptr,
    num_heads,
    head_dim,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # src_row_ptr: one token's first head; dst_row_ptr: its contiguous [num_heads, head_dim] slot.
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < head_dim
    for head_start in range(0, num_heads, BLOCK_H):
        heads = head_start + tl.arange(0, BLOCK_H)
        mask = (heads < num_heads)[:, None] & col_mask[None, :]
        rows = tl.load(src_row_ptr + heads[:, None] * stride_head + cols[None, :], mask=mask)
        dst = dst_row_ptr + heads[:, None] * head_dim + cols[None, :]
        tl.store(dst, rows.to(dst_row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_kv_kernel(
    key_ptr,
    value_ptr,
    kv_cache_ptr,
    slot_mapping_ptr,
    stride_key_token,
    stride_key_head,
    stride_value_token,
    stride_value_head,
    value_cache_offset,
    num_kv_heads,
    head_dim,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    key_slot_ptr = kv_cache_ptr + slot * num_kv_heads * head_dim
    key_row = key_ptr + token * stride_key_token
    value_row = value_ptr + token * stride_value_token
    _copy_heads(key_row, stride_key_head, key_slot_ptr, num_kv_heads, head_dim, BLOCK_H, BLOCK_D)
    _copy_heads(
        value_row,
        stride_value_head,
        key_slot_ptr + value_cache_offset,
        num_kv_heads,
        head_dim,
        BLOCK_H,
        BLOCK_D,
    )


def store_kv(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write key/value: [T, Hk, D] into kv_cache: [2, num_blocks, block_size, Hk, D] in place.

    slot_mapping: [T] int64 (or int32), slot = block * block_size + offset; negative slots are skipped.
    Slots must be < num_blocks * block_size (not checked: that would need a host sync).
    key and value may be strided views (of a fused qkv projection) with a contiguous last
    dimension; kv_cache must be contiguous. Values are cast to the cache dtype.
    """
    if key.dim() != 3 or key.shape != value.shape:
        raise ValueError(
            f"key and value must both be [T, Hk, D], got {tuple(key.shape)} and {tuple(value.shape)}"
        )
    num_tokens, num_kv_heads, head_dim = key.shape
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or kv_cache.shape[3:] != key.shape[1:]:
        raise ValueError(
            f"kv_cache must be [2, num_blocks, block_size, {num_kv_heads}, {head_dim}], "
            f"got {tuple(kv_cache.shape)}"
        )
    if slot_mapping.shape != (num_tokens,) or slot_mapping.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"slot_mapping must be [{num_tokens}] int64, got "
            f"{tuple(slot_mapping.shape)} {slot_mapping.dtype}"
        )
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous")
    for name, tensor in (("key", key), ("value", value), ("kv_cache", kv_cache)):
        if tensor.dtype not in CACHE_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {tensor.dtype}")
    for name, tensor in (("key", key), ("value", value)):
        if head_dim > 1 and tensor.stride(2) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim")
    for name, tensor in (("value", value), ("kv_cache", kv_cache), ("slot_mapping", slot_mapping)):
        if tensor.device != key.device:
            raise ValueError(f"{name} is on {tensor.device} but key is on {key.device}")
    if num_tokens == 0:
        return
    block_d = triton.next_power_of_2(head_dim)
    block_h = max(1, min(triton.next_power_of_2(num_kv_heads), _TILE_ELEMENTS // block_d))
    store_kv_kernel[(num_tokens,)](
        key,
        value,
        kv_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        kv_cache.stride(0),
        num_kv_heads,
        head_dim,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        **pdl_options(key.device),
        num_warps=max(1, min(8, block_h * block_d // 512)),
    )
