"""Predicted memory of one UXNet training step, computed without allocating it (``uxnet memory``, ``uxnet bench``).

The model, optimizer state and batch are fake tensors (``torch._subclasses.FakeTensorMode``): every op runs only
its shape function (the ``uxnet_kernels`` custom ops their registered fakes, picked by the same dispatcher
decision as for real tensors, which depends only on device and dtype), so predicting the default model at 128^3
batch 2 takes seconds and no memory. One warm-up step creates the optimizer state, then one step
(:func:`uxnet.memory.step.training_step`) is tracked:

* **saved activations**: the unique storages autograd saves for backward during the forward pass and the loss
  (``torch.autograd.graph.saved_tensors_hooks``), parameters excluded, each counted once and attributed to the
  model block that ran when it was first saved (the encoder's four stages, ``encoder1..5``, ``decoder5..1``,
  ``out``; "loss" for the cross entropy). Tensors saved between blocks (the inputs activation checkpointing
  keeps) go to the block that starts next. Tensors kept outside ``save_for_backward`` (``ctx`` attributes, the
  cache of selective activation checkpointing) are not seen by the hooks; ``held_after_forward_bytes``, what the
  tracker finds alive after forward + loss, counts them (it equals the saved bytes less the batch otherwise).
* **peak**: the largest sum of live tensor storages after any op of the step, tracked by
  ``torch.distributed._tools.mem_tracker.MemTracker`` (parameters, gradients, optimizer state, batch, activations,
  backward temporaries; CUDA sizes rounded up to the allocator's 512 bytes), plus the temporary buffers ops keep
  inside the call on the CPU (:func:`cpu_op_scratch_bytes`: PyTorch's convolutions, :mod:`uxnet.memory.conv_workspace`,
  and the projection the CPU block-tail op recomputes), and where it happened (phase and block).

Not predicted: other memory kernels allocate internally without going through the dispatcher (half-precision
oneDNN buffers on CPU; cuDNN/cuBLAS workspaces on CUDA), allocator overheads (fragmentation, the CUDA context), and
the one-time allocations of a process's first step (docs/PERFORMANCE.md measures how close it comes).
"""

import contextlib
import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

import uxnet_kernels as uk

from .conv_workspace import conv_workspace_bytes
from .step import StepSpec, make_optimizer, model_for, training_step

LOSS_BLOCK = "loss"
CUDA_EMULATION_NOTE = (
    "this torch cannot run CUDA tensors here (no CUDA device or no CUDA build), so the CUDA step is predicted with "
    "fake CPU tensors: the uxnet ops take the CPU kernels' autograd path (the Triton kernels save the same "
    "tensors: one set of autograd rules), CPU autocast rules stand in for CUDA's (CUDA keeps layer_norm in "
    "float32; float16 is predicted as bfloat16, the same size, which the CPU kernels and oneDNN serve), and the "
    "512-byte CUDA allocation rounding, cuDNN/cuBLAS workspaces and the Triton kernels' gradient partial-sum "
    "buffers (<= 128 MiB, backward) are not counted (nor the CPU convolutions' internal buffers)"
)


def _mem_tracker_class():
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError as exc:  # torch built without distributed, or a torch before 2.5
        raise RuntimeError(f"uxnet memory needs torch.distributed._tools.mem_tracker.MemTracker (torch >= 2.5 "
                           f"with torch.distributed), which this torch {torch.__version__} lacks: {exc}") from exc
    return MemTracker


# ------------------------------------------------------------------------------------------------------ blocks


