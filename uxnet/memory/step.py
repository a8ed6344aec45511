"""One UXNet training step, as both the memory prediction (fake tensors) and the measurements (real ones) run it.

A step is what a training loop repeats: ``optimizer.zero_grad(set_to_none=True)``, forward and cross-entropy loss
(under ``torch.autocast`` with ``amp``), backward, ``optimizer.step()``. Everything runs under the model kind's
``uxnet_kernels`` backend (backward too: activation checkpointing re-runs forward ops there).

The two models every comparison is about are built here (:func:`build_model`):

* ``"uxnet"``: ``UXNet(**config)`` with the ``uxnet_kernels`` ops on the fastest backend (``"auto"``).
* ``"official"``: the official model's computation in plain PyTorch, op for op: ``UXNet(**config,
  fused_decoder=False)`` run on the ``"reference"`` backend (``F.conv3d(groups=C)``, the official LayerNorms,
  grouped 1x1x1 convs and GELU, ``InstanceNorm3d`` + ``LeakyReLU`` and ``torch.cat`` in the decoder).
"""

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Callable, ContextManager, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

import uxnet_kernels as uk

from ..networks.activation_checkpointing import checkpointing_mode
from ..networks.nets.uxnet import SPATIAL_MULTIPLE, UXNet

MODEL_KINDS = ("uxnet", "official")
_BACKENDS: Dict[str, str] = {"uxnet": "auto", "official": "reference"}
AMP_DTYPES = ("bfloat16", "float16")
OPTIMIZERS = ("adamw", "sgd")
DEVICES = ("cpu", "cuda")
DEFAULT_CONFIG = dict(in_chans=1, out_chans=14)  # the paper's BTCV setting (uxnet.bench.flops.DEFAULT_MODEL)


@dataclass(frozen=True)
class StepSpec:
    """One training step: which model (``kind`` and UXNet ``config``), input size, precision, device, optimizer.

    ``config`` holds UXNet constructor arguments (``activation_checkpointing`` excluded: that is ``checkpointing``);
    ``amp`` is None (float32) or the autocast dtype name; ``optimizer`` is "adamw" (lr 1e-4, the paper's) or "sgd"
    (lr 1e-3, no momentum: no optimizer state)."""

    kind: str = "uxnet"
    roi: Tuple[int, int, int] = (96, 96, 96)
    batch: int = 2
    config: Tuple[Tuple[str, object], ...] = field(default_factory=lambda: tuple(sorted(DEFAULT_CONFIG.items())))
    checkpointing: Union[bool, str] = False  # UXNet(activation_checkpointing=...): False, True (selective), "full"
    amp: Optional[str] = None
    device: str = "cpu"
    optimizer: str = "adamw"

    @property
    def model_config(self) -> Dict:
        return dict(self.config)

    @property
    def in_chans(self) -> int:
        return int(self.model_config.get("in_chans", 1))

    @property
    def out_chans(self) -> int:
        return int(self.model_config.get("out_chans", 13))

    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        return None if self.amp is None else getattr(torch, self.amp)

    def as_dict(self) -> Dict:
        d = asdict(self)
        d["roi"] = list(self.roi)
        d["config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.config}
        return d

    @classmethod
    def from_dict(cls, d: Dict) -> "StepSpec":
        return make_spec(kind=d["kind"], roi=d["roi"], batch=d["batch"], checkpointing=d["checkpointing"],
                         amp=d["amp"], device=d["device"], optimizer=d["optimizer"], **d["config"])


def as_roi(roi: Union[int, Sequence[int]]) -> Tuple[int, int, int]:
    """(D, H, W) from an int or a 1- or 3-sequence of positive multiples of 16; ValueError otherwise."""
    values = [roi] if isinstance(roi, int) else list(roi)
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not all(isinstance(v, int) and v > 0 and v % SPATIAL_MULTIPLE == 0 for v in values):
        raise ValueError(f"roi must be 1 or 3 positive multiples of {SPATIAL_MULTIPLE} (UXNet has four stride-2 "
                         f"stages), got {roi!r}")
    return tuple(values)


def make_spec(kind: str = "uxnet", roi: Union[int, Sequence[int]] = 96, batch: int = 2,
              checkpointing: Union[bool, str] = False, amp: Optional[str] = None, device: str = "cpu", optimizer: str = "adamw", **config) -> StepSpec:
    """A validated :class:`StepSpec`; ``config`` are UXNet arguments (default in_chans=1, out_chans=14)."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"model kind must be one of {MODEL_KINDS}, got {kind!r}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if amp is not None and amp not in AMP_DTYPES:
        raise ValueError(f"amp must be None or one of {AMP_DTYPES}, got {amp!r}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if "activation_checkpointing" in config:
        raise ValueError("pass checkpointing=..., not activation_checkpointing in the model config")
    merged = dict(DEFAULT_CONFIG, **config)
    frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in merged.items()))
    mode = checkpointing_mode(checkpointing)
    checkpointing = {"off": False, "selective": True, "full": "full"}[mode]
    return StepSpec(kind, as_roi(roi), batch, frozen, checkpointing, amp, device, optimizer)


def _check_kind(kind: str) -> str:
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {MODEL_KINDS}")
    return kind


def build_model(kind: str, **config) -> nn.Module:
    """``UXNet(**config)`` as model ``kind`` ("uxnet" or "official"); run it under ``use_backend(model_backend(kind))``.

    Built on the current default device (wrap the call in ``with torch.device("meta"):`` to allocate nothing).
    """
    _check_kind(kind)
    if kind == "official":
        return UXNet(**config, fused_decoder=False)
    return UXNet(**config)


def model_backend(kind: str) -> str:
    """The ``uxnet_kernels`` backend model ``kind`` runs on."""
    return _BACKENDS[_check_kind(kind)]


def model_for(spec: StepSpec) -> torch.nn.Module:
    """The spec's model in train mode, on the current default device (``torch.device("meta")`` allocates nothing)."""
    return build_model(spec.kind, activation_checkpointing=spec.checkpointing, **spec.model_config).train()


def make_optimizer(spec: StepSpec, model: torch.nn.Module, device_type: str) -> torch.optim.Optimizer:
    """AdamW or SGD with ``foreach`` set as PyTorch's default would set it for real tensors on ``device_type``
    (on for CUDA, off for CPU), so a fake-tensor run takes the same code path as the real one."""
    foreach = device_type == "cuda"
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=foreach)
    return torch.optim.SGD(model.parameters(), lr=1e-3, foreach=foreach)


def make_batch(spec: StepSpec, device: Union[str, torch.device]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(input (N, in_chans, D, H, W) float32, labels (N, D, H, W) int64) on ``device``."""
    x = torch.randn((spec.batch, spec.in_chans) + spec.roi, device=device)
    labels = torch.randint(0, spec.out_chans, (spec.batch,) + spec.roi, device=device)
    return x, labels


def training_step(spec: StepSpec, model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                  labels: torch.Tensor, forward_context: Callable[[], ContextManager] = contextlib.nullcontext
                  ) -> torch.Tensor:
    """zero_grad(set_to_none=True), forward + cross entropy (autocast with ``spec.amp``), backward, step.

    ``forward_context()`` is entered around the forward pass and the loss only (e.g. saved-tensor hooks)."""
    optimizer.zero_grad(set_to_none=True)
    with uk.use_backend(model_backend(spec.kind)):
        with forward_context(), torch.autocast(device_type=x.device.type, dtype=spec.amp_dtype,
                                               enabled=spec.amp is not None):
            loss = F.cross_entropy(model(x), labels)
        loss.backward()
    optimizer.step()
    return loss.detach()
