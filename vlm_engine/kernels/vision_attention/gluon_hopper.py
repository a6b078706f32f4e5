"""Vision-tower attention for Hopper GPUs in Gluon (Triton's lower-level language): warp
specialization, TMA and asynchronous warpgroup MMAs, which Triton itself does not give on Hopper.

Every patch attends to every patch of its own image (no mask). In: qkv [N, P, 3 * H * D], the
fused projection's output (q, k, v, each head-major, contiguous). Out: [N, P, H * D], the layout
the out projection reads.

Why: cuDNN's SDPA computes head_dim 72 (SigLIP-so400m) as 128, and the Triton kernel
(triton_flash.py) cannot overlap its softmax with its matrix products on Hopper. This kernel
computes 72 as 64 + a tail and keeps the tensor cores fed from a separate loading warp.

Work decomposition
- A program owns one (image, head) and 2 * BLOCK_M query patches: two consumer warpgroups of
  BLOCK_M rows each, plus one producer warp. Grid: (P / (2 * BLOCK_M), N * H), query blocks on
  the fast axis, so that the programs running at once share an (image, head) and find its keys
  and values in L2.
- The producer loads q once and walks the image's keys in tiles of BLOCK_N through a STAGES-deep
  ring in shared memory, with TMA; per stage a `k_ready` and a `v_ready` barrier (TMA arrives
  with the byte count) and an `empty` barrier on which both consumers arrive once they are done
  with the stage.
- TMA descriptors see qkv as [N * P, 3 * H, D], so a q or k head's 16-wide tail box (columns
  64..79 of a 72-wide head) reads past the last dimension, which TMA fills with zeros: the tail
  adds nothing to the scores. No copy, no padding in memory. The value tail is exactly D - 64
  wide (8 at D = 72): the second product's N may be any multiple of 8, where the scores' K step
  is 16, and the narrower product costs less power, which the tower (at the GPU's power cap)
  turns into speed.
- A consumer, per key tile j: issue S_j = q k_j^T (main + tail) and the products of P_{j-1}
  as asynchronous warpgroup MMAs; wait for S_j only; the softmax of S_j (float32, exp2 with the
  scale and log2(e) folded into one FMA); wait for the products; release stage j-1. P goes to
  the products from registers, in bf16/fp16.

The softmax in bf16 (switch VLM_ENGINE_VISION_FIXED_MAX, vlm_engine/envs.py; on by default)
- Each consumer's phases are bound by the latency of its own instruction stream, so the softmax
  does as little per score as it can: no running maximum. The first key tile's row maxima m stay
  every tile's reference, P_j = exp2(S_j * scale - m), and the row sums come from one more
  product, P_{j-1} @ ones (an 8-wide ones tile in shared memory, the value tail's shape): no row
  max, no O rescale and no row adds per tile, which leaves an FMA, an exp2 and half a conversion
  per score.
- Why it is still exact softmax: P may exceed 1 (by 2^(later maximum - m)), but bf16 has
  float32's exponent range; numerator and denominator both sum the same rounded bf16 P, so a
  dominant key's rounding cancels; m is never above the row's true maximum, so small scores
  underflow no sooner than with the online maximum.
- Overflow: only a row with a score ~127 above m (log2 units; ~88 in the logits' own), or whose
  sums pass float32's range, overflows. The epilogue checks each row's sum and output and flags
  a 128-row block with a row that is not finite; `triton_flash.redo_flagged` computes the
  flagged blocks again with the online maximum (with nothing flagged, its programs read the
  flags and return; nothing waits on the host).
- float16 keeps the online maximum: its range (2^16) would overflow on ordinary inputs.

Requirements (`supported`): a compute capability 9.x GPU, bf16/fp16, 64 < D <= 80 with D a
multiple of 8 (TMA strides are 16-byte aligned), P a multiple of 2 * BLOCK_M and of BLOCK_N with
at least STAGES key tiles, contiguous qkv. Otherwise `vision_attention` takes SDPA. The variants
measured against this design are in docs/kernels.md.
"""

from __future__ import annotations

import functools

import torch

