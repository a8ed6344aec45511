"""Loads the compiled operator library ``uxnet_kernels._C`` (schemas in csrc/registration.cpp).

If it is missing (a source checkout that was never built, or a failed build) the package still imports and
every op runs on the reference backend; one warning says so.
"""

import importlib.util
import warnings

import torch

LOADED = False
LOAD_ERROR = ""

try:
    from . import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)

    LOADED = True
except ImportError:  # pragma: no cover - depends on the install
    if importlib.util.find_spec(f"{__package__}._C") is None:
        exc = ImportError("no built library next to the package: it was installed without compiling")
    LOAD_ERROR = str(exc)
    warnings.warn(
        "uxnet_kernels: the compiled extension uxnet_kernels._C is not available "
        f"({exc}); every op runs on the pure-PyTorch reference backend. Build it with "
        "`pip install --no-build-isolation .` (see README).",
        RuntimeWarning,
        stacklevel=2,
    )


def has_kernel(op_name: str, dispatch_key: str) -> bool:
    """Whether ``uxnet::op_name`` has a kernel registered for ``dispatch_key`` ("CPU", "CUDA")."""
    if not LOADED:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"uxnet::{op_name}", dispatch_key)


def registered_ops(dispatch_key: str) -> list:
    """The ``uxnet::`` operators with a kernel for ``dispatch_key`` ("CPU", "CUDA")."""
    if not LOADED:
        return []
    return [name for name in torch._C._dispatch_get_registrations_for_dispatch_key(dispatch_key)
            if name.startswith("uxnet::")]


def conv3d_3x3x3_columns(float64: bool) -> int:
    """The column-panel width of ``uxnet::conv3d_3x3x3_pack_weight``'s result on the ISA selected now."""
    return _C.conv3d_3x3x3_columns(bool(float64))


def conv3d_3x3x3_bf16_products() -> bool:
    """Whether bfloat16 inputs of the CPU ``uxnet::conv3d_3x3x3`` run bf16 products (AVX512_BF16's vdpbf16ps, or
    its exact emulation on avx512-emulated) on the ISA selected now; their packed weights are bf16 pairs."""
    return bool(_C.conv3d_3x3x3_bf16_products())


def conv3d_3x3x3_few_tiles_large_filter(x_shape, weight_shape, element_size: int) -> bool:
    """Whether these shapes have few Winograd tiles with a large transformed filter (the CPU ``uxnet::conv3d_3x3x3``
    streams a float32 filter per call there, and runs ATen's bf16 convolution for bfloat16 without a packed
    weight)."""
    n, _, d, h, w = (int(s) for s in x_shape)
    return _C.conv3d_3x3x3_few_tiles_large_filter(n, d, h, w, int(weight_shape[0]), int(weight_shape[1]),
                                                  int(element_size))
