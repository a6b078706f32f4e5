"""Several Linear layers over the same input merged into one, so a step runs one GEMM for them.

Checkpoints store q/k/v (and gate/up) separately and the loader keeps those names; after loading,
`fuse_linears` concatenates their weights along the output dimension. A decode step at batch 1
reads every weight once per token whatever the split, but each GEMM launch has a fixed cost that
small projections (k and v are a few MB) cannot hide.
"""

from __future__ import annotations

import torch
from torch import nn

from vlm_engine.kernels.gate_up import interleave_gate_up
from vlm_engine.models.fp8 import Fp8Linear


def fusable(*linears: nn.Module) -> bool:
    """Layers that can be one: all FP8 (models/fp8.py) or none."""
    return len({isinstance(lin, Fp8Linear) for lin in linears}) == 1


def fuse_linears(*linears: nn.Module, interleave: bool = False) -> nn.Module:
    """One Linear whose output is the outputs of `linears` side by side (in the given order), or
    for a gate and an up projection with `interleave`, their outputs alternating in groups
    (kernels/activation.py). FP8 layers fuse into an FP8 layer: their per-channel scales follow
    their rows."""
    first = linears[0]
    if not fusable(*linears):
        raise ValueError("FP8 and unquantized Linear layers cannot be fused")
    if any(lin.in_features != first.in_features for lin in linears):
        raise ValueError("only Linear layers over the same input can be fused")
    if any((lin.bias is None) != (first.bias is None) for lin in linears):
        raise ValueError("fused Linear layers must all have a bias or all have none")
    if interleave:
        if len(linears) != 2 or first.bias is not None:
            raise ValueError("interleaving fuses two Linear layers without bias")
        weight = interleave_gate_up(first.weight.detach(), linears[1].weight.detach())
    else:
        weight = torch.cat([lin.weight.detach() for lin in linears])  # [sum(out), in]
    if isinstance(first, Fp8Linear):
        scales = [lin.weight_scale.detach() for lin in linears]
        scale = interleave_gate_up(*scales) if interleave else torch.cat(scales)
        bias = None if first.bias is None else torch.cat([lin.bias.detach() for lin in linears])
        return Fp8Linear.from_tensors(weight, scale, bias)
    fused = nn.Linear(
        first.in_features, weight.shape[0], bias=first.bias is not None, device="meta"
    )
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if first.bias is not None:
        fused.bias = nn.Parameter(torch.cat([lin.bias.detach() for lin in linears]), False)
    return fused
