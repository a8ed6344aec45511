"""Backend selection, reporting and fallback warnings of the public ops (one op's numbers are in tests/ops/), and
that every compiled schema has an opcheck sample in its op family's tests."""

import importlib
import warnings

import pytest
import torch

import uxnet_kernels as uk
from uxnet_kernels import dispatch, reference
from conftest import TOLERANCES, assert_close_rel, require_compiled
from ops.checks import DEVICES, DTYPES
from ops.samples import LAYOUTS, OP_TEST_MODULES, dwconv3d_args

OP_FAMILIES = tuple(importlib.import_module(f"ops.{name}") for name in OP_TEST_MODULES.values())


def test_auto_uses_compiled_cpu_backend():
    require_compiled("cpu")
    x, w, b = dwconv3d_args()
    with uk.use_backend("auto"):
        uk.dwconv3d(x, w, b)
        report = uk.backend_report("cpu")
    assert report["would_use"] == {op: "cpu" for op in report["would_use"]}
    assert report["last_used"]["dwconv3d@cpu"] == "cpu"


def test_explicit_backend_that_cannot_serve_warns_and_falls_back():
    """float16 on CPU is not served by the cpu kernels: the call must say so and still be right."""
    x, w, b = dwconv3d_args(dtype=torch.float16)
    dispatch._warned.clear()
    with uk.use_backend("cpu"), pytest.warns(RuntimeWarning, match="cannot serve"):
        out = uk.dwconv3d(x, w, b)
    assert dispatch._last_used[("dwconv3d", "cpu")] == "reference"
    want = reference.dwconv3d(x.float(), w.float(), b.float())
    assert_close_rel(out.float(), want, torch.float16, "fp16 fallback")


def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match="unknown backend"):
        uk.set_backend("fastest")


def test_use_backend_restores_previous_setting():
    uk.set_backend("auto")
    with uk.use_backend("reference"):
        assert uk.get_backend() == "reference"
    assert uk.get_backend() == "auto"


@pytest.mark.parametrize("device", DEVICES)
def test_backend_report_lists_every_backend(device):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = uk.backend_report(device)
    assert set(report["backends"]) == {"reference", "cpu", "cuda", "triton"}
    assert set(report["would_use"]) == set(OP_TEST_MODULES)
    assert report["backends"]["reference"]["available"]


def test_tolerance_table_covers_all_dtypes():
    assert set(TOLERANCES) >= set(DTYPES)


def test_every_schema_is_checked():
    """Every compiled uxnet schema has an opcheck sample in its family's opcheck_samples."""
    require_compiled("cpu")
    names = {name for family in OP_FAMILIES for layout in LAYOUTS
             for name, _ in family.opcheck_samples(layout)}
    registered = {s.name.split("::")[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("uxnet::")}
    cpp_ops = {n for n in registered if "triton" not in n}
    assert cpp_ops == names, f"ops without an opcheck sample: {sorted(cpp_ops - names)}"
