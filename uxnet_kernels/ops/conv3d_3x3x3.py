"""conv3d_3x3x3: the dense 3x3x3 convolution of the UNETR blocks, stride 1, padding 1, groups 1.

Operators: ``uxnet::conv3d_3x3x3`` / ``uxnet::conv3d_3x3x3_backward`` (C++: csrc/cpu/conv3d_3x3x3, Winograd
F(2x2x2, 3x3x3) on the CPU), and for inference with a weight transformed once, ``uxnet::conv3d_3x3x3_pack_weight``
and ``uxnet::conv3d_3x3x3_packed`` (no autograd). No CUDA or Triton implementation: CUDA tensors run the reference
(cuDNN).

bfloat16 forwards run bf16 products where the selected ISA has them (``bf16_products()``: avx512 on CPUs with
AVX512_BF16, and avx512-emulated): transformed inputs and weights rounded to bf16, products summed in float32 by
``vdpbf16ps``, the output rounded once; error within about 2x PyTorch's own bfloat16 convolution error against
float64 (tests/ops/test_conv3d_3x3x3.py). Elsewhere, and for every gradient, bfloat16 computes in float32.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _extension, autocast, dispatch, validation
from ..backends import BACKENDS
from .common import EMPTY_GRAD_SHAPE, convolution_autograd_rule, grad_or_empty, output_memory_format

OP = "conv3d_3x3x3"


def reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """3D convolution with a 3x3x3 kernel, stride 1, padding 1. x: (N, C_in, D, H, W); weight: (C_out, C_in, 3, 3,
    3)."""
    return F.conv3d(x, weight, bias, padding=1)


def check_args(x, weight, bias) -> None:
    validation.check_tensor(OP, "x", x, 5, "(N, C_in, D, H, W)")
    validation.check_tensor(OP, "weight", weight, 5, "(C_out, C_in, 3, 3, 3)")
    if tuple(weight.shape[2:]) != (3, 3, 3):
        validation.fail(OP, f"expected a 3x3x3 kernel, got weight of shape {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        validation.fail(OP, f"expected weight of shape (C_out, {x.shape[1]}, 3, 3, 3) for x with {x.shape[1]} "
                            f"channels, got {tuple(weight.shape)}")
    if bias is not None:
        validation.check_tensor(OP, "bias", bias, 1, f"({weight.shape[0]},)")
        if bias.shape[0] != weight.shape[0]:
            validation.fail(OP, f"expected bias of shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    validation.check_same_dtype_device(OP, "x", x, weight=weight, bias=bias)


def autograd_rule(backward_op):
    """(backward, setup_context) for the forward ``(x, weight, bias?) -> out``; ``backward_op`` has the schema of
    ``uxnet::conv3d_3x3x3_backward``."""
    return convolution_autograd_rule(OP, backward_op)


def _output_shape(x, weight):
    return (x.shape[0], weight.shape[0]) + tuple(x.shape[2:])


def _register_compiled() -> None:
    @torch.library.register_fake("uxnet::conv3d_3x3x3")
    def _fake(x, weight, bias):
        return torch.empty(_output_shape(x, weight), dtype=x.dtype, device=x.device,
                           memory_format=output_memory_format(x))

    @torch.library.register_fake("uxnet::conv3d_3x3x3_backward")
    def _backward_fake(grad_out, x, weight, output_mask):
        grad_x = (torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(grad_out))
                  if output_mask[0] else x.new_empty(EMPTY_GRAD_SHAPE))
        grad_bias = x.new_empty((weight.shape[0],)) if output_mask[2] else x.new_empty(EMPTY_GRAD_SHAPE)
        return grad_x, grad_or_empty(output_mask[1], weight), grad_bias

    @torch.library.register_fake("uxnet::conv3d_3x3x3_pack_weight")
    def _pack_fake(weight):
        dtype = _packed_dtype(weight.dtype)
        cols = _extension.conv3d_3x3x3_columns(dtype == torch.float64)
        if dtype == torch.bfloat16:  # pairs of input channels
            return weight.new_empty((64, -(-weight.shape[0] // cols), -(-weight.shape[1] // 2), 2 * cols), dtype=dtype)
        return weight.new_empty((64, -(-weight.shape[0] // cols), weight.shape[1], cols), dtype=dtype)

    @torch.library.register_fake("uxnet::conv3d_3x3x3_packed")
    def _packed_fake(x, weight, packed_weight, bias):
        return _fake(x, weight, bias)

    backward, setup = autograd_rule(torch.ops.uxnet.conv3d_3x3x3_backward)
    torch.library.register_autograd("uxnet::conv3d_3x3x3", backward, setup_context=setup)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The CPU kernels compute float64 in float64 and every other floating dtype in float32 (the products of bf16
    pairs, where ``bf16_products()``, accumulate in float32 too)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def bf16_products() -> bool:
    """Whether bfloat16 inputs run bf16 products on the CPU kernels' ISA selected now (see the module docstring)."""
    return _extension.LOADED and _extension.conv3d_3x3x3_bf16_products()


