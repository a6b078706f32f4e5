"""triton, imported when it is installed: kernel modules that must import without it (CPU-only
installs) take `triton`, `tl` and `jit` from here. Without triton, `triton` is None, `jit` leaves
functions as they are, and `tl.constexpr` exists so that kernel signatures still evaluate."""

from types import SimpleNamespace

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = SimpleNamespace(constexpr=None)


def jit(fn):
    return fn if triton is None else triton.jit(fn)
