"""The one convention for bad-input tests.

Each family file declares a table ``BAD_INPUT`` of :class:`Bad` rows (case id, args builder, expected exception
type, message regex, and where to send it) and runs it with one parametrized test::

    @pytest.mark.parametrize("case,backend", bad_input.params(BAD_INPUT))
    def test_bad_input(case, backend):
        bad_input.check(case, backend, uk.dwconv3d)

A row without ``schema`` goes through the public op, once on each backend in ``backends`` (the Python validation:
ValueError); a row with ``schema`` (a schema, named after its public op, e.g. "dwconv3d_backward") calls
torch.ops.uxnet.<schema> directly: what C++ / TorchScript callers get, RuntimeError.
A compiled backend or schema that is absent skips (fails under UXNET_REQUIRE_EXTENSION=1, see conftest).
"""

import contextlib
from typing import Any, Callable, NamedTuple, Optional, Sequence

import pytest

from conftest import require_compiled

from .samples import cpp_op

BACKENDS = ("reference", "cpu")


class Bad(NamedTuple):
    id: str
    build: Callable[[], Any]  # -> the call's args: a tuple, or (tuple, dict) made by call(...)
    exc: type
    match: str
    schema: Optional[str] = None  # None: the public op on `backends`; else torch.ops.uxnet.<schema> directly
    backends: Sequence[str] = BACKENDS


class _Call(NamedTuple):
    args: tuple
    kwargs: dict


def call(*args, **kwargs) -> _Call:
    """What a row's builder returns when the call needs keyword arguments."""
    return _Call(args, kwargs)


def params(table):
    """pytest params (case, backend) of a table: public-op rows once per backend, schema rows once ("cpp")."""
    ids = [row.id for row in table]
    assert len(ids) == len(set(ids)), f"duplicate case ids in a bad-input table: {ids}"
    out = []
    for row in table:
        for backend in (row.backends if row.schema is None else ("cpp",)):
            out.append(pytest.param(row, backend, id=f"{row.id}-{backend}"))
    return out


def check(case: Bad, backend: str, public_op: Callable) -> None:
    """Build the row's arguments and assert the call raises case.exc matching case.match."""
    import uxnet_kernels as uk

    if backend in ("cpu", "cpp"):
        require_compiled("cpu")
    built = case.build()
    args, kwargs = (built.args, built.kwargs) if isinstance(built, _Call) else (tuple(built), {})
    if case.schema is None:
        fn, ctx = public_op, uk.use_backend(backend)
    else:
        fn, ctx = cpp_op(case.schema), contextlib.nullcontext()
    with ctx, pytest.raises(case.exc, match=case.match):
        fn(*args, **kwargs)
