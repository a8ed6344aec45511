"""Backend selection: which implementation serves each op call.

``use_backend(name)`` (context manager) and ``set_backend(name)`` choose the backend for every op:

* ``"auto"`` (default): CPU tensors -> "cpu" (the C++ kernels); CUDA tensors -> "triton", then "cuda";
  anything no fast backend supports -> "reference".
* ``"reference"``: the pure-PyTorch ops of ``uxnet_kernels.reference``.
* ``"cpu"``, ``"cuda"``, ``"triton"``: that backend; if it cannot serve a call (wrong device, dtype,
  not built) the call falls back to "reference" with a warning naming the reason, once per reason.

Every decision is logged at DEBUG level on the ``uxnet_kernels.dispatch`` logger and the last backend used
per (op, device type) is kept for ``backend_report()``. Nothing here holds tensors or streams, so the ops are
safe under DDP and multi-threaded data loading.
"""

import contextlib
import importlib
import logging
import warnings
from typing import Dict, Iterator, List, Tuple

import torch

from .backends.base import OPS, Backend

logger = logging.getLogger("uxnet_kernels.dispatch")

BACKEND_NAMES = ("auto", "reference", "cpu", "cuda", "triton")
_AUTO_ORDER = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}
_BACKEND_CLASSES = {
    "reference": ("uxnet_kernels.backends.reference", "ReferenceBackend", ()),
    "cpu": ("uxnet_kernels.backends.compiled", "CompiledBackend", ("cpu",)),
    "cuda": ("uxnet_kernels.backends.compiled", "CompiledBackend", ("cuda",)),
    "triton": ("uxnet_kernels.backends.triton", "TritonBackend", ()),
}


class _State:
    backend = "auto"


_state = _State()
_instances: Dict[str, Backend] = {}
_last_used: Dict[Tuple[str, str], str] = {}
_recorders: List[Dict[str, str]] = []
_warned = set()


def get_backend_instance(name: str) -> Backend:
    """The backend object for ``name`` (imported on first use)."""
    if name not in _instances:
        module_name, class_name, args = _BACKEND_CLASSES[name]
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
            _instances[name] = cls(*args)
        except ImportError as exc:
            _instances[name] = _Unavailable(name, f"cannot import {module_name}: {exc}")
    return _instances[name]


class _Unavailable(Backend):
    def __init__(self, name: str, why: str):
        self.name, self.why = name, why

    def available(self):
        return False, self.why

    def supports(self, op, x):
        return False, self.why


def _check_name(name: str) -> str:
    if name not in BACKEND_NAMES:
        raise ValueError(f"uxnet_kernels: unknown backend {name!r}; expected one of {BACKEND_NAMES}")
    return name


def set_backend(name: str) -> None:
    """Select the backend for all subsequent op calls (see module docstring)."""
    _state.backend = _check_name(name)


def get_backend() -> str:
    return _state.backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run the ops inside the block on backend ``name``."""
    previous = _state.backend
    _state.backend = _check_name(name)
    try:
        yield
    finally:
        _state.backend = previous


def _note(op: str, device_type: str, chosen: str, requested: str, why: str) -> None:
    if torch.compiler.is_compiling():
        return
    _last_used[(op, device_type)] = chosen
    for recorder in _recorders:
        recorder[f"{op}@{device_type}"] = chosen
    if why and requested != "auto":
        key = (op, requested, why)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(
                f"uxnet_kernels.{op}: backend {requested!r} cannot serve this call ({why}); "
                f"falling back to {chosen!r}",
                RuntimeWarning,
                stacklevel=4,
            )
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("%s on %s: backend %s (requested %s)%s", op, device_type, chosen, requested,
                     f"; fallback because {why}" if why else "")


def select(op: str, x: torch.Tensor) -> Backend:
    """The backend that serves ``op`` for main input ``x`` under the current setting."""
    requested = _state.backend
    device_type = x.device.type
    candidates = _AUTO_ORDER.get(device_type, ()) if requested == "auto" else (requested,)
    reasons = []
    for name in candidates:
        if name == "reference":
            break
        backend = get_backend_instance(name)
        ok, why = backend.supports(op, x)
        if ok:
            _note(op, device_type, name, requested, "")
            return backend
        reasons.append(f"{name}: {why}")
    _note(op, device_type, "reference", requested, "; ".join(reasons))
    return get_backend_instance("reference")


@contextlib.contextmanager
def recording_backends() -> Iterator[Dict[str, str]]:
    """``with recording_backends() as used:`` collects ``"op@device" -> backend`` for every eager op call inside the
    block (``backend_report()["last_used"]`` also remembers calls made before it)."""
    used: Dict[str, str] = {}
    _recorders.append(used)
    try:
        yield used
    finally:
        _recorders.remove(used)


def backend_report(device=None, dtype=torch.float32) -> Dict[str, object]:
    """What is compiled and available, and which backend each op would use for ``device`` and ``dtype``.

    Returns a dict with ``"setting"`` (the current backend setting), ``"backends"`` (name -> {"available",
    "reason"}), ``"would_use"`` (op -> backend name for a (1, 1, 1, 1, 1) tensor on ``device``) and
    ``"last_used"`` ("op@device" -> backend of the most recent eager call).
    """
    device = torch.device(device if device is not None else "cpu")
    probe = torch.empty((1, 1, 1, 1, 1), dtype=dtype, device="meta")
    backends = {}
    for name in BACKEND_NAMES[1:]:
        ok, why = get_backend_instance(name).available()
        backends[name] = {"available": ok, "reason": why}
    would_use = {}
    for op in OPS:
        with _probe_device(probe, device) as x:
            would_use[op] = _would_use(op, x)
    return {
        "setting": _state.backend,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "backends": backends,
        "would_use": would_use,
        "last_used": {f"{op}@{dev}": name for (op, dev), name in sorted(_last_used.items())},
    }


def _would_use(op: str, x: torch.Tensor) -> str:
    requested = _state.backend
    candidates = _AUTO_ORDER.get(x.device.type, ()) if requested == "auto" else (requested,)
    for name in candidates:
        if name != "reference" and get_backend_instance(name).supports(op, x)[0]:
            return name
    return "reference"


@contextlib.contextmanager
def _probe_device(probe: torch.Tensor, device: torch.device):
    # A tiny real tensor on the target device when that device exists, so `supports` sees the real device.
    if device.type == "cuda" and not torch.cuda.is_available():
        yield torch.empty((1, 1, 1, 1, 1), dtype=probe.dtype, device="meta")
        return
    yield torch.empty((1, 1, 1, 1, 1), dtype=probe.dtype, device=device)
