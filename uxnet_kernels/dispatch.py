"""Which implementation serves each op call, and why the others declined.

``use_backend(name)`` (context manager) and ``set_backend(name)`` choose the backend for every op:

* ``"auto"`` (default): CPU tensors -> "cpu" (the C++ kernels); CUDA tensors -> "triton", then "cuda";
  anything no fast backend supports -> "reference".
* ``"reference"``: the pure-PyTorch references of the op families.
* ``"cpu"``, ``"cuda"``, ``"triton"``: that backend; if it cannot serve a call (wrong device, dtype,
  not built) the call falls back to "reference" with a warning naming the reason, once per reason.

An op is an :class:`OpFamily` (built by its module in ``uxnet_kernels/ops``): a name and one
:class:`Implementation` per backend that has one. The backends themselves (``uxnet_kernels.backends``) and every
implementation's verdict are decided at import, so :func:`select` only reads attributes and the input's device and
dtype, which ``torch.compile`` traces without graph breaks. Every decision is logged at DEBUG on the
``uxnet_kernels.dispatch`` logger and the last backend used per (op, device type) is kept for ``backend_report()``.
Nothing here holds tensors or streams, so the ops are safe under DDP and multi-threaded data loading.

Exporting: under ``"auto"``, a call traced by an exporter (:func:`exporting`: ``torch.export`` and what is built on
it, ``torch.onnx.export`` (dynamo or TorchScript), ``torch.jit.trace``) runs the family's ``reference``, so the
exported graph holds standard PyTorch ops only: ONNX translates them, the TorchScript ONNX exporter and AOTInductor
run them, and the artefact needs no uxnet at deployment. ``torch.compile`` is not exporting and keeps the fast
backends. The reason ("exporting (...)") is logged and kept for ``backend_report()["declined"]``. An explicitly
requested backend (``use_backend("cpu")``) is honoured while exporting too: the graph then holds ``uxnet::`` ops,
for programs run where ``uxnet_kernels`` is loaded.
"""

import contextlib
import logging
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .backends import AUTO_ORDER, BACKENDS, NAMES, YES, Backend, Verdict

logger = logging.getLogger("uxnet_kernels.dispatch")

BACKEND_NAMES = ("auto",) + NAMES


@dataclass(frozen=True)
class Implementation:
    """One backend's implementation of an op: ``run`` takes the validated, canonicalised arguments and returns the
    output with autograd attached. ``verdict`` says whether it can run at all here (decided at import: e.g. a
    kernel registered for the schema). ``variants`` holds named alternatives of ``run`` (e.g. ``"donated"``)."""

    backend: str
    run: Callable
    verdict: Verdict = YES
    variants: Tuple[Tuple[str, Callable], ...] = ()

    def variant(self, name: str) -> Optional[Callable]:
        return dict(self.variants).get(name)


class OpFamily:
    """An op and its implementations, one per backend that has one (``reference`` is required)."""

    def __init__(self, name: str, implementations: Sequence[Implementation]):
        self.name = name
        self.implementations: Dict[str, Implementation] = {impl.backend: impl for impl in implementations}
        if "reference" not in self.implementations:
            raise ValueError(f"op family {name!r} has no reference implementation")

    def verdict(self, backend: str, x: torch.Tensor) -> Verdict:
        """Whether ``backend`` can serve this op for the main input ``x``, and why not."""
        impl = self.implementations.get(backend)
        if impl is None:
            return False, f"no {backend} implementation of {self.name}"
        ok, why = BACKENDS[backend].supports(x)
        if not ok:
            return ok, why
        return impl.verdict


_FAMILIES: Dict[str, OpFamily] = {}


def register(family: OpFamily) -> OpFamily:
    """Make ``family`` known to ``backend_report`` (each op module registers its family once, at import)."""
    _FAMILIES[family.name] = family
    return family


def families() -> Tuple[str, ...]:
    return tuple(_FAMILIES)


def family(name: str) -> OpFamily:
    """The registered family of op ``name``."""
    if name not in _FAMILIES:
        raise ValueError(f"unknown op {name!r}; known: {', '.join(_FAMILIES)}")
    return _FAMILIES[name]


class _State:
    backend = "auto"


_state = _State()
_last_used: Dict[Tuple[str, str], str] = {}
_recorders: List[Dict[str, str]] = []
_warned = set()
# (op, device type) -> {backend: reason} of the latest call traced by an exporter under "auto"
_export_declined: Dict[Tuple[str, str], Dict[str, str]] = {}


