"""``torch.autocast`` support for the public ops (called first thing by ``uxnet_kernels.functional``).

Under an enabled autocast region for the device of the main input, each op casts its floating inputs the way
PyTorch's autocast would treat the operations it replaces, then runs with autocast disabled for that device, so
every backend (the reference one included, whose ``F.conv3d`` would otherwise re-autocast) sees exactly the same
dtypes. Like PyTorch, only float32/float16/bfloat16 tensors are cast; float64 inputs are left alone.

Policies:

* ``dwconv3d``: a convolution -> inputs cast to the autocast dtype, output in the autocast dtype (the kernels
  accumulate in float32).
* ``layer_norm_channels_first``: as ``F.layer_norm`` under autocast on that device. On CUDA ``layer_norm`` is on
  autocast's float32 list, so inputs are cast to float32 and the output is float32. On CPU ``layer_norm`` is not
  autocast, so it runs in the dtype of ``x`` (weight and bias cast to it) and returns that dtype. The statistics
  (mean, rstd) are float32 in every case: the kernels compute them in float32 for half-precision inputs.
* ``ux_mlp``: its two grouped 1x1x1 convolutions are convolutions, so the fused tail computes in the autocast
  dtype (float32 LayerNorm statistics and accumulation inside the kernel). The output takes the dtype of the
  residual stream: when ``residual`` already has the autocast dtype it is fused as usual; when it is wider (a
  float32 residual stream, as PyTorch's type promotion keeps it in the official block, where a float32 layer
  scale multiplies the half-precision pwconv2 output), the tail runs without the residual and
  ``residual + tail`` is added in the residual's dtype, so the residual stream never loses precision. With no
  residual the output has the autocast dtype.
* ``instance_norm_lrelu``: instance norm and LeakyReLU are on no autocast list, so it runs in the dtype of ``x``
  (normally the autocast dtype, as x is a convolution output), statistics in float32.
* ``instance_norm_add_lrelu``: the projection shortcut is a convolution, so its inputs and weights are cast to the
  autocast dtype; ``z`` and the residual are then brought to their promoted dtype, the dtype of the official
  ``instance_norm(z) + r`` (a float32 residual stream stays float32). Statistics in float32. A donated z is
  written over only when that dtype is z's own.
"""

from typing import Callable, Optional

import torch

# Device types whose autocast puts layer_norm on the float32 list (PyTorch's autocast_mode.cpp).
LAYER_NORM_FP32_DEVICES = ("cuda", "xpu")
_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


# The device type names a tensor can carry (c10/core/DeviceType.cpp, less the deprecated mkldnn/opengl/opencl/
# ideep); the registered name of the PrivateUse1 backend is added when it is known at import time.
_DEVICE_TYPE_NAMES = ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "maia", "xla", "lazy", "meta", "ipu", "ve", "hip",
                      "fpga", "vulkan", "privateuseone")


def _autocast_support_table() -> dict:
    names = set(_DEVICE_TYPE_NAMES)
    names.add(torch._C._get_privateuse1_backend_name())
    table = {}
    for name in sorted(names):
        try:
            table[name] = bool(torch.amp.is_autocast_available(name))
        except RuntimeError:  # a name this build of torch cannot parse
            continue
    return table


# Asked once, at import and outside any traced code: Dynamo before torch 2.13 cannot trace
# torch.amp.is_autocast_available (torch._C._is_autocast_available is "marked as skipped"), so active_dtype,
# which every op calls first, only reads this constant table under torch.compile.
AUTOCAST_SUPPORT = _autocast_support_table()


def autocast_available(device_type: str) -> bool:
    """Whether ``torch.autocast`` supports ``device_type`` (the table above; torch itself for unlisted names)."""
    known = AUTOCAST_SUPPORT.get(device_type)
    if known is None:  # e.g. a PrivateUse1 backend renamed after uxnet_kernels was imported
        return torch.amp.is_autocast_available(device_type)
    return known


def active_dtype(x) -> Optional[torch.dtype]:
    """The autocast dtype in force for ``x``'s device, or None when autocast is off (or x is no tensor)."""
    if not isinstance(x, torch.Tensor):
        return None
    device_type = x.device.type
    if not autocast_available(device_type):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _cast(dtype: torch.dtype, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if isinstance(t, torch.Tensor) and t.dtype in _CASTABLE and t.dtype != dtype:
        return t.to(dtype)
    return t


def _disabled(x: torch.Tensor) -> torch.autocast:
    # A torch.autocast object, not a @contextlib.contextmanager: Dynamo in torch 2.6 cannot trace the latter.
    return torch.autocast(device_type=x.device.type, enabled=False)


def dwconv3d(op: Callable, x, weight, bias, dtype: torch.dtype):
    with _disabled(x):
        return op(_cast(dtype, x), _cast(dtype, weight), _cast(dtype, bias))


def layer_norm_channels_first(op: Callable, x, weight, bias, eps, dtype: torch.dtype):
    if x.device.type in LAYER_NORM_FP32_DEVICES:
        compute = torch.float32
    else:
        compute = x.dtype if x.dtype in _CASTABLE else None
    with _disabled(x):
        if compute is None:
            return op(x, weight, bias, eps)
        return op(_cast(compute, x), _cast(compute, weight), _cast(compute, bias), eps)


def ux_mlp(op: Callable, y, residual, ln_weight, ln_bias, w1, b1, w2, b2, gamma, eps, dtype: torch.dtype):
    params = [_cast(dtype, t) for t in (ln_weight, ln_bias, w1, b1, w2, b2, gamma)]
    with _disabled(y):
        if y.dtype not in _CASTABLE:
            return op(y, residual, ln_weight, ln_bias, w1, b1, w2, b2, gamma, eps)
        y = _cast(dtype, y)
        if residual is None or residual.dtype == dtype or residual.dtype not in _CASTABLE:
            return op(y, _cast(dtype, residual), *params, eps)
        tail = op(y, None, *params, eps)
        return residual + tail.to(residual.dtype)


def instance_norm_lrelu(op: Callable, x, negative_slope, eps):
    with _disabled(x):
        return op(x, negative_slope, eps)


def instance_norm_add_lrelu(op: Callable, z, residual, shortcut_inputs, shortcut_weights, negative_slope, eps,
                            dtype: torch.dtype, donate_z: bool = False):
    shortcut_inputs = [_cast(dtype, t) for t in shortcut_inputs]
    shortcut_weights = [_cast(dtype, t) for t in shortcut_weights]
    others = [residual] if residual is not None else shortcut_inputs
    compute = z.dtype
    for t in others:
        if isinstance(t, torch.Tensor) and t.dtype in _CASTABLE and compute in _CASTABLE:
            compute = torch.promote_types(compute, t.dtype)
    with _disabled(z):
        return op(_cast(compute, z), _cast(compute, residual), [_cast(compute, t) for t in shortcut_inputs],
                  [_cast(compute, t) for t in shortcut_weights], negative_slope, eps,
                  donate_z=donate_z and compute == z.dtype)
