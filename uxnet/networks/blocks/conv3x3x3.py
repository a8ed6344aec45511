"""The stride-1 3x3x3 convolutions of the UNETR blocks: Winograd (``uxnet_kernels.conv3d_3x3x3``) on the CPU, with
the Winograd-domain weights kept between calls in eval mode without autograd.

``conv3x3x3(x, weight, cache, key)`` runs ``F.conv3d(x, weight, padding=1)``. On a CPU tensor with at least
``MIN_IN_CHANNELS`` input channels it runs the Winograd op on x in channels_last_3d (converted once at a block's
entry; the op's output stays channels-last, so the next block reads it without a copy). Anything else, CUDA tensors
included (cuDNN), calls ``F.conv3d``, except the first convolution of a block in inference (at most
``MAX_IM2COL_IN_CHANNELS`` input channels, no autograd): ``narrow_conv3x3x3_channels_last`` writes it channels-last
for the Winograd convolution after it. Measured on the CPU (``docs/PERFORMANCE.md``, "CPU conv3d_3x3x3", channels-last
inputs at the default model's shapes): forward 1.85-2.66x oneDNN's faster layout with packed weights, forward +
backward 1.19-2.29x; with one input channel a transform per channel does not pay, so the first convolution stays
direct.

``WinogradWeightCache`` holds ``conv3d_3x3x3_pack_weight(weight)`` per key. An entry is used only while the weight
is the very same storage at the same version: an optimizer step, ``load_state_dict`` (an in-place copy), any
in-place edit bumps the version counter, and ``.to()`` / ``.data =`` give new storage, so every change repacks.
The entry keeps a detached alias of the weight it was built from, so a freed weight's address cannot be reused by
another tensor while the entry exists. Entries live on the block that owns the weights (not in a global table), so
they go with the model; they are dropped from pickles and deep copies, and ``clear()`` frees them. Weights that are
inference tensors (a model built under ``torch.inference_mode``) have no version counter: they are transformed on
every call instead.
"""

import threading
from typing import Dict, NamedTuple, Optional

import torch
import torch.nn.functional as F

import uxnet_kernels as uk
from uxnet_kernels import autocast, dispatch
from uxnet_kernels.ops import conv3d_3x3x3 as conv_op

# The first convolution (1 input channel) runs direct; 16 is the smallest input width measured faster.
MIN_IN_CHANNELS = 16
# Inference with fewer input channels than this (the first convolution of a 1- to 4-modality input): one matrix
# product of the 27 * C_in shifted copies of x, written channels-last (``narrow_conv3x3x3_channels_last``).
MAX_IM2COL_IN_CHANNELS = 4


class _Entry(NamedTuple):
    weight: torch.Tensor  # detached alias of the packed weight: same storage, same version counter
    version: int
    packed: torch.Tensor


