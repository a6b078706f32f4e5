"""Arrival counters: the last program of a group finishes the group's work, in the same kernel.

Kernels that split one output over several programs (split-K projections, split-KV attention)
combine the partial results without a second kernel: each program writes its partial result,
counts itself in on its group's counter, and the program that arrives last reads all partials
(in a fixed order, so results never depend on who came last) and writes the output, then resets
the counter to zero for the next launch.
"""

from __future__ import annotations

import torch

from vlm_engine.kernels.platform import jit, tl

COUNTER_SLOTS = 1 << 16

_counters: dict[torch.device, torch.Tensor] = {}


def counter_buffer(device: torch.device) -> torch.Tensor:
    """The device's zeroed int32 counters. Kernels that use them run one after another on the
    forward pass's stream, and each leaves its counters at zero. The buffer must exist before a
    CUDA graph is captured (the warm-up step makes it), or it would live in the graph's pool."""
    if device not in _counters:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("arrival counters must be made before CUDA-graph capture")
        _counters[device] = torch.zeros(COUNTER_SLOTS, dtype=torch.int32, device=device)
    return _counters[device]


@jit
def arrive_last(counter_ptr, group, group_size):
    """Count this program in on `group`'s counter (after all its threads' earlier writes);
    True for the last of the group's `group_size` programs, which must later `reset`."""
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr + group, 1, sem="acq_rel", scope="gpu")
    return arrived == group_size - 1


@jit
def reset(counter_ptr, group):
    tl.atomic_xchg(counter_ptr + group, 0, sem="relaxed", scope="gpu")
