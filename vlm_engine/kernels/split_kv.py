"""Split-KV decode: how many programs share one sequence's KV tiles, and the kernel that merges
their partial results.

Each split of `paged_attention_kernel` leaves, per (sequence, head), its unnormalized output and
its softmax statistics (running max in the log2 domain, running sum) in float32 scratch; the
merge rescales every split to the common max and normalizes once.
"""

import functools

import torch

from vlm_engine.kernels.pdl import pdl_wait
from vlm_engine.kernels.triton_import import jit, tl, triton

MAX_SPLITS = 16


@jit
def attention_merge_kernel(
    out_ptr,  # [S, num_heads, head_dim]
    split_acc_ptr,  # [S, num_heads, NUM_SPLITS, HEAD_DIM] float32
    split_max_ptr,  # [S, num_heads, NUM_SPLITS] float32
    split_sum_ptr,  # [S, num_heads, NUM_SPLITS] float32
    num_heads,
    stride_ot,
    stride_oh,
    stride_od,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    # One program per (sequence, head): rescale each split to the common max and normalize.
    row = tl.program_id(0).to(tl.int64) * num_heads + tl.program_id(1)
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, HEAD_DIM)
    split_max = tl.load(split_max_ptr + row * NUM_SPLITS + splits)
    split_sum = tl.load(split_sum_ptr + row * NUM_SPLITS + splits)
    acc = tl.load(split_acc_ptr + (row * NUM_SPLITS + splits)[:, None] * HEAD_DIM + dims[None, :])
    weight = tl.exp2(split_max - tl.max(split_max, axis=0))  # an empty split: max -1e30 -> 0
    total = tl.sum(split_sum * weight, axis=0)
    out = tl.sum(acc * weight[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    o_offsets = (
        tl.program_id(0).to(tl.int64) * stride_ot + tl.program_id(1) * stride_oh + dims * stride_od
    )
    tl.store(out_ptr + o_offsets, out.to(out_ptr.dtype.element_ty))


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_splits(num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """KV splits for a decode step: enough programs for about two per SM, a power of two."""
    if device.type != "cuda":
        return 1
    programs = num_seqs * num_kv_heads
    wanted = -(-2 * _num_sms(device.index or 0) // programs)
    return min(MAX_SPLITS, triton.next_power_of_2(wanted)) if wanted > 1 else 1
