"""Triton kernels of the uxnet ops: one module per op family holding its kernels, the host code that launches them
and its ``torch.library.triton_op`` operators ``uxnet::<op>_triton`` / ``uxnet::<op>_triton_backward`` (autograd
is registered by the op's family module, uxnet_kernels/ops/<op>.py); ``launch`` holds the host helpers they share,
``channels_first`` what the LayerNorm and UX MLP kernels share. This package itself is the runtime check (is triton
installed, are kernels interpreted) and imports no triton; the family modules import a kernel module only when the
triton backend is usable.

With ``TRITON_INTERPRET=1`` set *before the kernel modules are imported*, ``triton.jit`` builds interpreted
kernels that run on CPU tensors (slowly, for tests); the choice is fixed at import time. The kernels call only
triton.language builtins and this package's own jit helpers (``tl.reduce(x, axis, _sum_combine)`` rather than
``tl.sum``, ``tl.full`` rather than ``tl.zeros``): triton.language's jit helpers take the mode triton itself was
imported in, so using them would break the interpreter whenever triton was imported before TRITON_INTERPRET=1.

The kernel modules call ``fix_interpreter_scalar_index()`` when interpreted: the interpreter of triton <= 3.6
converts a scalar kernel argument used as a Python int (a run-time loop bound: ``for kd in range(0, KD)``) with
``int(array)`` on a one-element array, which NumPy >= 2.4 rejects ("only 0-dimensional arrays can be converted to
Python scalars"); triton 3.9 takes the element first, and so does the fix.
"""

import importlib.util
import os
import sys

# The module whose import fixes whether kernels are interpreted (every kernel module imports it first).
LAUNCH_MODULE = "uxnet_kernels.triton.launch"


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_requested() -> bool:
    """Whether TRITON_INTERPRET is set now (decides the mode of kernel modules imported from now on)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def is_interpreted(kernel) -> bool:
    """Whether a ``triton.jit`` kernel (or an autotuner around one) was built by the interpreter."""
    fn = getattr(kernel, "fn", kernel) if type(kernel).__name__ == "Autotuner" else kernel
    return type(fn).__name__ == "InterpretedFunction"


def fix_interpreter_scalar_index() -> None:
    """Make the Triton interpreter's ``tensor.__index__`` take the single element of a one-element array before
    ``int()`` (see the module docstring). Compiled kernels are untouched; call only when running interpreted."""
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "uxnet_index_fix", False):
        return

    def index(self):
        data = self.handle.data
        return int(data.reshape(-1)[0]) if data.size == 1 else int(data)

    def patch_lang_tensor(tensor, *scope):
        original(tensor, *scope)
        if scope:  # newer triton: patches go through a scope that undoes them after the launch
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    patch_lang_tensor.uxnet_index_fix = True
    interpreter._patch_lang_tensor = patch_lang_tensor


def kernels_interpreted() -> bool:
    """Whether the kernels run under the interpreter: fixed once a kernel module is imported, else the env var."""
    module = sys.modules.get(LAUNCH_MODULE)
    if module is not None:
        return module.INTERPRETED
    return interpreter_requested()