def block_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(label, module) for every block the saved bytes are attributed to, in forward order: the four encoder
    stages (downsampling, UX blocks, output LayerNorm) as ``uxnet_3d.stage{i}``, then every other top-level child."""
    blocks = []
    for name, child in model.named_children():
        if hasattr(child, "downsample_layers") and hasattr(child, "stages"):
            for i, (down, stage) in enumerate(zip(child.downsample_layers, child.stages)):
                label = f"{name}.stage{i}"
                blocks += [(label, down), (label, stage)]
                if hasattr(child, f"norm{i}"):
                    blocks.append((label, getattr(child, f"norm{i}")))
        else:
            blocks.append((name, child))
    return blocks


def block_labels(model: nn.Module) -> List[str]:
    return list(dict.fromkeys(label for label, _ in block_modules(model)))


def _fqn_to_block(model: nn.Module) -> Dict[str, str]:
    """Module path -> block label (paths as ModTracker writes them: the root's class name first)."""
    root = type(model).__name__
    names = {id(m): n for n, m in model.named_modules()}
    return {f"{root}.{names[id(module)]}": label for label, module in block_modules(model)}


class SavedTensorCounter:
    """``with SavedTensorCounter(model, exclude=params):`` around a forward pass: bytes of the unique storages
    autograd saves, by block (see the module docstring)."""

    def __init__(self, model: nn.Module, exclude: Optional[set] = None):
        self.model = model
        self.exclude = exclude or set()
        self.by_block: Dict[str, int] = {label: 0 for label in block_labels(model)}
        self.by_block[LOSS_BLOCK] = 0
        self._seen: set = set()
        self._stack: List[str] = []
        self._pending: List[int] = []  # bytes saved while no block ran, for the block that starts next
        self._handles = []
        self._hooks = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self._seen and key not in self.exclude:
            self._seen.add(key)
            nbytes = storage.nbytes()
            if self._stack:
                self.by_block[self._stack[-1]] += nbytes
            else:
                self._pending.append(nbytes)
        return t

    def _enter_block(self, label: str) -> None:
        if not self._stack and self._pending:
            self.by_block[label] += sum(self._pending)
            self._pending.clear()
        self._stack.append(label)

    def _leave_block(self) -> None:
        self._stack.pop()

    def __enter__(self) -> "SavedTensorCounter":
        for label, module in block_modules(self.model):
            self._handles.append(module.register_forward_pre_hook(lambda m, a, label=label: self._enter_block(label)))
            self._handles.append(module.register_forward_hook(lambda m, a, o: self._leave_block()))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.by_block[LOSS_BLOCK] += sum(self._pending)
        self._pending.clear()

    @property
    def total(self) -> int:
        return sum(self.by_block.values())


def storage_keys(tensors) -> set:
    return {t.untyped_storage()._cdata for t in tensors}


# ------------------------------------------------------------------------------------------------- prediction


@dataclass
class StepPrediction:
    """What one training step of ``spec`` holds, in bytes (see the module docstring)."""

    spec: StepSpec
    fake_device: str  # the device of the fake tensors ("cpu" also when a CUDA step is emulated)
    params_bytes: int
    grads_bytes: int
    optimizer_state_bytes: int
    batch_bytes: int
    start_bytes: int  # live when the step starts: parameters, last step's gradients, optimizer state, batch
    held_after_forward_bytes: int  # live after forward + loss, above the start (gradients freed by zero_grad)
    peak_bytes: int
    peak_breakdown: Dict[str, int]  # MemTracker category -> bytes at the peak
    peak_where: str  # e.g. "backward, decoder2"
    saved_bytes: int
    saved_by_block: Dict[str, int]
    backends: Dict[str, str]  # op -> backend that served it in the fake run
    notes: List[str] = field(default_factory=list)

    @property
    def step_bytes(self) -> int:
        """How far the peak rises above what the step starts with (what a CPU RSS measurement sees)."""
        return self.peak_bytes - self.start_bytes

    def as_dict(self) -> Dict:
        d = asdict(self)
        d["spec"] = self.spec.as_dict()
        d["step_bytes"] = self.step_bytes
        return d


def fake_device(spec: StepSpec) -> Tuple[str, List[str]]:
    """The device the fake tensors live on for ``spec``, and notes on what that changes.

    Fake CUDA tensors need a torch that can run CUDA here: in a CPU-only build the autograd engine aborts the
    process on them (it asks for a CUDA device guard), so a CUDA step is then emulated on the CPU."""
    if spec.device == "cpu":
        return "cpu", []
    if torch.cuda.is_available():
        torch.empty(0, device="cuda")  # the autograd engine expects an initialised CUDA state (pytorch#92627)
        return "cuda", []
    return "cpu", [CUDA_EMULATION_NOTE]


def _fake_model(spec: StepSpec, mode, device: str) -> nn.Module:
    with torch.device("meta"):
        model = model_for(spec)
    mode.allow_non_fake_inputs = True  # to_empty reads the meta parameters' metadata only
    try:
        with mode:
            return model.to_empty(device=device)
    finally:
        mode.allow_non_fake_inputs = False


def _nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if st._cdata not in seen:
            seen.add(st._cdata)
            total += st.nbytes()
    return total


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> List[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def _category_name(key) -> str:
    return str(getattr(key, "value", key))


_SHORTCUT_OPS = {"instance_norm_add_lrelu": 2, "instance_norm_add_lrelu_inplace": 2,
                 "instance_norm_add_lrelu_backward": 3}  # op -> shortcut_inputs arg


def cpu_op_scratch_bytes(func, args, out=None) -> int:
    """Bytes a CPU op call keeps in buffers of its own next to its inputs and outputs: PyTorch's convolutions
    (:func:`uxnet.memory.conv_workspace.conv_workspace_bytes`), and ``uxnet.instance_norm_add_lrelu`` (+ backward)
    with a projection shortcut, whose CPU kernel recomputes the projection into one temporary the size of z
    (``csrc/cpu/instance_norm/op.cpp``)."""
    name = getattr(func, "_opname", "")
    if getattr(func, "namespace", "") == "uxnet" and name in _SHORTCUT_OPS:
        shortcut_inputs = args[_SHORTCUT_OPS[name]] if len(args) > _SHORTCUT_OPS[name] else ()
        z_like = args[1] if name.endswith("_backward") else args[0]
        if shortcut_inputs and z_like.device.type == "cpu":
            return z_like.numel() * z_like.element_size()
        return 0
    return conv_workspace_bytes(func, args, out)


class _PeakRecorder:
    """The step's peak: after every op, the live tracked bytes plus the scratch that op allocated internally
    (:func:`cpu_op_scratch_bytes`), by category, and where it happened."""

    def __init__(self, tracker, fqn_to_block: Dict[str, str]):
        self.tracker = tracker
        self.fqn_to_block = fqn_to_block
        self.phase = "step start"
        self.where = "step start"
        self.peak = 0
        self.breakdown: Dict[str, int] = {}
        self.after_forward = 0

    def live(self) -> int:
        return sum(snap.get("Total", 0) for snap in self.tracker.get_tracker_snapshot("current").values())

    def _block(self) -> str:
        """The block running now, "" when not known: ModTracker's ``parents`` (modules whose forward or backward
        is running) holds one block, or several when activation checkpointing recomputes, which it misattributes."""
        mod_tracker = getattr(self.tracker, "_mod_tracker", None)
        parents = getattr(mod_tracker, "parents", ())
        labels = {self.fqn_to_block[p] for p in parents if p in self.fqn_to_block}
        return labels.pop() if len(labels) == 1 else ""

    def sample(self, workspace: int = 0) -> None:
        categories: Dict[str, int] = {}
        for snap in self.tracker.get_tracker_snapshot("current").values():
            for key, value in snap.items():
                name = _category_name(key)
                categories[name] = categories.get(name, 0) + value
        total = categories.pop("Total", 0) + workspace
        if total > self.peak:
            self.peak = total
            self.breakdown = dict(categories, Workspace=workspace)
            block = self._block()
            self.where = f"{self.phase}, {block}" if block else self.phase


def _step_tracker(fqn_to_block: Dict[str, str], cpu_conv_scratch: bool):
    """A MemTracker that also records :class:`_PeakRecorder`'s peak (as ``.recorder``), with the CPU convolutions'
    and the CPU block-tail op's internal buffers when ``cpu_conv_scratch`` (a step that runs on the CPU; not when a
    CUDA step is emulated)."""
    base = _mem_tracker_class()
    scratch = cpu_op_scratch_bytes if cpu_conv_scratch else (lambda func, args, out: 0)

    class StepTracker(base):
        def __init__(self):
            super().__init__()
            self.recorder = _PeakRecorder(self, fqn_to_block)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = super().__torch_dispatch__(func, types, args, kwargs)
            self.recorder.sample(scratch(func, args, out))
            return out

        def _update_peak_stats(self, peak_state) -> None:
            """MemTracker's per-module peak snapshots after every op (the recorder keeps the one peak we report):
            skipped, they take half of a prediction's time."""

    return StepTracker()


def track_step(spec: StepSpec, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               labels: torch.Tensor, notes: Optional[List[str]] = None) -> StepPrediction:
    """Run one training step of ``spec`` on the given (fake or real) model, optimizer and batch, tracking what it
    holds (see the module docstring). Run a warm-up step first for the steady state of a training loop."""
    params = list(model.parameters())
    counter = SavedTensorCounter(model, exclude=storage_keys(params))
    tracker = _step_tracker(_fqn_to_block(model), cpu_conv_scratch=spec.device == "cpu")
    recorder = tracker.recorder
    grads_before = _nbytes([p.grad for p in params if p.grad is not None])  # freed by the step's zero_grad
    tracker.track_external(model, optimizer, x, labels)
    with tracker:
        start = tracker.get_tracker_snapshot("current")
        recorder.sample()

        @contextlib.contextmanager
        def forward_phase():
            recorder.phase = "forward"
            with counter:
                yield
            recorder.after_forward = recorder.live()
            recorder.phase = "backward"

        hook = optimizer.register_step_pre_hook(lambda *a: setattr(recorder, "phase", "optimizer step"))
        try:
            with uk.recording_backends() as used:
                training_step(spec, model, optimizer, x, labels, forward_context=forward_phase)
        finally:
            hook.remove()
    grads = [p.grad for p in params if p.grad is not None]
    start_bytes = sum(s.get("Total", 0) for s in start.values())
    device = x.device.type
    return StepPrediction(
        spec=spec, fake_device=device, params_bytes=_nbytes(params), grads_bytes=_nbytes(grads),
        optimizer_state_bytes=_nbytes(_optimizer_tensors(optimizer)), batch_bytes=_nbytes([x, labels]),
        start_bytes=start_bytes, held_after_forward_bytes=recorder.after_forward - start_bytes + grads_before,
        peak_bytes=recorder.peak,
        peak_breakdown=recorder.breakdown, peak_where=recorder.where, saved_bytes=counter.total,
        saved_by_block=dict(counter.by_block),
        backends={op.split("@")[0]: name for op, name in used.items() if op.endswith("@" + device)},
        notes=list(notes or []))


def _warm_up(spec: StepSpec, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Leave what a finished training step leaves (gradients and optimizer state), without running one."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()


def predict_step(spec: StepSpec) -> StepPrediction:
    """Predict the memory of one training step of ``spec`` (see the module docstring); allocates no tensor data.

    Raises:
        ValueError: the model configuration is invalid (UXNet's own checks).
        RuntimeError: this torch has no MemTracker.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    device, notes = fake_device(spec)
    run = spec
    if device != spec.device and spec.amp == "float16":  # CUDA float16 emulated on the CPU: see CUDA_EMULATION_NOTE
        run = dataclasses.replace(spec, amp="bfloat16")
    mode = FakeTensorMode()
    model = _fake_model(run, mode, device)
    with mode:
        optimizer = make_optimizer(run, model, spec.device)
        x = torch.empty((run.batch, run.in_chans) + run.roi, device=device)
        labels = torch.empty((run.batch,) + run.roi, dtype=torch.long, device=device)
        _warm_up(run, model, optimizer)
        prediction = track_step(run, model, optimizer, x, labels, notes)
    prediction.spec = spec
    return prediction