from vlm_engine import envs
from vlm_engine.kernels.platform import cuda_capability
from vlm_engine.kernels.vision_attention import triton_flash

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # no triton, or one without Gluon's Hopper support
    gluon = None

LOG2E = 1.4426950408889634
TAIL_WIDTH = 16  # q's and k's head_dim - 64 columns, padded to the smallest MMA K step
BLOCK_M = 128  # query rows per consumer warpgroup (two per program)
BLOCK_N = 64  # keys per tile
STAGES = 3
PRODUCER_REGISTERS = 24
CONSUMER_REGISTERS = 240

if gluon is not None:
    TAIL = gl.constexpr(TAIL_WIDTH)
    # triton 3.6 names the TMA load async_copy_global_to_shared; later versions async_load
    tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

    @gluon.jit
    def _online_softmax(s, m_i, l_i, qk_scale):
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
        alpha = gl.exp2(m_i - m_new)
        return p, m_new, l_i * alpha + gl.sum(p, 1), alpha

    @gluon.jit
    def _producer(
        q_desc, q_tail_desc, kv_desc, k_tail_desc, v_tail_desc,
        q_m, q_t, k_m, k_t, v_m, v_t, q_ready, k_ready, v_ready, empty,
        q_row, kv_row, head, num_heads, num_tiles,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    ):  # fmt: skip
        for c in gl.static_range(2):
            bar = q_ready.index(c)
            mbarrier.expect(bar, q_desc.block_type.nbytes + q_tail_desc.block_type.nbytes)
            row = q_row + c * BLOCK_M
            tma_load(q_desc, [row, head, 0], bar, q_m.index(c).reshape([BLOCK_M, 1, 64]))
            tma_load(q_tail_desc, [row, head, 64], bar, q_t.index(c).reshape([BLOCK_M, 1, TAIL]))
        k_bytes: gl.constexpr = kv_desc.block_type.nbytes + k_tail_desc.block_type.nbytes
        v_bytes: gl.constexpr = kv_desc.block_type.nbytes + v_tail_desc.block_type.nbytes
        VT: gl.constexpr = v_tail_desc.block_type.shape[2]
        k_head = num_heads + head
        v_head = 2 * num_heads + head
        for j in range(num_tiles):
            stage = j % STAGES
            # wait for both consumers to release the stage's previous tile
            mbarrier.wait(empty.index(stage), ((j // STAGES) & 1) ^ 1, pred=j >= STAGES)
            row = kv_row + j * BLOCK_N
            bar = k_ready.index(stage)
            mbarrier.expect(bar, k_bytes)
            tma_load(kv_desc, [row, k_head, 0], bar, k_m.index(stage).reshape([BLOCK_N, 1, 64]))
            tma_load(
                k_tail_desc, [row, k_head, 64], bar, k_t.index(stage).reshape([BLOCK_N, 1, TAIL])
            )
            bar = v_ready.index(stage)
            mbarrier.expect(bar, v_bytes)
            tma_load(kv_desc, [row, v_head, 0], bar, v_m.index(stage).reshape([BLOCK_N, 1, 64]))
            tma_load(
                v_tail_desc, [row, v_head, 64], bar, v_t.index(stage).reshape([BLOCK_N, 1, VT])
            )

    @gluon.jit
    def _consumer(
        c: gl.constexpr, q_m, q_t, k_m, k_t, v_m, v_t, ones, q_ready, k_ready, v_ready, empty,
        out_ptr, flag_ptr, q_row, head, out_row_stride, num_tiles, qk_scale,
        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr, FIXED_MAX: gl.constexpr,
    ):  # fmt: skip
        dtype: gl.constexpr = q_m.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout([3, 0], [4, 1], [16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout([3, 0], [4, 1], [16, 64, 16])
        VT: gl.constexpr = v_t.shape[2]  # the value tail: head_dim - 64 columns, no padding
        ot_layout: gl.constexpr = gl.NVMMADistributedLayout([3, 0], [4, 1], [16, VT, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(0, o_layout, 2)
        pt_layout: gl.constexpr = gl.DotOperandLayout(0, ot_layout, 2)
        s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
        o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
        ot_rows: gl.constexpr = gl.SliceLayout(1, ot_layout)

        q = q_m.index(c)
        q_tail = q_t.index(c)
        s_unused = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)  # use_acc=False ignores it
        o = gl.zeros([BLOCK_M, 64], gl.float32, o_layout)
        o_tail = gl.zeros([BLOCK_M, VT], gl.float32, ot_layout)
        l_sums = gl.zeros([BLOCK_M, VT], gl.float32, ot_layout)  # FIXED_MAX: P @ ones
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, s_rows)
        l_i = gl.zeros([BLOCK_M], gl.float32, s_rows)

        mbarrier.wait(q_ready.index(c), 0)
        mbarrier.wait(k_ready.index(0), 0)
        s = warpgroup_mma(q, k_m.index(0).permute((1, 0)), s_unused, use_acc=False, is_async=True)
        s = warpgroup_mma(q_tail, k_t.index(0).permute((1, 0)), s, is_async=True)
        s = warpgroup_mma_wait(0, deps=[s])
        if FIXED_MAX:  # the first tile's row maxima stay the reference for every tile
            m_i = gl.max(s, 1) * qk_scale
            p = gl.exp2(s * qk_scale - gl.expand_dims(m_i, 1))
        else:
            p, m_i, l_i, alpha = _online_softmax(s, m_i, l_i, qk_scale)
        p = p.to(dtype)
        p_main = gl.convert_layout(p, p_layout)
        p_tail = gl.convert_layout(p, pt_layout)
        for j in range(1, num_tiles):
            stage = j % STAGES
            prev = (j - 1) % STAGES
            mbarrier.wait(k_ready.index(stage), (j // STAGES) & 1)
            s = warpgroup_mma(
                q, k_m.index(stage).permute((1, 0)), s_unused, use_acc=False, is_async=True
            )
            s = warpgroup_mma(q_tail, k_t.index(stage).permute((1, 0)), s, is_async=True)
            mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
            o = warpgroup_mma(p_main, v_m.index(prev), o, is_async=True)
            o_tail = warpgroup_mma(p_tail, v_t.index(prev), o_tail, is_async=True)
            if FIXED_MAX:
                l_sums = warpgroup_mma(p_tail, ones, l_sums, is_async=True)
                s = warpgroup_mma_wait(3, deps=[s])  # S_j done; the products of P_{j-1} may run
                p = gl.exp2(s * qk_scale - gl.expand_dims(m_i, 1)).to(dtype)
                o, o_tail, l_sums, p_main, p_tail = warpgroup_mma_wait(
                    0, deps=[o, o_tail, l_sums, p_main, p_tail]
                )
                mbarrier.arrive(empty.index(prev))
            else:
                s = warpgroup_mma_wait(2, deps=[s])  # S_j done; P_{j-1} V_{j-1} may still run
                p, m_i, l_i, alpha = _online_softmax(s, m_i, l_i, qk_scale)
                p = p.to(dtype)
                o, o_tail, p_main, p_tail = warpgroup_mma_wait(0, deps=[o, o_tail, p_main, p_tail])
                mbarrier.arrive(empty.index(prev))
                o = o * gl.expand_dims(gl.convert_layout(alpha, o_rows), 1)
                o_tail = o_tail * gl.expand_dims(gl.convert_layout(alpha, ot_rows), 1)
            p_main = gl.convert_layout(p, p_layout)
            p_tail = gl.convert_layout(p, pt_layout)
        last = (num_tiles - 1) % STAGES
        mbarrier.wait(v_ready.index(last), ((num_tiles - 1) // STAGES) & 1)
        o = warpgroup_mma(p_main, v_m.index(last), o, is_async=True)
        o_tail = warpgroup_mma(p_tail, v_t.index(last), o_tail, is_async=True)
        if FIXED_MAX:
            l_sums = warpgroup_mma(p_tail, ones, l_sums, is_async=True)
            o, o_tail, l_sums = warpgroup_mma_wait(0, deps=[o, o_tail, l_sums])
            l_i = gl.convert_layout(gl.max(l_sums, 1), s_rows)  # its columns are equal
        else:
            o, o_tail = warpgroup_mma_wait(0, deps=[o, o_tail])

        row0 = q_row + c * BLOCK_M
        o = o * gl.expand_dims(gl.convert_layout(1.0 / l_i, o_rows), 1)
        o_tail = o_tail * gl.expand_dims(gl.convert_layout(1.0 / l_i, ot_rows), 1)
        if FIXED_MAX:  # flag the block if a row overflowed (or the input was not finite)
            check = l_i + gl.convert_layout(gl.sum(o, 1), s_rows)
            check = check + gl.convert_layout(gl.sum(o_tail, 1), s_rows)
            gl.store(flag_ptr + c, gl.sum((gl.abs(check) < float("inf")).to(gl.int32) ^ 1, 0))
        rows = row0 + gl.arange(0, BLOCK_M, layout=o_rows)
        cols = gl.arange(0, 64, layout=gl.SliceLayout(0, o_layout))
        row_ptrs = out_ptr + gl.expand_dims(rows.to(gl.int64) * out_row_stride, 1)
        gl.store(row_ptrs + head * HEAD_DIM + gl.expand_dims(cols, 0), o.to(dtype))
        rows = row0 + gl.arange(0, BLOCK_M, layout=ot_rows)
        cols = gl.arange(0, VT, layout=gl.SliceLayout(0, ot_layout))
        row_ptrs = out_ptr + gl.expand_dims(rows.to(gl.int64) * out_row_stride, 1)
        gl.store(row_ptrs + head * HEAD_DIM + 64 + gl.expand_dims(cols, 0), o_tail.to(dtype))

    @gluon.jit
    def vision_attention_kernel(
        q_desc, q_tail_desc, kv_desc, k_tail_desc, v_tail_desc, out_ptr,
        flag_ptr, num_patches, num_heads, out_row_stride, qk_scale,
        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr, PRODUCER_REGISTERS: gl.constexpr,
        CONSUMER_REGISTERS: gl.constexpr, FIXED_MAX: gl.constexpr,
    ):  # fmt: skip
        dtype: gl.constexpr = q_desc.dtype
        image = gl.program_id(1) // num_heads
        head = gl.program_id(1) % num_heads
        q_row = image * num_patches + gl.program_id(0) * (2 * BLOCK_M)
        kv_row = image * num_patches
        num_tiles = num_patches // BLOCK_N
        # one flag per consumer, in (image, head, query block) order
        flag_ptr += gl.program_id(1) * (num_patches // BLOCK_M) + 2 * gl.program_id(0)

        q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, 64], dtype)
        qt_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, TAIL], dtype)
        kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, 64], dtype)
        kt_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, TAIL], dtype)
        VT: gl.constexpr = v_tail_desc.block_type.shape[2]
        vt_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, VT], dtype)
        q_m = gl.allocate_shared_memory(dtype, [2, BLOCK_M, 64], q_layout)
        q_t = gl.allocate_shared_memory(dtype, [2, BLOCK_M, TAIL], qt_layout)
        k_m = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, 64], kv_layout)
        k_t = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, TAIL], kt_layout)
        v_m = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, 64], kv_layout)
        v_t = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, VT], vt_layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(q_ready.index(i), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)  # one arrival per consumer

        if FIXED_MAX:  # the right operand of the row sums' product, shared by both consumers
            ones = gl.allocate_shared_memory(dtype, [BLOCK_N, VT], vt_layout)
            fill: gl.constexpr = gl.BlockedLayout([1, VT], [32, 1], [4, 1], [1, 0])
            ones.store(gl.full([BLOCK_N, VT], 1.0, dtype, fill))
            fence_async_shared()
        else:
            ones = v_t  # not read
        gl.warp_specialize(
            [
                (_consumer, (0, q_m, q_t, k_m, k_t, v_m, v_t, ones, q_ready, k_ready, v_ready,
                             empty, out_ptr, flag_ptr, q_row, head, out_row_stride, num_tiles,
                             qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, FIXED_MAX)),
                (_consumer, (1, q_m, q_t, k_m, k_t, v_m, v_t, ones, q_ready, k_ready, v_ready,
                             empty, out_ptr, flag_ptr, q_row, head, out_row_stride, num_tiles,
                             qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, FIXED_MAX)),
                (_producer, (q_desc, q_tail_desc, kv_desc, k_tail_desc, v_tail_desc, q_m, q_t,
                             k_m, k_t, v_m, v_t, q_ready, k_ready, v_ready, empty, q_row, kv_row,
                             head, num_heads, num_tiles, BLOCK_M, BLOCK_N, STAGES)),
            ],
            [4, 1],
            [CONSUMER_REGISTERS, PRODUCER_REGISTERS],
        )  # fmt: skip


