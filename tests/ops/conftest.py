"""Fixtures of the op-family tests (tests/conftest.py has the shared helpers)."""

import pytest

from conftest import poisoned_empty_tensors, require_compiled

from . import samples


@pytest.fixture(autouse=True)
def _triton_mode(request, monkeypatch):
    """A test marked ``triton``: the Triton ops registered and runnable here (the interpreter on CPU; skip without
    triton), and every buffer a Triton kernel writes NaN-poisoned first (UXNET_POISON_OUTPUTS=1), so an element it
    fails to write fails the comparison."""
    if request.node.get_closest_marker("triton") is not None:
        samples.triton_internals()
        monkeypatch.setenv("UXNET_POISON_OUTPUTS", "1")
    yield


@pytest.fixture
def triton_dwconv3d():
    """uxnet_kernels.triton.dwconv3d, for the tests that monkeypatch its tile sizes (samples.triton_internals)."""
    return samples.triton_internals("dwconv3d")


@pytest.fixture
def triton_instance_norm():
    """uxnet_kernels.triton.instance_norm (both instance-norm ops), for the tests that monkeypatch its tiles."""
    return samples.triton_internals("instance_norm")


@pytest.fixture
def small_instance_tiles(triton_instance_norm, monkeypatch):
    """Tiles of a few voxels and two tiles per reduction chunk, so the chunked statistics and sums are exercised."""
    monkeypatch.setattr(triton_instance_norm, "_INTERPRETER_INSTANCE_TILE", 32)
    monkeypatch.setattr(triton_instance_norm, "_INSTANCE_TILE", 256)
    monkeypatch.setattr(triton_instance_norm, "_INSTANCE_MAX_TILES", 2)
    monkeypatch.setattr(triton_instance_norm, "_INSTANCE_REDUCE_PROGRAMS", 1)


@pytest.fixture
def compiled_cpu():
    """The compiled CPU backend (skip without it; fail under UXNET_REQUIRE_EXTENSION=1)."""
    require_compiled("cpu")


@pytest.fixture
def poisoned_outputs():
    """torch.empty returns NaN-filled memory meanwhile: a value a kernel fails to write shows up as NaN."""
    with poisoned_empty_tensors():
        yield
