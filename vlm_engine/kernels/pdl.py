"""Programmatic dependent launch (PDL) for the forward pass's Triton kernels on Hopper and later.

A decode step at batch 1 is ~300 short kernels in a row, and between two of them the GPU idles
while the first drains and the second is scheduled onto the SMs. With PDL a kernel is launched
while the one before it still runs: its programs become resident early, do work that does not
depend on the kernel before (loading weights), then wait in `gdc_wait` until that kernel has
finished and its writes are visible.

The rule that keeps this correct: every kernel launched with PDL calls `pdl_wait` in every
program before it writes anything, and before it reads what the kernel just before it wrote.
`pdl_wait` lets the next kernel launch only once it has waited, so when kernel N + 1 starts, every
program of kernel N has waited, kernel N - 1 has finished, and by induction all earlier kernels:
before its own wait, kernel N + 1 may read what was written two or more kernels back (a residual
stream, a step's metadata), never what kernel N writes. Its completion implies the completion of
all earlier kernels. Kernels that are not launched with PDL (torch's own, cuBLAS) wait for the
previous kernel as usual.

The switch VLM_ENGINE_PDL (vlm_engine/envs.py) is read when a kernel launches; CUDA graphs keep
what they captured.
"""

from __future__ import annotations

import torch

from vlm_engine import envs
from vlm_engine.kernels.platform import cuda_capability, jit, tl, triton


@jit
def pdl_wait(USE_PDL: tl.constexpr):
    """Wait for the previous kernel's results, then let the next kernel launch."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def use_pdl(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL: a Hopper-or-later GPU, compiled kernels."""
    if not envs.values.pdl or triton is None or device.type != "cuda":
        return False
    if not isinstance(pdl_wait, triton.runtime.JITFunction):  # the interpreter
        return False
    return cuda_capability(device)[0] >= 9


def pdl_options(device: torch.device) -> dict:
    """Keyword arguments for a kernel launch: the USE_PDL constexpr and the launch flag."""
    if use_pdl(device):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}
