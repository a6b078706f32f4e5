"""Write a step's keys and values into the paged KV cache through the slot mapping."""

import torch

from vlm_engine.kernels.platform import runs_on_triton


def store_kv_ref(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    # key/value: [T, kv_heads, head_dim]  kv_cache: [2, num_blocks, block_size, kv_heads, head_dim]
    # slot_mapping: [T], slot = block * block_size + offset; negative slots are padding, skipped.
    flat = kv_cache.view(2, -1, *kv_cache.shape[-2:])
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    flat[0, slots] = key[valid].to(kv_cache.dtype)
    flat[1, slots] = value[valid].to(kv_cache.dtype)


def store_kv(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    if runs_on_triton(key):
        from vlm_engine.kernels.triton_kv_store import store_kv as store_kv_triton

        store_kv_triton(key, value, kv_cache, slot_mapping)
    else:
        store_kv_ref(key, value, kv_cache, slot_mapping)
