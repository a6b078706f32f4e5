"""Gemma's gated MLP activation, `gelu_tanh(gate) * up`, over a fused gate/up projection whose
columns are interleaved as kernels/gate_up.py lays them out."""

import torch
import torch.nn.functional as F

from vlm_engine.kernels.gate_up import split_gate_up
from vlm_engine.kernels.platform import runs_on_triton


def gelu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    # gate_up: [T, 2 * I] interleaved -> [T, I]; gelu rounds to the activation dtype before the
    # product, as the unfused modules do.
    gate, up = split_gate_up(gate_up)
    return F.gelu(gate, approximate="tanh") * up


def gelu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if runs_on_triton(gate_up) and gate_up.dim() == 2:
        from vlm_engine.kernels.triton_activation import gelu_and_mul as gelu_and_mul_triton

        return gelu_and_mul_triton(gate_up)
    return gelu_and_mul_ref(gate_up)
