"""triton, imported when it is installed: kernel modules that must import without it (CPU-only
installs) take `triton`, `tl` and `jit` from here. Without triton, `triton` is None, `jit` leaves
functions as they are, and `tl.constexpr` exists so that kernel signatures still evaluate.
`cuda_capability` and `num_sms` are the cached device lookups the kernels' dispatch uses."""

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
