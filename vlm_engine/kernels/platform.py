"""Where kernels run: the one place that decides between a Triton kernel and the torch reference.

- `triton`, `tl`, `jit`: triton where it is installed. Kernel modules that must import without it
  (CPU-only installs) take them from here: without triton, `triton` is None, `jit` leaves
  functions as they are, and `tl.constexpr` exists so that kernel signatures still evaluate.
- `runs_on_triton(x)`: every op's dispatch test (a CUDA tensor, triton installed).
- `triton_available(device, kernel)`: whether a kernel can launch on a device; a kernel swapped
  for its interpreter twin (tests, `TRITON_INTERPRET`) runs on the CPU too.
- `cuda_capability`, `num_sms`: the cached device lookups behind the Hopper kernel choices,
  split counts and persistent grids.
"""

import functools
from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = SimpleNamespace(constexpr=None)


def jit(fn):
    return fn if triton is None else triton.jit(fn)


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device (index None: device 0), cached."""
    return _capability(device.index if device.index is not None else 0)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.cache
def num_sms(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device, cached (persistent grids and split counts)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def triton_available(device: torch.device | str | None = None, kernel: object = None) -> bool:
    """Whether a Triton kernel can run on `device` (default: any CUDA device present): triton
    installed and a CUDA device, or `kernel` (a jitted function) replaced by its interpreted
    twin, which runs on the CPU (the kernel tests under TRITON_INTERPRET)."""
    if triton is None:
        return False
    if kernel is not None and interpreted(kernel):
        return True
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def interpreted(kernel: object) -> bool:
    """Whether `kernel` is the interpreter twin of a Triton kernel (TRITON_INTERPRET, the CPU
    tests), which lacks libdevice and compiled-only paths, rather than the compiled kernel."""
    return not isinstance(kernel, triton.runtime.JITFunction)


def runs_on_triton(x: torch.Tensor) -> bool:
    """Whether the ops on `x` take their Triton kernels: a CUDA tensor with triton installed.
    (Tests reach the interpreter by calling the Triton wrappers directly.)"""
    return x.is_cuda and triton is not None