def _packed_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of ``conv3d_3x3x3_pack_weight`` for a weight (and an x) of ``dtype``: bf16 pairs for the bf16
    products, else the compute dtype."""
    return torch.bfloat16 if dtype == torch.bfloat16 and bf16_products() else _compute_dtype(dtype)


def _compiled(x, weight, bias):
    return torch.ops.uxnet.conv3d_3x3x3(x, weight, bias)


def _compiled_packed(x, weight, bias, packed_weight):
    return torch.ops.uxnet.conv3d_3x3x3_packed(x, weight, packed_weight, bias)


if _extension.LOADED:
    _register_compiled()

FAMILY = dispatch.register(dispatch.OpFamily(OP, [
    dispatch.Implementation("reference", reference),
    dispatch.Implementation("cpu", _compiled, BACKENDS["cpu"].has_kernel(OP),
                            variants=(("packed", _compiled_packed),)),
]))


def conv3d_3x3x3(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                 packed_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dense 3D convolution with a 3x3x3 kernel, stride 1, padding 1 (groups 1).

    Equal to ``F.conv3d(x, weight, bias, padding=1)``. On the CPU backend it runs Winograd F(2x2x2, 3x3x3) (float32
    error like a direct convolution; bfloat16 inputs run bf16 products where ``bf16_products()``, else they are
    computed in float32, and the output is rounded once). Under ``torch.autocast`` it is a convolution: inputs cast
    to the autocast dtype, output in that dtype.

    Args:
        x: (N, C_in, D, H, W), float32 / bfloat16 / float16 / float64, contiguous or channels_last_3d.
        weight: (C_out, C_in, 3, 3, 3); same dtype and device as x.
        bias: (C_out,) or None.
        packed_weight: ``conv3d_3x3x3_pack_weight(weight)``, computed once for an unchanged weight (inference: no
            autograd through it). Used when the CPU kernel runs and its dtype is the one x's dtype packs to
            (``conv3d_3x3x3_pack_weight`` of a weight in x's dtype); otherwise ignored (the result is the same).
            Under autocast, x's dtype is the autocast dtype: pack ``weight.to(autocast dtype)``, which is what
            autocast rounds the weight to. The caller keeps it in step with ``weight``.

    Returns:
        (N, C_out, D, H, W) in x's dtype (and, on the compiled backend, x's memory format).

    Raises:
        ValueError: wrong rank, a kernel other than 3x3x3, weight/bias not matching the channels, dtype or device
            mismatch, non-floating dtypes; a packed_weight with autograd recording.
    """
    amp_dtype = autocast.active_dtype(x)
    if amp_dtype is None:
        return _run(x, weight, bias, packed_weight)
    with autocast.disabled(x):
        return _run(autocast.cast(amp_dtype, x), autocast.cast(amp_dtype, weight), autocast.cast(amp_dtype, bias),
                    packed_weight)


def conv3d_3x3x3_pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """The Winograd-domain weights of ``weight`` (C_out, C_in, 3, 3, 3) for ``conv3d_3x3x3(..., packed_weight=)``:
    (64, ceil(C_out / cols), C_in, cols) in float32 (float64 for float64 weights), laid out for the CPU kernel of
    the ISA selected now; for a bfloat16 weight where ``bf16_products()``, (64, ceil(C_out / cols), ceil(C_in / 2),
    2 * cols) bfloat16 pairs of input channels. 64/27 times the filter's elements. CPU tensors only; no autograd.

    Raises:
        ValueError: a weight that is not (C_out, C_in, 3, 3, 3), not floating, not on the CPU, or that requires
            grad while autograd records.
    """
    validation.check_tensor(OP, "weight", weight, 5, "(C_out, C_in, 3, 3, 3)")
    if tuple(weight.shape[2:]) != (3, 3, 3):
        validation.fail(OP, f"expected a 3x3x3 kernel, got weight of shape {tuple(weight.shape)}")
    if weight.device.type != "cpu" or not _extension.LOADED or not BACKENDS["cpu"].has_kernel(OP):
        validation.fail(OP, "conv3d_3x3x3_pack_weight needs a CPU weight and the compiled CPU kernels")
    _refuse_autograd(weight)
    return torch.ops.uxnet.conv3d_3x3x3_pack_weight(weight)


def runs_packed(x: torch.Tensor) -> bool:
    """Whether ``conv3d_3x3x3(x, weight, packed_weight=)`` would use a packed weight now: the CPU kernel serves x (not
    while exporting or on another backend)."""
    return dispatch.would_select(FAMILY, x) == "cpu"


def packing_pays(x: torch.Tensor, weight: torch.Tensor, dtype: Optional[torch.dtype] = None) -> bool:
    """Whether a packed weight (``pack_weight``) makes the CPU kernel faster for x and weight in ``dtype`` (default
    x's), enough to keep it: not for few tiles with large filters (768 -> 768 @ 6^3 in the default model, 151 MB
    packed in float32), where float32 streams the filter per call (26 ms there, packed 15, oneDNN 51) and bfloat16
    without a packed weight runs ATen's bf16 convolution (docs/PERFORMANCE.md)."""
    element_size = torch.empty((), dtype=dtype or x.dtype).element_size()  # as the C++ side reads the weight
    return not _extension.conv3d_3x3x3_few_tiles_large_filter(x.shape, weight.shape, element_size)


def _refuse_autograd(*tensors) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        validation.fail(OP, "packed_weight is for inference: call it under torch.no_grad() or "
                            "torch.inference_mode(), or pass no packed_weight")


def _zero_size_result(x, weight, bias):
    """No input values or no filters: the bias alone (0 without one), connected to every input for autograd."""
    out = x.new_zeros(_output_shape(x, weight)) + (x.sum() + weight.sum()) * 0
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1, 1)
    return out.contiguous(memory_format=output_memory_format(x))


def _run(x, weight, bias, packed_weight=None):
    check_args(x, weight, bias)
    if packed_weight is not None:
        _refuse_autograd(x, weight, bias)
    if x.numel() == 0 or weight.numel() == 0:
        return _zero_size_result(x, weight, bias)
    implementation = dispatch.select(FAMILY, x)
    packed_run = implementation.variant("packed") if packed_weight is not None else None
    if packed_run is not None and packed_weight.dtype == _packed_dtype(x.dtype):
        return packed_run(x, weight, bias, packed_weight)
    return implementation.run(x, weight, bias)
