"""Running Triton kernels on the CPU: Triton's interpreter, for one test at a time."""

from __future__ import annotations

import pytest


@pytest.fixture
def interpret(monkeypatch):
    """`interpret(*modules)`: for this test, what TRITON_INTERPRET=1 at import would have given.

    triton.jit picks the interpreter when a function is decorated, and triton is usually imported
    (torch._dynamo imports it) before any test could set TRITON_INTERPRET: so every jitted
    function of the given modules, and triton.language's own jitted helpers such as tl.sum,
    become interpreted twins until the test ends, and other tests never see the interpreter.
    """

    def swap(*modules) -> None:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        monkeypatch.setenv("TRITON_INTERPRET", "1")
        for namespace in (*modules, tl, tl.standard):
            for name, value in list(vars(namespace).items()):
                if isinstance(value, JITFunction):
                    monkeypatch.setattr(namespace, name, _twin(value, InterpretedFunction))

    return swap


_twins: dict[int, object] = {}


def _twin(function, interpreted_type):
    # one interpreted twin per function, shared by every module that imported it
    if id(function) not in _twins:
        _twins[id(function)] = interpreted_type(function.fn)
    return _twins[id(function)]