def supported(qkv: torch.Tensor, num_heads: int) -> bool:
    """Whether `vision_attention` below takes this input (see the module docstring)."""
    if gluon is None or not qkv.is_cuda or qkv.dim() != 3:
        return False
    if qkv.dtype not in (torch.bfloat16, torch.float16) or not qkv.is_contiguous():
        return False
    num_images, num_patches, width = qkv.shape
    if width % (3 * num_heads):
        return False
    head_dim = width // (3 * num_heads)
    return (
        cuda_capability(qkv.device)[0] == 9
        and 64 < head_dim <= 64 + TAIL_WIDTH
        and head_dim % 8 == 0
        and num_patches % (2 * BLOCK_M) == 0
        and num_patches % BLOCK_N == 0
        and num_patches // BLOCK_N >= STAGES
        and num_images * num_heads <= 65535
    )


def descriptors(qkv: torch.Tensor, num_heads: int) -> list:
    """TMA descriptors over qkv seen as [N * P, 3 * H, D]: q blocks and tails, then key/value
    blocks, key tails (16 wide, zero-filled past D) and value tails (D - 64 wide)."""
    num_images, num_patches, width = qkv.shape
    head_dim = width // (3 * num_heads)
    view = qkv.view(num_images * num_patches, 3 * num_heads, head_dim)
    dtype = gl.bfloat16 if qkv.dtype == torch.bfloat16 else gl.float16

    def desc(rows: int, cols: int) -> TensorDescriptor:
        block = [rows, 1, cols]
        layout = _shared_layout(tuple(block), dtype)
        return TensorDescriptor(view, list(view.shape), list(view.stride()), block, layout)

    q_blocks = [desc(BLOCK_M, 64), desc(BLOCK_M, TAIL_WIDTH)]
    return q_blocks + [desc(BLOCK_N, 64), desc(BLOCK_N, TAIL_WIDTH), desc(BLOCK_N, head_dim - 64)]