class WinogradWeightCache:
    """Packed Winograd weights of one block, by key; see the module docstring for when an entry is reused."""

    def __init__(self):
        self._entries: Dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def packed(self, key: str, weight: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The packed ``weight.to(dtype)`` (default: weight's dtype; bf16 autocast packs the weight it rounds to)."""
        key = key if dtype is None or dtype == weight.dtype else f"{key}:{dtype}"
        entry = self._entries.get(key)
        if entry is not None and _same_weight(entry, weight):
            return entry.packed
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or not _same_weight(entry, weight):
                self._entries.pop(key, None)  # free the stale one before packing the new one
                source = weight.detach() if dtype is None else weight.detach().to(dtype)
                entry = _Entry(weight.detach(), weight._version, uk.conv3d_3x3x3_pack_weight(source))
                self._entries[key] = entry
            return entry.packed

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def nbytes(self) -> int:
        """Bytes held by the packed weights."""
        return sum(e.packed.numel() * e.packed.element_size() for e in list(self._entries.values()))

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def __deepcopy__(self, memo):
        return WinogradWeightCache()


def _same_weight(entry: _Entry, weight: torch.Tensor) -> bool:
    return (entry.weight.data_ptr() == weight.data_ptr() and entry.version == weight._version
            and entry.weight.shape == weight.shape and entry.weight.stride() == weight.stride()
            and entry.weight.dtype == weight.dtype and entry.weight.device == weight.device)


def runs_winograd(x: torch.Tensor, in_channels: int) -> bool:
    """Whether ``conv3x3x3`` runs ``uxnet_kernels.conv3d_3x3x3`` on x with a weight of ``in_channels`` input
    channels: CPU tensors with at least ``MIN_IN_CHANNELS`` input channels, not while an exporter traces the model
    (graph exports hold ``F.conv3d`` and no layout changes, which the TorchScript ONNX exporter cannot express), in
    float32 or float64 outside autocast, or under bfloat16 CPU autocast without autograd where the kernels run bf16
    products (``conv3d_3x3x3.bf16_products()``: 1.4-2.4x oneDNN's bfloat16 convolution, docs/PERFORMANCE.md).
    Autocast training keeps oneDNN: the op's bfloat16 gradients compute in float32, not measured faster."""
    if x.device.type != "cpu" or in_channels < MIN_IN_CHANNELS or dispatch.exporting():
        return False
    if torch.is_autocast_enabled("cpu"):
        return (autocast.active_dtype(x) == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16)
                and not torch.is_grad_enabled() and conv_op.bf16_products())
    return x.dtype in (torch.float32, torch.float64)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """x in channels_last_3d (no copy when it already is)."""
    return x.contiguous(memory_format=torch.channels_last_3d)


def wants_channels_last(x: torch.Tensor) -> bool:
    """Whether a block of Winograd convolutions should hand x's next consumer a channels-last tensor: what
    ``runs_winograd`` asks of x, whatever the width."""
    return runs_winograd(x, MIN_IN_CHANNELS)


def narrow_conv3x3x3_channels_last(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.conv3d(x, weight, padding=1)`` for few input channels, returned channels_last_3d: the (N·D·H·W, 27·C_in)
    matrix of shifted copies of x times the (27·C_in, C_out) filter. oneDNN's direct convolution of a 1-channel
    input returns NCDHW, and the copy to channels-last cost as much as the convolution (96³, 48 channels, Zen 4:
    145 + 118 ms against 164 ms). Inference only: under autograd the product would keep the 27-fold copy."""
    dtype = autocast.active_dtype(x)
    if dtype is not None:  # cast before the 27-fold copy, which autocast's matmul would cast afterwards
        x, weight = x.to(dtype), weight.to(dtype)
    n, c, d, h, w = x.shape
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1, 1, 1))
    windows = padded.unfold(2, 3, 1).unfold(3, 3, 1).unfold(4, 3, 1)  # (N, C, D, H, W, 3, 3, 3)
    columns = windows.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(n * d * h * w, c * 27)
    out = columns @ weight.reshape(weight.shape[0], c * 27).t()
    return out.view(n, d, h, w, weight.shape[0]).permute(0, 4, 1, 2, 3)


def conv3x3x3(x: torch.Tensor, weight: torch.Tensor, cache: Optional[WinogradWeightCache] = None,
              key: str = "") -> torch.Tensor:
    """``F.conv3d(x, weight, padding=1)`` for a (C_out, C_in, 3, 3, 3) weight, through Winograd where
    ``runs_winograd``; with ``cache`` (and a ``key`` naming the weight within it), eval-mode calls without autograd
    reuse the packed weight."""
    if not runs_winograd(x, weight.shape[1]):
        if weight.shape[1] <= MAX_IM2COL_IN_CHANNELS and not torch.is_grad_enabled() and wants_channels_last(x):
            return narrow_conv3x3x3_channels_last(x, weight)
        return F.conv3d(x, weight, padding=1)
    x = channels_last(x)
    dtype = autocast.active_dtype(x)  # the dtype x and weight are cast to (None outside autocast)
    # Inference tensors (a model built under inference_mode) have no version counter to tell a change by.
    # Layers where packing does not pay (768 -> 768 channels at 6^3 in the default model: 151 MB per layer in float32)
    # are not packed.
    if cache is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling() \
            and not weight.is_inference() and conv_op.runs_packed(x) and conv_op.packing_pays(x, weight, dtype):
        return uk.conv3d_3x3x3(x, weight, packed_weight=cache.packed(key, weight, dtype))
    return uk.conv3d_3x3x3(x, weight)


def describe(device: str = "cpu") -> str:
    """One line for ``uxnet info``: how the default UXNet runs its UNETR 3x3x3 convolutions on ``device``."""
    probe = torch.empty((1, MIN_IN_CHANNELS, 1, 1, 1), device=device)
    if probe.device.type != "cpu":
        return f"F.conv3d on {probe.device.type} (cuDNN); uxnet_kernels.conv3d_3x3x3 has no GPU kernel"
    backend = dispatch.would_select(conv_op.FAMILY, probe)
    if backend != "cpu":
        return (f"uxnet_kernels.conv3d_3x3x3 on the {backend} backend (F.conv3d: no Winograd kernel here) for "
                f">= {MIN_IN_CHANNELS} input channels")
    bf16 = ("Winograd with bf16 products (vdpbf16ps), packed bf16 weights cached" if conv_op.bf16_products()
            else "F.conv3d (oneDNN; this ISA has no bf16 products)")
    return (f"uxnet_kernels.conv3d_3x3x3, Winograd F(2x2x2, 3x3x3) on the cpu backend, for >= {MIN_IN_CHANNELS} "
            "input channels in float32/float64 (channels-last blocks; eval without autograd: packed weights cached "
            f"per block); under bfloat16 autocast without autograd: {bf16}; below that width: F.conv3d (oneDNN)")
