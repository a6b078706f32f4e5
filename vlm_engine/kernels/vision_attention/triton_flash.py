"""Flash attention for the SigLIP vision tower: every patch attends to every patch of its own
image (no mask, no causality), read straight from the fused q/k/v projection output.

Layouts
- In: qkv [N, P, 3 * H * D], the fused projection's output: q, then k, then v, each [H, D]
  head-major. Rows may be strided, the last dimension must be contiguous; nothing is copied.
- Out: [N, P, H * D], contiguous: the layout the out projection reads, so no transpose/reshape
  copy follows.

Work decomposition
- A program owns one (image, head) and a tile of BLOCK_M query patches; it walks the image's
  keys in tiles of BLOCK_N. Grid: (cdiv(P, BLOCK_M), N * H), query tiles on the fast axis, so
  the programs resident at once share an (image, head) and find its K/V in L2.
- Head dims that are not a power of two are not padded to the next one (cuDNN's SDPA computes
  72 as 128). D splits into a power-of-two main part D_MAIN (the largest <= D, at least 16) and
  a tail D_TAIL (D - D_MAIN rounded up to a power of two, at least 16; 0 when D is a power of
  two), e.g. 72 = 64 + 16 with 8 masked lanes: 80 lanes of work instead of 128:
      scores = dot(q_main, k_main^T) + dot(q_tail, k_tail^T)      (one accumulator)
      acc_main [BLOCK_M, D_MAIN] += p @ v_main;  acc_tail [BLOCK_M, D_TAIL] += p @ v_tail
  Masked lanes read 0: they add nothing to the scores and their output columns are not stored.
  D below 16 takes a masked 16-wide main part and no tail.
- P need not be a multiple of the tiles: query rows past P are computed on zeros and not
  stored; when P % BLOCK_N != 0 (a constexpr) keys past P are masked to -inf, otherwise the K/V
  loads carry no key mask at all.
- Online softmax in float32: scores stay unscaled, the scale with log2(e) folded in goes into
  the running max and the exp2 argument (one FMA per score). float32 accumulation; P is cast to
  the input dtype for the P @ V product. float32 inputs multiply in IEEE float32, not TF32.
- K is needed as [D, BLOCK_N] for the score product: `load_k_transposed` reads it in that shape
  straight from memory, otherwise it is read as [BLOCK_N, D] rows and transposed with tl.trans
  (what Triton's Hopper attention tutorial does); the launch config says which.
- `max_registers` caps registers per thread (ptxas .maxnreg) so that more programs fit on an
  SM: 128 lets two 8-warp programs share one, overlapping one's softmax with the other's MMAs.
- `redo_flagged` runs the same computation for a list of query blocks given as device-side
  flags (`redo_flagged_kernel`: each program reads 128 flags and returns unless one is set):
  the Gluon kernel's bf16 path flags the blocks whose rows overflowed its fixed reference
  maximum, and this computes them again with the online maximum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from vlm_engine.kernels.pdl import pdl_options, pdl_wait
from vlm_engine.kernels.platform import cuda_capability, interpreted, jit, tl, triton

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_GRID_Y = 65535  # CUDA's limit on the second grid axis (images x heads)


@jit
def _load_part(ptrs, row_ok, dim_ok, MASK_ROWS: tl.constexpr, MASK_DIMS: tl.constexpr):
    """A tile of q, k or v; masked lanes read 0. Masks are left out where constexprs allow, so
    that full tiles keep unmasked vector loads."""
    if MASK_ROWS:
        if MASK_DIMS:
            tile = tl.load(ptrs, mask=row_ok & dim_ok, other=0.0)
        else:
            tile = tl.load(ptrs, mask=row_ok, other=0.0)
    elif MASK_DIMS:
        tile = tl.load(ptrs, mask=dim_ok, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@jit
def _load_keys_t(
    base,
    keys,
    key_ok,
    dims,
    dim_ok,
    stride_patch,
    MASK_KEYS: tl.constexpr,
    MASK_DIMS: tl.constexpr,
    TRANSPOSED_LOAD: tl.constexpr,
):
    """One part of a key tile as [len(dims), BLOCK_N], the right operand of q @ k^T."""
    if TRANSPOSED_LOAD:
        ptrs = base + dims[:, None] + keys[None, :] * stride_patch
        k_t = _load_part(ptrs, key_ok[None, :], dim_ok[:, None], MASK_KEYS, MASK_DIMS)
    else:
        ptrs = base + keys[:, None] * stride_patch + dims[None, :]
        k_t = tl.trans(_load_part(ptrs, key_ok[:, None], dim_ok[None, :], MASK_KEYS, MASK_DIMS))
    return k_t


@jit
def vision_attention_kernel(
    out_ptr,  # [N, P, H * HEAD_DIM]
    qkv_ptr,  # [N, P, 3 * H * HEAD_DIM]: q, k, v, each head-major
    scale_log2e,
    num_patches,
    num_heads,
    stride_qkv_image,
    stride_qkv_patch,
    stride_out_image,
    stride_out_patch,
    HEAD_DIM: tl.constexpr,
    D_MAIN: tl.constexpr,  # power of two >= 16
    D_TAIL: tl.constexpr,  # 0, or a power of two >= 16
    BLOCK_M: tl.constexpr,  # query patches per program
    BLOCK_N: tl.constexpr,  # keys per tile
    MASK_KEYS: tl.constexpr,  # num_patches % BLOCK_N != 0
    LOAD_K_TRANSPOSED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    _attend_block(
        out_ptr, qkv_ptr, tl.program_id(1) // num_heads, tl.program_id(1) % num_heads,
        tl.program_id(0), scale_log2e, num_patches, num_heads,
        stride_qkv_image, stride_qkv_patch, stride_out_image, stride_out_patch,
        HEAD_DIM, D_MAIN, D_TAIL, BLOCK_M, BLOCK_N, MASK_KEYS, LOAD_K_TRANSPOSED, DOT_PRECISION,
    )  # fmt: skip


@jit
def redo_flagged_kernel(
    out_ptr,
    qkv_ptr,
    scale_log2e,
    num_patches,
    num_heads,
    stride_qkv_image,
    stride_qkv_patch,
    stride_out_image,
    stride_out_patch,
    flag_ptr,  # [N * H * cdiv(P, BLOCK_M)] int32: nonzero where a block is to be computed again
    num_flags,
    HEAD_DIM: tl.constexpr,
    D_MAIN: tl.constexpr,
    D_TAIL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    LOAD_K_TRANSPOSED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FLAGS_PER_PROGRAM: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Each program reads FLAGS_PER_PROGRAM flags at once and, only if one is set, computes
    those query blocks, one after another; with no flag set it returns after that one read."""
    pdl_wait(USE_PDL)
    first = tl.program_id(0) * FLAGS_PER_PROGRAM
    indices = first + tl.arange(0, FLAGS_PER_PROGRAM)
    flags = tl.load(flag_ptr + indices, mask=indices < num_flags, other=0)
    if tl.max(tl.abs(flags), axis=0) != 0:
        blocks_per_head = tl.cdiv(num_patches, BLOCK_M)
        for index in range(first, tl.minimum(first + FLAGS_PER_PROGRAM, num_flags)):
            if tl.load(flag_ptr + index) != 0:
                pair = index // blocks_per_head
                _attend_block(
                    out_ptr, qkv_ptr, pair // num_heads, pair % num_heads,
                    index % blocks_per_head, scale_log2e, num_patches, num_heads,
                    stride_qkv_image, stride_qkv_patch, stride_out_image, stride_out_patch,
                    HEAD_DIM, D_MAIN, D_TAIL, BLOCK_M, BLOCK_N, MASK_KEYS, LOAD_K_TRANSPOSED,
                    DOT_PRECISION,
                )  # fmt: skip


