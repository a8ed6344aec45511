"""Pure-PyTorch reference implementations: the ground truth of every test.

They follow the official 3D UX-Net code operation for operation (``F.conv3d`` with ``groups=C``,
the channels-first LayerNorm written with ``mean``/``pow``, grouped 1x1x1 convolutions and exact GELU),
so autograd through them gives reference gradients, and they run on any device and dtype PyTorch does.
Each is defined in its op family module (``uxnet_kernels/ops/<op>.py``); this module gathers them.
"""

from .ops.conv3d_3x3x3 import reference as conv3d_3x3x3
from .ops.dwconv3d import reference as dwconv3d
from .ops.instance_norm_add_lrelu import reference as instance_norm_add_lrelu
from .ops.instance_norm_lrelu import reference as instance_norm_lrelu
from .ops.layer_norm_channels_first import reference as layer_norm_channels_first
from .ops.ux_mlp import reference as ux_mlp

__all__ = ["dwconv3d", "layer_norm_channels_first", "ux_mlp", "instance_norm_lrelu", "instance_norm_add_lrelu",
           "conv3d_3x3x3"]
