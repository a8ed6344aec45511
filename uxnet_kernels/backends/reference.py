"""The reference backend: pure PyTorch, any device and floating dtype, autograd by PyTorch itself."""

from .. import reference
from .base import YES, Backend


class ReferenceBackend(Backend):
    name = "reference"

    def available(self):
        return YES

    def supports(self, op, x):
        return YES

    def dwconv3d(self, x, weight, bias):
        return reference.dwconv3d(x, weight, bias)

    def layer_norm_channels_first(self, x, weight, bias, eps):
        return reference.layer_norm_channels_first(x, weight, bias, eps)

    def ux_mlp(self, y, residual, ln_weight, ln_bias, w1, b1, w2, b2, gamma, eps):
        return reference.ux_mlp(y, residual, ln_weight, ln_bias, w1, b1, w2, b2, gamma, eps)

    def instance_norm_lrelu(self, x, negative_slope, eps):
        return reference.instance_norm_lrelu(x, negative_slope, eps)

    def instance_norm_add_lrelu(self, z, residual, shortcut_inputs, shortcut_weights, negative_slope, eps):
        return reference.instance_norm_add_lrelu(z, residual, shortcut_inputs, shortcut_weights, negative_slope, eps)
