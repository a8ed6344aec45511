"""Triton kernels of the uxnet ops (one kernel family per module) and their ``torch.library.triton_op`` wrappers.

Importing this package does not import triton: ``dwconv3d``, ``layer_norm``, ``ux_mlp`` and ``instance_norm`` hold
the kernels and ``ops`` registers the ``uxnet::*_triton`` operators; import those only when triton is needed.

With ``TRITON_INTERPRET=1`` set *before the kernel modules are imported*, ``triton.jit`` builds interpreted
kernels that run on CPU tensors (slowly, for tests); the choice is fixed at import time. The kernels call only
triton.language builtins and this package's own jit helpers (``tl.reduce(x, axis, _sum_combine)`` rather than
``tl.sum``, ``tl.full`` rather than ``tl.zeros``): triton.language's jit helpers take the mode triton itself was
imported in, so using them would break the interpreter whenever triton was imported before TRITON_INTERPRET=1.
"""

import importlib.util
import os
import sys

KERNEL_MODULES = (
    "uxnet_kernels.triton.dwconv3d",
    "uxnet_kernels.triton.layer_norm",
    "uxnet_kernels.triton.ux_mlp",
    "uxnet_kernels.triton.instance_norm",
)


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_requested() -> bool:
    """Whether TRITON_INTERPRET is set now (decides the mode of kernel modules imported from now on)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def is_interpreted(kernel) -> bool:
    """Whether a ``triton.jit`` kernel (or an autotuner around one) was built by the interpreter."""
    fn = getattr(kernel, "fn", kernel) if type(kernel).__name__ == "Autotuner" else kernel
    return type(fn).__name__ == "InterpretedFunction"


def kernels_interpreted() -> bool:
    """Whether the kernels run under the interpreter: fixed once a kernel module is imported, else the env var."""
    module = sys.modules.get(KERNEL_MODULES[0])
    if module is not None:
        return module.INTERPRETED
    return interpreter_requested()
