"""Split-KV decode: how many programs share one sequence's KV tiles, and the kernel that merges
their partial results.

Each split of `paged_attention_kernel` leaves, per (sequence, head), its unnormalized output and
its softmax statistics (running max in the log2 domain, running sum) in float32 scratch; the
last split program of a (sequence, KV head) to finish merges them (kernels/arrival.py): every
split rescaled to the common max, normalized once.
"""

import torch

from vlm_engine.kernels.platform import jit, num_sms, tl, triton

MAX_SPLITS = 16


@jit
def merge_splits(
    split_acc_ptr,  # [S, num_heads, NUM_SPLITS, HEAD_DIM] float32
    split_max_ptr,  # [S, num_heads, NUM_SPLITS] float32
    split_sum_ptr,  # [S, num_heads, NUM_SPLITS] float32
    row,  # seq * num_heads + head
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,  # HEAD_DIM rounded up to a power of two
    NUM_SPLITS: tl.constexpr,
):
    """One (sequence, head)'s output [HEAD_DIM_PAD] float32 (zeros past HEAD_DIM): every split
    rescaled to the common max, normalized once. The splits were written by other programs of
    the same kernel: loads go through L2 (.cg), where their writes are visible once they have
    arrived (kernels/arrival.py)."""
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, HEAD_DIM_PAD)
    split_max = tl.load(split_max_ptr + row * NUM_SPLITS + splits, cache_modifier=".cg")
    split_sum = tl.load(split_sum_ptr + row * NUM_SPLITS + splits, cache_modifier=".cg")
    acc = tl.load(
        split_acc_ptr + (row * NUM_SPLITS + splits)[:, None] * HEAD_DIM + dims[None, :],
        mask=(dims < HEAD_DIM)[None, :],
        other=0.0,
        cache_modifier=".cg",
    )
    weight = tl.exp2(split_max - tl.max(split_max, axis=0))  # an empty split: max -1e30 -> 0
    total = tl.sum(split_sum * weight, axis=0)
    return tl.sum(acc * weight[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)


def default_num_splits(num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """KV splits for a decode step: enough programs for about two per SM, a power of two."""
    if device.type != "cuda":
        return 1
    programs = num_seqs * num_kv_heads
    wanted = -(-2 * num_sms(device.index or 0) // programs)
    return min(MAX_SPLITS, triton.next_power_of_2(wanted)) if wanted > 1 else 1
