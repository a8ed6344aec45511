"""dwconv3d: the large-kernel depthwise 3D convolution of the UX block, stride 1, zero "same" padding.

Operators: ``uxnet::dwconv3d`` / ``uxnet::dwconv3d_backward`` (C++: csrc/cpu/dwconv3d, csrc/cuda/dwconv3d) and
``uxnet::dwconv3d_triton`` / ``uxnet::dwconv3d_triton_backward`` (uxnet_kernels/triton/dwconv3d.py).
"""

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _extension, autocast, dispatch, validation
from ..backends import BACKENDS
from .common import EMPTY_GRAD_SHAPE, convolution_autograd_rule, empty_like, empty_result, grad_or_empty

OP = "dwconv3d"


def reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Depthwise 3D convolution, stride 1, zero "same" padding. x: (N, C, D, H, W); weight: (C, 1, KD, KH, KW)."""
    kd, kh, kw = weight.shape[2:]
    return F.conv3d(x, weight, bias, padding=(kd // 2, kh // 2, kw // 2), groups=x.shape[1])


def check_args(x, weight, bias) -> None:
    validation.check_tensor(OP, "x", x, 5, "(N, C, D, H, W)")
    validation.check_tensor(OP, "weight", weight, 5, "(C, 1, KD, KH, KW)")
    channels = x.shape[1]
    if weight.shape[0] != channels or weight.shape[1] != 1:
        validation.fail(OP, f"expected weight of shape ({channels}, 1, KD, KH, KW) for x with {channels} channels, "
                            f"got {tuple(weight.shape)}")
    kernel = tuple(weight.shape[2:])
    if any(k % 2 == 0 for k in kernel):
        validation.fail(OP, f"expected odd kernel sizes (same padding is k // 2 per side), got {kernel}")
    if bias is not None:
        validation.check_tensor(OP, "bias", bias, 1, f"({channels},)")
        if bias.shape[0] != channels:
            validation.fail(OP, f"expected bias of shape ({channels},), got {tuple(bias.shape)}")
    validation.check_same_dtype_device(OP, "x", x, weight=weight, bias=bias)


def autograd_rule(backward_op):
    """(backward, setup_context) for the forward ``(x, weight, bias?) -> out``; ``backward_op`` has the schema of
    ``uxnet::dwconv3d_backward``."""
    return convolution_autograd_rule(OP, backward_op)


def _register_compiled() -> None:
    @torch.library.register_fake("uxnet::dwconv3d")
    def _fake(x, weight, bias):
        return empty_like(x)

    @torch.library.register_fake("uxnet::dwconv3d_backward")
    def _backward_fake(grad_out, x, weight, output_mask):
        grad_x = empty_like(grad_out) if output_mask[0] else x.new_empty(EMPTY_GRAD_SHAPE)
        grad_bias = x.new_empty((x.shape[1],)) if output_mask[2] else x.new_empty(EMPTY_GRAD_SHAPE)
        return grad_x, grad_or_empty(output_mask[1], weight), grad_bias

    backward, setup = autograd_rule(torch.ops.uxnet.dwconv3d_backward)
    torch.library.register_autograd("uxnet::dwconv3d", backward, setup_context=setup)


def _register_triton() -> None:
    from ..triton import dwconv3d as _kernels  # noqa: F401  (defines the uxnet::dwconv3d_triton operators)

    backward, setup = autograd_rule(torch.ops.uxnet.dwconv3d_triton_backward)
    torch.library.register_autograd("uxnet::dwconv3d_triton", backward, setup_context=setup)


def _compiled(x, weight, bias):
    return torch.ops.uxnet.dwconv3d(x, weight, bias)


def _triton(x, weight, bias):
    return torch.ops.uxnet.dwconv3d_triton(x, weight, bias)


if _extension.LOADED:
    _register_compiled()
if BACKENDS["triton"].available()[0]:
    _register_triton()

FAMILY = dispatch.register(dispatch.OpFamily(OP, [
    dispatch.Implementation("reference", reference),
    dispatch.Implementation("cpu", _compiled, BACKENDS["cpu"].has_kernel(OP)),
    dispatch.Implementation("cuda", _compiled, BACKENDS["cuda"].has_kernel(OP)),
    dispatch.Implementation("triton", _triton),
]))


def dwconv3d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Depthwise 3D convolution with stride 1 and zero "same" padding.

    Equal to ``F.conv3d(x, weight, bias, padding=(kd // 2, kh // 2, kw // 2), groups=C)``. Under
    ``torch.autocast`` it is a convolution: inputs cast to the autocast dtype, output in that dtype (the kernels
    accumulate in float32).

    Args:
        x: (N, C, D, H, W), float32 / bfloat16 / float16 / float64, contiguous or channels_last_3d.
        weight: (C, 1, KD, KH, KW) with odd KD, KH, KW (e.g. 7x7x7, 21x21x21, 7x7x3); same dtype and device as x.
        bias: (C,) or None.

    Returns:
        (N, C, D, H, W) in x's dtype (and, on the compiled backends, x's memory format).

    Raises:
        ValueError: wrong rank, even kernel size, weight/bias not matching the channels of x, dtype or device
            mismatch, non-floating dtypes.
    """
    amp_dtype = autocast.active_dtype(x)
    if amp_dtype is None:
        return _run(x, weight, bias)
    with autocast.disabled(x):
        return _run(autocast.cast(amp_dtype, x), autocast.cast(amp_dtype, weight), autocast.cast(amp_dtype, bias))


def _run(x, weight, bias):
    check_args(x, weight, bias)
    if x.numel() == 0:
        return empty_result(x, weight, bias)
    return dispatch.select(FAMILY, x).run(x, weight, bias)
