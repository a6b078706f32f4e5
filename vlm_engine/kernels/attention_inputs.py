"""An attention layer's inputs: q/k RMS norms, the rotary embedding, and the KV-cache write."""

import torch

from vlm_engine.kernels.kv_store import store_kv
from vlm_engine.kernels.norm import rms_norm
from vlm_engine.kernels.platform import runs_on_triton
from vlm_engine.kernels.rotary import Rotary


def norm_rope_store(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    rotary: Rotary,
    kv_cache: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D] and k: [T, Hk, D] normalized per head (Gemma RMSNorm) and rotated, and, with
    a cache, k and v written at their slots. One Triton kernel on a GPU (the k of a padding
    token, never read, is then left unwritten); the torch references one after another
    elsewhere."""
    if runs_on_triton(q):
        from vlm_engine.kernels.triton_qk_norm_rope import qk_norm_rope_store

        return qk_norm_rope_store(
            q, k, v, q_weight, k_weight, eps, rotary.positions, rotary.inv_freq,
            kv_cache, slot_mapping,
        )  # fmt: skip
    q, k = rotary.apply(rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps))
    if kv_cache is not None:
        store_kv(k, v, kv_cache, slot_mapping)
    return q, k
