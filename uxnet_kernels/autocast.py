"""``torch.autocast`` helpers of the op families.

Under an enabled autocast region for the device of the main input, each op (``uxnet_kernels/ops/<op>.py``, its
"autocast policy") casts its floating inputs the way PyTorch's autocast would treat the operations it replaces,
then runs with autocast disabled for that device (:func:`disabled`), so every backend (the reference one included,
whose ``F.conv3d`` would otherwise re-autocast) sees exactly the same dtypes. Like PyTorch, only
float32/float16/bfloat16 tensors are cast (:func:`cast`); float64 inputs are left alone.
"""

from typing import Optional

import torch

CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


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


def cast(dtype: torch.dtype, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if isinstance(t, torch.Tensor) and t.dtype in CASTABLE and t.dtype != dtype:
        return t.to(dtype)
    return t


def disabled(x: torch.Tensor) -> torch.autocast:
    # A torch.autocast object, not a @contextlib.contextmanager: Dynamo in torch 2.6 cannot trace the latter.
    return torch.autocast(device_type=x.device.type, enabled=False)
