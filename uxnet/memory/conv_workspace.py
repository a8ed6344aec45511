"""Scratch memory PyTorch's CPU convolutions allocate inside the op, where no dispatch mode sees it.

PyTorch picks a convolution backend per call (``torch._C._select_conv_backend``: PyTorch's own choice, asked with
the call's fake tensors); each keeps temporary buffers for the duration of the call:

* ``Slow3d``, the im2col path, taken by float32 convolutions with ``groups == 1``, at most 3 taps on the last two
  axes, batch 1 and ``N * C * D * H <= 20480`` (narrow or small inputs; ``use_mkldnn`` in
  ``aten/src/ATen/native/Convolution.cpp``): a column buffer of ``N x C_in * kD * kH * kW x D_out * H_out * W_out``
  elements in forward, and in backward one for grad_input and then one for grad_weight, one after the other
  (``ConvolutionMM3d.cpp``); none for the forward of a 1x1x1, unpadded, stride-1, ungrouped kernel (a view).
  Half-precision calls take this path too where oneDNN has no kernels for them (bfloat16 without AVX-512,
  float16 without AVX-512-FP16/AMX), and in backward also keep one sample's columns in float32 (measured).
* ``SlowTranspose3d`` (small transposed convolutions): ``C_out * kD * kH * kW x D_in * H_in * W_in`` elements, one
  batch sample at a time, forward and backward (``NaiveConvolutionTranspose3d.cpp``).
* oneDNN (``Mkldnn``, ``MkldnnTranspose``), float32 NCDHW tensors: reorders into oneDNN's blocked layout (channels
  padded to 16 with AVX-512, to 8 otherwise), as measured with torch 2.13 (oneDNN 3) on an AVX-512 CPU, and with
  ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` for AVX2: AVX-512 keeps a blocked copy of the input in
  forward and of the input and grad_output in backward; AVX2 keeps the larger of the blocked input and output (or
  grad_output) in both, and both for 1x1x1 kernels in backward; both keep a reordered copy of the weight in
  forward and two weight-sized buffers in backward (what dominates for the wide 2^3-4^3 layers of encoder5 and
  decoder5; measured 1-2 there depending on the shape, so this is exact to one weight). Transposed: forward two
  output-sized buffers, backward one output-sized and one input-sized. Channels-last tensors (no reorder) and
  half-precision calls (other, larger buffers this rule does not describe) get 0.

Measured on the CPU (fresh process, ``MALLOC_MMAP_THRESHOLD_=65536``), a call's resident-set peak is its outputs plus
these buffers to within a few MiB (docs/PERFORMANCE.md).
"""

import math
import os

import torch

_aten = torch.ops.aten
_MKLDNN_TRANSPOSE = 9  # _ConvBackend.MkldnnTranspose, which the Python enum binding leaves unnamed


def _backend_name(input, weight, stride, padding, dilation, transposed, output_padding, groups) -> str:
    try:
        backend = torch._C._select_conv_backend(input, weight, None, list(stride), list(padding), list(dilation),
                                                bool(transposed), list(output_padding), int(groups), None)
    except (RuntimeError, TypeError, AttributeError):  # a torch without this binding or signature: no estimate
        return ""
    if int(backend) == _MKLDNN_TRANSPOSE:
        return "MkldnnTranspose"
    return str(backend).rsplit(".", 1)[-1]


def onednn_avx512() -> bool:
    """Whether oneDNN runs its AVX-512 kernels here (the CPU has them and ONEDNN_MAX_CPU_ISA allows them)."""
    limit = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    allowed = limit == "ALL" or "AVX512" in limit or "AMX" in limit or "AVX10" in limit
    return allowed and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _blocked_bytes(t: torch.Tensor, avx512: bool) -> int:
    """Bytes of ``t`` (N, C, ...) in oneDNN's blocked layout: channels padded to the block."""
    block = 16 if avx512 else 8
    channels = -(-t.shape[1] // block) * block
    return t.shape[0] * channels * math.prod(t.shape[2:]) * t.element_size()


def _plain(*tensors: torch.Tensor) -> bool:
    return all(t.is_contiguous() and not t.is_contiguous(memory_format=torch.channels_last_3d) or t.shape[1] == 1
               for t in tensors)


def conv_workspace_bytes(func, args, out=None) -> int:
    """Bytes a CPU ``aten.convolution`` / ``aten.convolution_backward`` call keeps in temporary buffers next to
    its inputs and outputs (0 for other ops and devices); see the module docstring. ``out``: the op's result."""
    if func is _aten.convolution.default:
        x, weight, _bias, stride, padding, dilation, transposed, output_padding, groups = args[:9]
        grad_out, needs = None, (False, True)  # forward: only the unfolded input (as for grad_weight)
    elif func is _aten.convolution_backward.default:
        grad_out, x, weight, _bias_sizes, stride, padding, dilation, transposed, output_padding, groups = args[:10]
        needs = tuple(bool(m) for m in args[10][:2])
    else:
        return 0
    if x.device.type != "cpu" or x.dim() != 5:
        return 0
    backend = _backend_name(x, weight, stride, padding, dilation, transposed, output_padding, groups)
    kernel = math.prod(weight.shape[2:])
    if backend == "Slow3d":
        if grad_out is not None:
            out_spatial = grad_out.shape[2:]
        else:
            out_spatial = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1)
                           // stride[i] + 1 for i in range(3)]
        columns = x.shape[0] * x.shape[1] * kernel * math.prod(out_spatial) * x.element_size()
        unfold_is_view = kernel == 1 and not any(padding) and all(s == 1 for s in stride) and groups == 1
        grad_input_buffer = columns if needs[0] else 0  # allocated even for 1x1x1 kernels
        if needs[0] and x.dtype in (torch.bfloat16, torch.float16):
            # the half-precision GEMM into the columns accumulates one sample's columns in a float32 buffer
            grad_input_buffer += columns // x.shape[0] * 4 // x.element_size()
        unfold_buffer = columns if needs[1] and not unfold_is_view else 0
        return max(grad_input_buffer, unfold_buffer)
    if backend == "SlowTranspose3d":
        return weight.shape[1] * groups * kernel * math.prod(x.shape[2:]) * x.element_size()
    y = grad_out if grad_out is not None else out
    if y is None or not _plain(x, y):
        return 0
    if backend == "Mkldnn":
        avx512 = onednn_avx512()
        bx, by = _blocked_bytes(x, avx512), _blocked_bytes(y, avx512)
        w = weight.numel() * weight.element_size()
        if x.dtype in (torch.bfloat16, torch.float16):
            if not avx512:
                return 0
            return (max(bx, by) + w) if grad_out is None else 2 * (bx + by) + 2 * w
        if x.dtype != torch.float32:
            return 0
        if grad_out is None:
            return (bx if avx512 else max(bx, by)) + w
        if avx512:
            return bx + by + 2 * w
        return (bx + by if kernel == 1 else max(bx, by)) + 2 * w
    if backend == "MkldnnTranspose" and x.dtype == torch.float32:
        y_bytes = y.numel() * y.element_size()
        return y_bytes + (x.numel() * x.element_size() if grad_out is not None else y_bytes)
    return 0
