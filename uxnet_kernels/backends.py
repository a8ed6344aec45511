"""The four backends, and what each can run regardless of the op: built or installed, device, dtypes.

Each op family (``uxnet_kernels/ops/<op>.py``) lists its implementations per backend; the dispatcher asks the
backend first (``supports(x)``: device, dtype, availability) and the implementation second (a kernel registered
for that op). Every backend is built here, once, when ``uxnet_kernels`` is imported, so nothing is imported or
queried inside code that ``torch.compile`` traces.

* ``reference``: pure PyTorch, any device and floating dtype; autograd by PyTorch itself.
* ``cpu`` / ``cuda``: the compiled library ``uxnet_kernels._C`` (``torch.ops.uxnet.<op>``, csrc/cpu, csrc/cuda).
* ``triton``: the Triton kernels of ``uxnet_kernels.triton`` (``torch.ops.uxnet.<op>_triton``) on CUDA tensors,
  and on CPU tensors when the kernels run under the interpreter (``TRITON_INTERPRET=1`` before import).
"""

from typing import Dict, Tuple

import torch

from . import _extension
from . import triton as triton_runtime

Verdict = Tuple[bool, str]
YES: Verdict = (True, "")

NAMES = ("reference", "cpu", "cuda", "triton")
# Which fast backends "auto" tries, in order, per device type; anything they decline runs on "reference".
AUTO_ORDER = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}


class Backend:
    name = "?"

    def available(self) -> Verdict:
        """Whether this backend is built or installed on this machine at all."""
        raise NotImplementedError

    def supports(self, x: torch.Tensor) -> Verdict:
        """Whether this backend can take the main input ``x`` (device, dtype), for any op."""
        raise NotImplementedError


class ReferenceBackend(Backend):
    name = "reference"

    def available(self):
        return YES

    def supports(self, x):
        return YES


_COMPILED_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float64),
    "cuda": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
}


class CompiledBackend(Backend):
    """Backend "cpu" or "cuda": the ``torch.ops.uxnet`` kernels that ``uxnet_kernels._C`` registers for it."""

    def __init__(self, device_type: str):
        self.name = device_type
        self.device_type = device_type
        self.dispatch_key = device_type.upper()
        self._verdict = self._check_available()

    def _check_available(self) -> Verdict:
        if not _extension.LOADED:
            return False, f"uxnet_kernels._C not built ({_extension.LOAD_ERROR})"
        if not _extension.registered_ops(self.dispatch_key):
            return False, f"uxnet_kernels._C was built without {self.dispatch_key} kernels"
        return YES

    def available(self):
        return self._verdict

    def has_kernel(self, schema: str) -> Verdict:
        """Whether ``uxnet::<schema>`` has a kernel for this device (asked once, when an op family is built)."""
        if self._verdict[0] and not _extension.has_kernel(schema, self.dispatch_key):
            return False, f"no {self.dispatch_key} kernel registered for uxnet::{schema}"
        return self._verdict

    def supports(self, x):
        if not self._verdict[0]:
            return self._verdict
        if x.device.type != self.device_type:
            return False, f"input is on {x.device.type}, backend {self.name!r} runs on {self.device_type}"
        if x.dtype not in _COMPILED_DTYPES[self.device_type]:
            return False, f"dtype {x.dtype} not implemented by the {self.name} kernels"
        return YES


_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class TritonBackend(Backend):
    name = "triton"

    def __init__(self):
        self._verdict = self._check_available()
        self._cpu_ok = triton_runtime.kernels_interpreted()

    @staticmethod
    def _check_available() -> Verdict:
        if not triton_runtime.triton_installed():
            return False, "triton is not installed"
        if torch.cuda.is_available() or triton_runtime.kernels_interpreted():
            return YES
        return False, "no CUDA device (set TRITON_INTERPRET=1 before import to run the kernels on CPU, slowly)"

    def available(self):
        return self._verdict

    def supports(self, x):
        if not self._verdict[0]:
            return self._verdict
        if x.device.type == "cpu":
            if not self._cpu_ok:
                return False, "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 before import)"
        elif x.device.type != "cuda":
            return False, f"input is on {x.device.type}; the Triton kernels run on cuda (or cpu when interpreted)"
        if x.dtype not in _TRITON_DTYPES:
            return False, (f"dtype {x.dtype} not implemented by the Triton kernels (float32/bfloat16/float16 only: "
                           "float64 runs at a small fraction of GPU speed; use the compiled or reference backend)")
        return YES


BACKENDS: Dict[str, Backend] = {
    "reference": ReferenceBackend(),
    "cpu": CompiledBackend("cpu"),
    "cuda": CompiledBackend("cuda"),
    "triton": TritonBackend(),
}