def get_backend_instance(name: str) -> Backend:
    """The backend object for ``name`` (``available()`` says whether it is built or installed here)."""
    return BACKENDS[name]


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


def _candidates(device_type: str) -> Tuple[str, ...]:
    requested = _state.backend
    return AUTO_ORDER.get(device_type, ()) if requested == "auto" else (requested,)


def exporting() -> str:
    """The exporter tracing the current call ("" when none): "torch.export" (also under ``torch.onnx.export``'s
    default dynamo exporter and AOTInductor, which trace with it), "torch.onnx.export" (TorchScript exporter) or
    "torch.jit.trace". ``torch.compile`` is not exporting. Traceable by dynamo without graph breaks."""
    if torch.compiler.is_compiling():
        return "torch.export" if torch.compiler.is_exporting() else ""
    if torch.onnx.is_in_onnx_export():
        return "torch.onnx.export"
    if torch.jit.is_tracing():
        return "torch.jit.trace"
    return ""


def _exporting_reason(exporter: str) -> str:
    return f"exporting ({exporter}): exported graphs hold the reference ops"


def _note_export(op: str, device_type: str, exporter: str) -> None:
    why = _exporting_reason(exporter)
    if not torch.compiler.is_dynamo_compiling():  # strict torch.export drops Python side effects anyway
        fast = [name for name in AUTO_ORDER.get(device_type, ()) if name != "reference"]
        _export_declined[(op, device_type)] = {name: why for name in fast}
        for recorder in _recorders:
            recorder[f"{op}@{device_type}"] = "reference"
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s on %s: backend reference (requested auto); %s", op, device_type, why)


def select(family: OpFamily, x: torch.Tensor) -> Implementation:
    """The implementation of ``family`` that serves main input ``x`` under the current setting."""
    requested = _state.backend
    device_type = x.device.type
    if requested == "auto":
        exporter = exporting()
        if exporter:
            _note_export(family.name, device_type, exporter)
            return family.implementations["reference"]
    reasons = []
    for name in _candidates(device_type):
        if name == "reference":
            break
        ok, why = family.verdict(name, x)
        if ok:
            _note(family.name, device_type, name, requested, "")
            return family.implementations[name]
        reasons.append(f"{name}: {why}")
    _note(family.name, device_type, "reference", requested, "; ".join(reasons))
    return family.implementations["reference"]


def would_select(family: OpFamily, x: torch.Tensor) -> str:
    """The backend ``select(family, x)`` would pick now, without recording or announcing the choice."""
    if _state.backend == "auto" and exporting():
        return "reference"
    for name in _candidates(x.device.type):
        if name == "reference":
            break
        if family.verdict(name, x)[0]:
            return name
    return "reference"


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
    "reason"}), ``"would_use"`` (op -> backend name for a (1, 1, 1, 1, 1) tensor on ``device``), ``"declined"``
    (op -> {backend: reason} for each candidate that would not serve it; for an op traced by an exporter under
    "auto", each fast backend it declined there, with the reason "exporting (...)", as of the latest export) and
    ``"last_used"`` ("op@device" -> backend of the most recent eager call).
    """
    device = torch.device(device if device is not None else "cpu")
    backends = {}
    for name in NAMES:
        ok, why = BACKENDS[name].available()
        backends[name] = {"available": ok, "reason": why}
    probe = _probe(device, dtype)
    would_use, declined = {}, {}
    exporter = exporting() if _state.backend == "auto" else ""
    for op, family in _FAMILIES.items():
        would_use[op], declined[op] = "reference", {}
        if exporter:
            declined[op] = {name: _exporting_reason(exporter)
                            for name in _candidates(probe.device.type) if name != "reference"}
            continue
        if _state.backend == "auto":
            declined[op].update(_export_declined.get((op, probe.device.type), {}))
        for name in _candidates(probe.device.type):
            if name == "reference":
                break
            ok, why = family.verdict(name, probe)
            if ok:
                would_use[op] = name
                break
            declined[op][name] = why
    return {
        "setting": _state.backend,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "backends": backends,
        "would_use": would_use,
        "declined": declined,
        "last_used": {f"{op}@{dev}": name for (op, dev), name in sorted(_last_used.items())},
    }


def _probe(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # A tiny real tensor on the target device when that device exists, so `supports` sees the real device.
    if device.type == "cuda" and not torch.cuda.is_available():
        return torch.empty((1, 1, 1, 1, 1), dtype=dtype, device="meta")
    return torch.empty((1, 1, 1, 1, 1), dtype=dtype, device=device)
