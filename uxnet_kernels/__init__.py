"""uxnet_kernels: fast large-kernel depthwise 3D convolution, channels-first LayerNorm and the fused UX block tail.

Public ops: :func:`dwconv3d`, :func:`layer_norm_channels_first`, :func:`ux_mlp` (the UX encoder) and
:func:`instance_norm_lrelu`, :func:`instance_norm_add_lrelu` (the UNETR decoder blocks). Backend selection:
:func:`use_backend`, :func:`set_backend`, :func:`get_backend`, :func:`backend_report`. Ground truth:
:mod:`uxnet_kernels.reference`.
"""

from . import _extension, reference  # noqa: F401  (loads the compiled ops, or warns once)
from . import _cpp_ops  # noqa: F401  (fake impls and autograd of the compiled ops)
from .dispatch import backend_report, get_backend, recording_backends, set_backend, use_backend
from .functional import dwconv3d, instance_norm_add_lrelu, instance_norm_lrelu, layer_norm_channels_first, ux_mlp

__version__ = "0.1.0"

__all__ = [
    "dwconv3d",
    "layer_norm_channels_first",
    "ux_mlp",
    "instance_norm_lrelu",
    "instance_norm_add_lrelu",
    "use_backend",
    "set_backend",
    "get_backend",
    "backend_report",
    "recording_backends",
    "reference",
]
