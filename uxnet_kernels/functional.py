"""The public ops. Each validates its arguments, canonicalises them and hands them to the selected backend.

Zero-size inputs (any dimension of size 0) give a correctly shaped empty result on every backend, with
gradients (empty, or zero for parameters) flowing through autograd.

Under ``torch.autocast`` each op casts its inputs first (policies in ``uxnet_kernels.autocast``).
"""

from typing import Optional, Sequence

import torch

from . import autocast, dispatch, validation


def _empty_result(like: torch.Tensor, *params: Optional[torch.Tensor]) -> torch.Tensor:
    out = like * 0
    for p in params:
        if p is not None:
            out = out + p.sum() * 0
    return out


def dwconv3d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Depthwise 3D convolution with stride 1 and zero "same" padding.

    Equal to ``F.conv3d(x, weight, bias, padding=(kd // 2, kh // 2, kw // 2), groups=C)``.

    Args:
        x: (N, C, D, H, W), float32 / bfloat16 / float16 / float64, contiguous or channels_last_3d.
        weight: (C, 1, KD, KH, KW) with odd KD, KH, KW (e.g. 7x7x7, 21x21x21, 7x7x3); same dtype and device as x.
        bias: (C,) or None.

    Returns:
        (N, C, D, H, W) in x's dtype (and, on the compiled backends, x's memory format).

    Raises:
        ValueError: wrong rank, even kernel size, weight/bias not matching the channels of x, dtype or device
            mismatch, non-floating dtypes.
    """
    amp_dtype = autocast.active_dtype(x)
    if amp_dtype is not None:
        return autocast.dwconv3d(dwconv3d, x, weight, bias, amp_dtype)
    validation.check_dwconv3d(x, weight, bias)
    if x.numel() == 0:
        return _empty_result(x, weight, bias)
    return dispatch.select("dwconv3d", x).dwconv3d(x, weight, bias)


def layer_norm_channels_first(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """LayerNorm over the channel dim of (N, C, D, H, W), as the official channels-first ``LayerNorm``.

    ``weight[c] * (x - mean) / sqrt(var + eps) + bias[c]`` with mean and biased variance over C per voxel,
    accumulated in float32 (float64 for float64 inputs).

    Args:
        x: (N, C, D, H, W), floating, contiguous or channels_last_3d.
        weight, bias: (C,), same dtype and device as x.
        eps: > 0.

    Returns:
        Tensor shaped like x.

    Raises:
        ValueError: wrong rank, parameter shape/dtype/device mismatch, non-floating dtypes, eps <= 0.
    """
    amp_dtype = autocast.active_dtype(x)
    if amp_dtype is not None:
        return autocast.layer_norm_channels_first(layer_norm_channels_first, x, weight, bias, eps, amp_dtype)
    validation.check_layer_norm(x, weight, bias, eps)
    if x.numel() == 0:
        return _empty_result(x, weight, bias)
    return dispatch.select("layer_norm_channels_first", x).layer_norm_channels_first(x, weight, bias, float(eps))


def ux_mlp(
    y: torch.Tensor,
    residual: Optional[torch.Tensor],
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    gamma: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """The UX block tail ``residual + gamma * pwconv2(GELU(pwconv1(LN(y))))`` in one pass per voxel.

    pwconv1 is the block's grouped 1x1x1 conv C -> 4C (groups=C), pwconv2 the grouped 1x1x1 conv 4C -> C
    (groups=C), LN a LayerNorm over channels, GELU the exact (erf) GELU. Both convs act per channel, so for
    channel c: ``h_j = GELU(w1[4c+j] * LN(y)_c + b1[4c+j])`` and ``out_c = residual_c + gamma_c * (sum_j w2[c, j] h_j + b2_c)``.

    Args:
        y: (N, C, D, H, W), floating, contiguous or channels_last_3d (the output of the block's dwconv).
        residual: like y (the block input), or None for no residual.
        ln_weight, ln_bias: (C,).
        w1: (4C, 1, 1, 1, 1) (``pwconv1.weight``), (4C,) or (C, 4); b1: (4C,) or (C, 4).
        w2: (C, 4, 1, 1, 1) (``pwconv2.weight``) or (C, 4); b2: (C,).
        gamma: (C,) layer scale, or None.
        eps: LayerNorm epsilon, > 0.

    Returns:
        Tensor shaped like y.

    Raises:
        ValueError: wrong rank, parameter element counts not matching C, dtype/device mismatch, eps <= 0.
    """
    amp_dtype = autocast.active_dtype(y)
    if amp_dtype is not None:
        return autocast.ux_mlp(ux_mlp, y, residual, ln_weight, ln_bias, w1, b1, w2, b2, gamma, eps, amp_dtype)
    validation.check_ux_mlp(y, residual, ln_weight, ln_bias, w1, b1, w2, b2, gamma, eps)
    if y.numel() == 0:
        return _empty_result(y if residual is None else y + residual, ln_weight, ln_bias, w1, b1, w2, b2, gamma)
    c = y.shape[1]
    w1, b1, w2 = (t.reshape(c, 4).contiguous() for t in (w1, b1, w2))
    backend = dispatch.select("ux_mlp", y)
    return backend.ux_mlp(y, residual, ln_weight, ln_bias, w1, b1, w2, b2, gamma, float(eps))


def instance_norm_lrelu(x: torch.Tensor, negative_slope: float = 0.01, eps: float = 1e-5) -> torch.Tensor:
    """``leaky_relu(instance_norm(x), negative_slope)``: the norm + activation of the UNETR decoder blocks.

    Instance norm without affine: per (n, c), ``(x - mean) / sqrt(var + eps)`` with the mean and biased variance
    over D * H * W, accumulated in float32 (float64 for float64 inputs). Autograd keeps only the output (which the
    next convolution keeps anyway) and the per-(n, c) statistics: the backward recovers the normalised values by
    inverting the LeakyReLU (In-Place Activated BatchNorm, Rota Bulo et al. 2018), so the input is not saved.

    Args:
        x: (N, C, D, H, W), floating, contiguous or channels_last_3d.
        negative_slope: LeakyReLU slope, > 0 (invertible; 0.01 in MONAI's blocks).
        eps: > 0 (1e-5, ``nn.InstanceNorm3d``'s default).

    Returns:
        Tensor shaped like x (same dtype; on the compiled backends, same memory format).

    Raises:
        ValueError: wrong rank, non-floating dtype, negative_slope <= 0 or not finite, eps <= 0.
    """
    amp_dtype = autocast.active_dtype(x)
    if amp_dtype is not None:
        return autocast.instance_norm_lrelu(instance_norm_lrelu, x, negative_slope, eps)
    validation.check_instance_norm_lrelu(x, negative_slope, eps)
    if x.numel() == 0:
        return _empty_result(x)
    return dispatch.select("instance_norm_lrelu", x).instance_norm_lrelu(x, float(negative_slope), float(eps))


def instance_norm_add_lrelu(
    z: torch.Tensor,
    residual: Optional[torch.Tensor] = None,
    shortcut_inputs: Sequence[torch.Tensor] = (),
    shortcut_weights: Sequence[torch.Tensor] = (),
    negative_slope: float = 0.01,
    eps: float = 1e-5,
    *,
    donate_z: bool = False,
) -> torch.Tensor:
    """The UNETR residual-block tail ``leaky_relu(instance_norm(z) + r, negative_slope)`` in one op.

    r is ``residual`` (the block input), or a projection shortcut ``instance_norm(sum_i conv3d(x_i, w_i))`` with
    bias-free 1x1x1 convolutions (the block's ``conv3`` + ``norm3``; several pairs compute the conv of a channel
    concatenation of the x_i without materialising it). Autograd keeps the output, ``residual`` or the shortcut
    inputs (which the block's first convolution keeps anyway) and per-(n, c) statistics; the shortcut convolution
    is recomputed in backward (a 1x1x1 conv, about 1/27 of the block's 3x3x3 conv) instead of keeping its output.

    Args:
        z: (N, C, D, H, W), floating, contiguous or channels_last_3d (the block's second conv output).
        residual: like z, or None when the shortcut is given.
        shortcut_inputs: tensors (N, C_i, D, H, W); empty when residual is given.
        shortcut_weights: one (C, C_i, 1, 1, 1) weight per shortcut input.
        negative_slope: LeakyReLU slope, > 0.
        eps: instance-norm epsilon, > 0 (for z and the shortcut).
        donate_z: the caller will not use z (or any alias of it) again, as a conv output that no backward needs,
            so the output may be written over z's memory: one full-size tensor less to allocate (and, on CPU, to
            page in). The CPU backend then writes in place and returns z itself (z's autograd history becomes this
            op's). Other backends, torch.compile (which plans its own buffers), a z that is a view or a leaf
            requiring grad, a z sharing memory with ``residual`` or a shortcut input, and an autocast output dtype
            other than z's (a float32 residual stream) leave z alone and return a new tensor (the reason is logged
            at DEBUG on ``uxnet_kernels.dispatch``). If autograd saved z's old values for another backward, that
            backward fails with autograd's in-place version error, never silently.

    Returns:
        Tensor shaped like z (z itself when donated and written in place).

    Raises:
        ValueError: wrong rank or shapes, both or neither of residual and shortcut, dtype or device mismatch,
            non-floating dtypes, negative_slope <= 0, eps <= 0.
    """
    shortcut_inputs, shortcut_weights = list(shortcut_inputs), list(shortcut_weights)
    amp_dtype = autocast.active_dtype(z)
    if amp_dtype is not None:
        return autocast.instance_norm_add_lrelu(instance_norm_add_lrelu, z, residual, shortcut_inputs,
                                                shortcut_weights, negative_slope, eps, amp_dtype, donate_z)
    validation.check_instance_norm_add_lrelu(z, residual, shortcut_inputs, shortcut_weights, negative_slope, eps)
    if z.numel() == 0:
        return _empty_result(z if residual is None else z + residual, *shortcut_inputs, *shortcut_weights)
    backend = dispatch.select("instance_norm_add_lrelu", z)
    run = backend.instance_norm_add_lrelu
    if donate_z:
        why = _why_z_is_kept(backend, z, residual, *shortcut_inputs)
        if not why:
            run = backend.instance_norm_add_lrelu_donated
        elif not torch.compiler.is_compiling():
            dispatch.logger.debug("instance_norm_add_lrelu: donate_z declined (%s)", why)
    return run(z, residual, shortcut_inputs, shortcut_weights, float(negative_slope), float(eps))


def _why_z_is_kept(backend, z: torch.Tensor, *others: Optional[torch.Tensor]) -> str:
    """Why z's memory cannot take the output ("" when it can): z must not be a view, nor a leaf that autograd refuses
    to modify, nor share memory with the ``others`` (which the op reads, and its backward may keep), and the backend
    needs an in-place kernel. Never while torch.compile traces: the compiler plans its own buffers, and Dynamo
    (torch 2.13) mis-traces the in-place autograd.Function inside activation checkpointing."""
    if torch.compiler.is_compiling():
        return "torch.compile plans buffers itself"
    if z._base is not None:
        return "z is a view"
    if z.requires_grad and z.is_leaf:
        return "z is a leaf that requires grad"
    # Storage identity, not data_ptr: fake tensors (uxnet memory's predictions) all report data_ptr 0.
    if any(t is not None and torch._C._is_alias_of(t, z) for t in others):
        return "another input shares z's memory"
    return backend.donation_verdict()[1]
