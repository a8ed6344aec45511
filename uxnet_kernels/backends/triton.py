"""The "triton" backend: the Triton kernels of ``uxnet_kernels.triton`` through their ``uxnet::*_triton`` ops.

It serves CUDA tensors, and CPU tensors when the kernels were built by the Triton interpreter
(``TRITON_INTERPRET=1`` set before they are first imported; slow, for tests). Importing this module does not
import triton; creating the backend (the dispatcher does, on first use) imports the kernels when it is available.
"""

import importlib

import torch

from .. import triton as triton_pkg
from .base import YES, Backend

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The ops with Triton kernels (uxnet_kernels/triton/ops.py).
_OPS = ("dwconv3d", "layer_norm_channels_first", "ux_mlp", "instance_norm_lrelu", "instance_norm_add_lrelu")


class TritonBackend(Backend):
    name = "triton"

    def __init__(self):
        # Decided once, eagerly: `supports` then only reads attributes and the tensor's device and dtype, which
        # torch.compile traces without graph breaks.
        self._verdict = self._check_available()
        if self._verdict[0]:
            importlib.import_module("uxnet_kernels.triton.ops")  # registers the uxnet::*_triton ops
        self._cpu_ok = triton_pkg.kernels_interpreted()

    @staticmethod
    def _check_available():
        if not triton_pkg.triton_installed():
            return False, "triton is not installed"
        if torch.cuda.is_available():
            return YES
        if triton_pkg.kernels_interpreted():
            return YES
        return False, "no CUDA device (set TRITON_INTERPRET=1 before import to run the kernels on CPU, slowly)"

    def available(self):
        return self._verdict

    def supports(self, op, x):
        ok, why = self.available()
        if not ok:
            return ok, why
        if op not in _OPS:
            return False, f"no Triton kernel for {op}"
        if x.device.type == "cpu":
            if not self._cpu_ok:
                return False, "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 before import)"
        elif x.device.type != "cuda":
            return False, f"input is on {x.device.type}; the Triton kernels run on cuda (or cpu when interpreted)"
        if x.dtype not in _DTYPES:
            return False, (f"dtype {x.dtype} not implemented by the Triton kernels (float32/bfloat16/float16 only: "
                           "float64 runs at a small fraction of GPU speed; use the compiled or reference backend)")
        return YES

    def dwconv3d(self, x, weight, bias):
        return torch.ops.uxnet.dwconv3d_triton(x, weight, bias)

    def layer_norm_channels_first(self, x, weight, bias, eps):
        return torch.ops.uxnet.layer_norm_cf_triton(x, weight, bias, eps)[0]

    def ux_mlp(self, y, residual, ln_weight, ln_bias, w1, b1, w2, b2, gamma, eps):
        return torch.ops.uxnet.ux_mlp_triton(y, residual, ln_weight, ln_bias, w1, b1, w2, b2, gamma, eps)[0]

    def instance_norm_lrelu(self, x, negative_slope, eps):
        return torch.ops.uxnet.instance_norm_lrelu_triton(x, negative_slope, eps)[0]

    def instance_norm_add_lrelu(self, z, residual, shortcut_inputs, shortcut_weights, negative_slope, eps):
        return torch.ops.uxnet.instance_norm_add_lrelu_triton(z, residual, shortcut_inputs, shortcut_weights,
                                                              negative_slope, eps)[0]
