"""The column layout of a fused gate/up projection.

The fused projection's output columns (its weight's rows) alternate GATE_UP_GROUP gate columns
and GATE_UP_GROUP up columns: [g0 g1 u0 u1 g2 g3 u2 u3 ...]. Any block of the projection that
starts and ends on a group boundary then holds matching gate and up values, so the projection
kernel can apply the activation in its epilogue (kernels/triton_linear.py).
"""

import torch

GATE_UP_GROUP = 2


def interleave_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Rows of a fused gate/up weight: gate [I, ...] and up [I, ...] -> [2I, ...]."""
    if gate.shape != up.shape or gate.shape[0] % GATE_UP_GROUP:
        raise ValueError(f"gate and up need one shape with rows divisible by {GATE_UP_GROUP}")
    groups = gate.shape[0] // GATE_UP_GROUP
    pairs = torch.stack(
        [gate.reshape(groups, GATE_UP_GROUP, -1), up.reshape(groups, GATE_UP_GROUP, -1)], dim=1
    )
    return pairs.reshape(2 * gate.shape[0], *gate.shape[1:])


def split_gate_up(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., 2I] interleaved -> gate [..., I], up [..., I] (copies)."""
    pairs = gate_up.unflatten(-1, (-1, 2, GATE_UP_GROUP))
    return pairs[..., 0, :].flatten(-2), pairs[..., 1, :].flatten(-2)
