"""uxnet_kernels: fast large-kernel depthwise 3D convolution, channels-first LayerNorm and the fused UX block tail.

Public ops: :func:`dwconv3d`, :func:`layer_norm_channels_first`, :func:`ux_mlp` (the UX encoder) and
:func:`instance_norm_lrelu`, :func:`instance_norm_add_lrelu`, :func:`conv3d_3x3x3` (the UNETR decoder blocks), each
defined with its reference, checks, autograd, fakes and implementations in ``uxnet_kernels/ops/<op>.py``. Backend
selection: :func:`use_backend`, :func:`set_backend`, :func:`get_backend`, :func:`backend_report`. Ground truth:
:mod:`uxnet_kernels.reference`.
"""

from . import reference
from .dispatch import backend_report, get_backend, recording_backends, set_backend, use_backend
from .ops.conv3d_3x3x3 import conv3d_3x3x3, conv3d_3x3x3_pack_weight
from .ops.dwconv3d import dwconv3d
from .ops.instance_norm_add_lrelu import instance_norm_add_lrelu
from .ops.instance_norm_lrelu import instance_norm_lrelu
from .ops.layer_norm_channels_first import layer_norm_channels_first
from .ops.ux_mlp import ux_mlp

__version__ = "0.1.0"

__all__ = [
    "dwconv3d",
    "layer_norm_channels_first",
    "ux_mlp",
    "instance_norm_lrelu",
    "instance_norm_add_lrelu",
    "conv3d_3x3x3",
    "conv3d_3x3x3_pack_weight",
    "use_backend",
    "set_backend",
    "get_backend",
    "backend_report",
    "recording_backends",
    "reference",
]
