"""The compiled C++/CUDA backends: ``torch.ops.uxnet.*`` with the kernels of csrc/cpu and csrc/cuda."""

import torch

from .. import _cpp_ops  # registers fake impls and autograd
from .._extension import LOAD_ERROR, LOADED, has_kernel
from .base import YES, Backend

_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float64),
    "cuda": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
}
_SCHEMA_NAMES = {
    "dwconv3d": "dwconv3d",
    "layer_norm_channels_first": "layer_norm_channels_first",
    "ux_mlp": "ux_mlp",
    "instance_norm_lrelu": "instance_norm_lrelu",
    "instance_norm_add_lrelu": "instance_norm_add_lrelu",
}


class CompiledBackend(Backend):
    """Backend "cpu" (device_type="cpu") or "cuda" (device_type="cuda")."""

    def __init__(self, device_type: str):
        self.name = device_type
        self.device_type = device_type
        self.dispatch_key = device_type.upper()
        # Looked up once here: the dispatcher query is not traceable by torch.compile, and the registrations of a
        # loaded library do not change.
        self._has_kernel = {op: has_kernel(schema, self.dispatch_key) for op, schema in _SCHEMA_NAMES.items()}
        self._has_inplace_tail = has_kernel("instance_norm_add_lrelu_inplace", self.dispatch_key)

    def available(self):
        if not LOADED:
            return False, f"uxnet_kernels._C not built ({LOAD_ERROR})"
        if not self._has_kernel["dwconv3d"]:
            return False, f"uxnet_kernels._C was built without {self.dispatch_key} kernels"
        return YES

    def supports(self, op, x):
        ok, why = self.available()
        if not ok:
            return ok, why
        if x.device.type != self.device_type:
            return False, f"input is on {x.device.type}, backend {self.name!r} runs on {self.device_type}"
        if not self._has_kernel[op]:
            return False, f"no {self.dispatch_key} kernel registered for uxnet::{_SCHEMA_NAMES[op]}"
        if x.dtype not in _DTYPES[self.device_type]:
            return False, f"dtype {x.dtype} not implemented by the {self.name} kernels"
        return YES

    def dwconv3d(self, x, weight, bias):
        return torch.ops.uxnet.dwconv3d(x, weight, bias)

    def layer_norm_channels_first(self, x, weight, bias, eps):
        return torch.ops.uxnet.layer_norm_channels_first(x, weight, bias, eps)[0]

    def ux_mlp(self, y, residual, ln_weight, ln_bias, w1, b1, w2, b2, gamma, eps):
        return torch.ops.uxnet.ux_mlp(y, residual, ln_weight, ln_bias, w1, b1, w2, b2, gamma, eps)[0]

    def instance_norm_lrelu(self, x, negative_slope, eps):
        return torch.ops.uxnet.instance_norm_lrelu(x, negative_slope, eps)[0]

    def instance_norm_add_lrelu(self, z, residual, shortcut_inputs, shortcut_weights, negative_slope, eps):
        return torch.ops.uxnet.instance_norm_add_lrelu(z, residual, shortcut_inputs, shortcut_weights,
                                                       negative_slope, eps)[0]

    def donation_verdict(self):
        if not self._has_inplace_tail:
            return False, f"no {self.dispatch_key} kernel registered for uxnet::instance_norm_add_lrelu_inplace"
        return YES

    def instance_norm_add_lrelu_donated(self, z, residual, shortcut_inputs, shortcut_weights, negative_slope, eps):
        return _cpp_ops.InstanceNormAddLReLUInplace.apply(z, residual, negative_slope, eps, *shortcut_inputs,
                                                          *shortcut_weights)