@jit
def _attend_block(
    out_ptr,
    qkv_ptr,
    image,
    head,
    block,  # the query patches [block * BLOCK_M, (block + 1) * BLOCK_M)
    scale_log2e,
    num_patches,
    num_heads,
    stride_qkv_image,
    stride_qkv_patch,
    stride_out_image,
    stride_out_patch,
    HEAD_DIM: tl.constexpr,
    D_MAIN: tl.constexpr,
    D_TAIL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    LOAD_K_TRANSPOSED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    MASK_MAIN: tl.constexpr = HEAD_DIM < D_MAIN
    MASK_TAIL: tl.constexpr = HEAD_DIM < D_MAIN + D_TAIL
    q_base = qkv_ptr + image.to(tl.int64) * stride_qkv_image + head * HEAD_DIM
    k_base = q_base + num_heads * HEAD_DIM
    v_base = k_base + num_heads * HEAD_DIM

    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_patches
    main = tl.arange(0, D_MAIN)
    main_ok = main < HEAD_DIM
    q_rows = q_base + rows[:, None] * stride_qkv_patch
    q_main = _load_part(q_rows + main[None, :], row_ok[:, None], main_ok[None, :], True, MASK_MAIN)
    acc_main = tl.zeros([BLOCK_M, D_MAIN], tl.float32)
    if D_TAIL > 0:
        tail = D_MAIN + tl.arange(0, D_TAIL)
        tail_ok = tail < HEAD_DIM
        q_tail = _load_part(
            q_rows + tail[None, :], row_ok[:, None], tail_ok[None, :], True, MASK_TAIL
        )  # [BLOCK_M, D_TAIL], padding lanes 0
        acc_tail = tl.zeros([BLOCK_M, D_TAIL], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, log2 domain
    l_i = tl.zeros([BLOCK_M], tl.float32)

    for start in range(0, num_patches, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < num_patches
        k_main = _load_keys_t(
            k_base, keys, key_ok, main, main_ok, stride_qkv_patch,
            MASK_KEYS, MASK_MAIN, LOAD_K_TRANSPOSED,
        )  # fmt: skip
        scores = tl.dot(q_main, k_main, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        if D_TAIL > 0:
            k_tail = _load_keys_t(
                k_base, keys, key_ok, tail, tail_ok, stride_qkv_patch,
                MASK_KEYS, MASK_TAIL, LOAD_K_TRANSPOSED,
            )  # fmt: skip
            scores = tl.dot(q_tail, k_tail, acc=scores, input_precision=DOT_PRECISION)
        if MASK_KEYS:
            scores = tl.where(key_ok[None, :], scores, float("-inf"))
        # Key 0 is in every program's first tile, so m_new is finite from there on.
        m_new = tl.maximum(m_i, tl.max(scores, axis=1) * scale_log2e)
        p = tl.exp2(scores * scale_log2e - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p = p.to(qkv_ptr.dtype.element_ty)
        v_rows = v_base + keys[:, None] * stride_qkv_patch
        v_main = _load_part(v_rows + main[None, :], key_ok[:, None], main_ok[None, :],
                            MASK_KEYS, MASK_MAIN)  # fmt: skip
        acc_main = tl.dot(p, v_main, acc=acc_main * alpha[:, None], input_precision=DOT_PRECISION)
        if D_TAIL > 0:
            v_tail = _load_part(v_rows + tail[None, :], key_ok[:, None], tail_ok[None, :],
                                MASK_KEYS, MASK_TAIL)  # fmt: skip
            acc_tail = tl.dot(
                p, v_tail, acc=acc_tail * alpha[:, None], input_precision=DOT_PRECISION
            )
        m_i = m_new

    out_rows = (
        out_ptr + image.to(tl.int64) * stride_out_image + head * HEAD_DIM
        + rows[:, None] * stride_out_patch
    )  # fmt: skip
    dtype = out_ptr.dtype.element_ty
    out_main = (acc_main / l_i[:, None]).to(dtype)
    tl.store(out_rows + main[None, :], out_main, mask=row_ok[:, None] & main_ok[None, :])
    if D_TAIL > 0:
        out_tail = (acc_tail / l_i[:, None]).to(dtype)
        tl.store(out_rows + tail[None, :], out_tail, mask=row_ok[:, None] & tail_ok[None, :])


@dataclass(frozen=True)
class VisionAttentionConfig:
    """Launch shape: `block_m` query patches by `block_n` keys per tile; `load_k_transposed`
    reads K as [head_dim, block_n] instead of transposing [block_n, head_dim] tiles;
    `max_registers` (None: the compiler's choice) caps registers per thread."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3
    load_k_transposed: bool = False
    max_registers: int | None = None

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"num_warps must be a power of two >= 1, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")
        if self.max_registers is not None and not 24 <= self.max_registers <= 255:
            raise ValueError(f"max_registers must be None or 24..255, got {self.max_registers}")


# The Hopper (sm_90) launch shape for the tower's long sequences: the fastest of
# benchmarks/vision_attention.py's sweep on an H100.
HOPPER_CONFIG = VisionAttentionConfig(block_m=128, block_n=64, num_warps=4, num_stages=3)
# Everything else with at least 1024 patches (other GPUs, untuned).
LONG_CONFIG = VisionAttentionConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)
# Short sequences: smaller query tiles give more programs.
SHORT_CONFIG = VisionAttentionConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)


def default_config(num_patches: int, device: torch.device) -> VisionAttentionConfig:
    if num_patches < 1024:
        return SHORT_CONFIG
    if device.type == "cuda" and cuda_capability(device)[0] == 9:
        return HOPPER_CONFIG
    return LONG_CONFIG


def split_head_dim(head_dim: int) -> tuple[int, int]:
    """(D_MAIN, D_TAIL): the largest power of two <= head_dim (at least 16), and the rest
    rounded up to a power of two of at least 16 (0 when there is no rest). 72 -> (64, 16)."""
    d_main = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - d_main
    return d_main, 0 if rest <= 0 else max(16, 1 << (rest - 1).bit_length())


def qkv_head_dim(qkv: torch.Tensor, num_heads: int) -> int:
    """head_dim D of a fused projection output qkv [N, P, 3 * num_heads * D]; ValueError if the
    shape does not split that way."""
    if qkv.dim() != 3:
        raise ValueError(
            f"qkv must be [num_images, num_patches, 3 * num_heads * head_dim], got "
            f"{tuple(qkv.shape)}"
        )
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    width = qkv.shape[-1]
    if width == 0 or width % (3 * num_heads):
        raise ValueError(
            f"qkv's last dimension {width} is not 3 * num_heads * head_dim for num_heads "
            f"{num_heads} (it must be a positive multiple of {3 * num_heads})"
        )
    return width // (3 * num_heads)


def vision_attention(
    qkv: torch.Tensor, num_heads: int, *, config: VisionAttentionConfig | None = None
) -> torch.Tensor:
    """Bidirectional attention per image: qkv [N, P, 3 * H * D] -> [N, P, H * D] (contiguous,
    qkv's dtype), scale D ** -0.5. `config` overrides `default_config`."""
    head_dim = qkv_head_dim(qkv, num_heads)
    _check_runnable(qkv)
    num_images, num_patches, _ = qkv.shape
    if num_images * num_heads > _MAX_GRID_Y:
        raise ValueError(
            f"{num_images} images x {num_heads} heads exceed one launch's {_MAX_GRID_Y} "
            "(image, head) programs; split the batch"
        )
    out = torch.empty(
        num_images, num_patches, num_heads * head_dim, dtype=qkv.dtype, device=qkv.device
    )
    if out.numel() == 0:
        return out
    config = config or default_config(num_patches, qkv.device)
    grid = (triton.cdiv(num_patches, config.block_m), num_images * num_heads)
    args, constants = _launch_args(out, qkv, num_heads, config)
    vision_attention_kernel[grid](*args, **constants)
    return out


def redo_flagged(
    out: torch.Tensor, qkv: torch.Tensor, num_heads: int, flags: torch.Tensor, block_m: int
) -> None:
    """Compute again, into `out`, the query blocks whose flag is nonzero: flags [N * H *
    cdiv(P, block_m)] int32 in (image, head, block) order, blocks of `block_m` patches. For a
    kernel that flags the blocks it could not compute (gluon_vision_attention's overflow check);
    the flags stay on the device, nothing waits for them."""
    head_dim = qkv_head_dim(qkv, num_heads)
    _check_runnable(qkv)
    num_images, num_patches, _ = qkv.shape
    if flags.dtype != torch.int32 or flags.numel() != num_images * num_heads * triton.cdiv(
        num_patches, block_m
    ):
        raise ValueError(f"flags must be int32 [N * H * cdiv(P, {block_m})]")
    if out.shape != (num_images, num_patches, num_heads * head_dim) or out.stride(-1) != 1:
        raise ValueError("out must be [N, P, H * D], contiguous in its last dimension")
    if flags.numel() == 0:
        return
    config = replace(default_config(num_patches, qkv.device), block_m=block_m)
    per_program = 128
    grid = (triton.cdiv(flags.numel(), per_program),)
    args, constants = _launch_args(out, qkv, num_heads, config)
    # No PDL: it rewrites blocks of what the kernel before it wrote, which a PDL kernel after it
    # may read before its own wait (pdl.py's rule allows reads of two kernels back).
    constants.pop("launch_pdl", None)
    constants["USE_PDL"] = False
    redo_flagged_kernel[grid](
        *args, flags, flags.numel(), FLAGS_PER_PROGRAM=per_program, **constants
    )


def _launch_args(
    out: torch.Tensor, qkv: torch.Tensor, num_heads: int, config: VisionAttentionConfig
) -> tuple[list, dict]:
    """The arguments and constants shared by the two kernels' launches."""
    head_dim = qkv.shape[-1] // (3 * num_heads)
    num_patches = qkv.shape[1]
    d_main, d_tail = split_head_dim(head_dim)
    constants = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    if config.max_registers is not None:
        constants["maxnreg"] = config.max_registers
    args = [
        out, qkv, head_dim**-0.5 * math.log2(math.e), num_patches, num_heads,
        qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1),
    ]  # fmt: skip
    constants |= {
        "HEAD_DIM": head_dim,
        "D_MAIN": d_main,
        "D_TAIL": d_tail,
        "BLOCK_M": config.block_m,
        "BLOCK_N": config.block_n,
        "MASK_KEYS": num_patches % config.block_n != 0,
        "LOAD_K_TRANSPOSED": config.load_k_transposed,
        # fp32 inputs would otherwise go through TF32 on the GPU (~1e-3 error).
        "DOT_PRECISION": "ieee" if qkv.dtype == torch.float32 else "tf32",
        **pdl_options(qkv.device),
    }
    return args, constants


def _check_runnable(qkv: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("vision_attention needs triton; use vision_attention_ref without it")
    if qkv.dtype not in DTYPES:
        raise ValueError(f"qkv must be float32, bfloat16 or float16, got {qkv.dtype}")
    if qkv.stride(-1) != 1:
        raise ValueError("qkv must be contiguous in its last dimension")
    in_interpreter = interpreted(vision_attention_kernel)
    if not (qkv.is_cuda or in_interpreter):
        raise RuntimeError(
            f"vision_attention cannot run on {qkv.device}: it needs a CUDA device, or "
            "TRITON_INTERPRET=1 set before importing vlm_engine.kernels.vision_attention.triton_flash"
        )