@functools.cache
def _shared_layout(block: tuple[int, ...], dtype):
    return gl.NVMMASharedLayout.get_default_for(list(block), dtype)


def vision_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """qkv [N, P, 3 * H * D] -> [N, P, H * D], scale D ** -0.5, no mask; `supported` inputs."""
    if not supported(qkv, num_heads):
        raise ValueError(
            f"gluon vision attention does not take qkv {tuple(qkv.shape)} {qkv.dtype} on "
            f"{qkv.device} with {num_heads} heads"
        )
    num_images, num_patches, width = qkv.shape
    head_dim = width // (3 * num_heads)
    out = qkv.new_empty(num_images, num_patches, num_heads * head_dim)
    fixed_max = envs.values.vision_fixed_max and qkv.dtype == torch.bfloat16
    # every consumer writes its flag when fixed_max; nothing reads them otherwise
    flags = torch.empty(
        num_images * num_heads * (num_patches // BLOCK_M), dtype=torch.int32, device=qkv.device
    )
    grid = (num_patches // (2 * BLOCK_M), num_images * num_heads)
    vision_attention_kernel[grid](
        *descriptors(qkv, num_heads), out, flags,
        num_patches, num_heads, out.stride(1), head_dim**-0.5 * LOG2E,
        HEAD_DIM=head_dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, STAGES=STAGES,
        PRODUCER_REGISTERS=PRODUCER_REGISTERS, CONSUMER_REGISTERS=CONSUMER_REGISTERS,
        FIXED_MAX=fixed_max, num_warps=4,
    )  # fmt: skip
    if fixed_max:
        triton_flash.redo_flagged(out, qkv, num_heads, flags, BLOCK_M)
    return out
