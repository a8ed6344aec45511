"""Structural re-parameterisation of 3D UX-Net: training-time branches, the kernel prior, and exact inference folds.

Training-time model (``UXNet(rep_branches=..., kernel_prior=...)``): each UX block's large-kernel depthwise conv
computes ``conv(x, W * M) + sum_b [scale_b * conv_dil_b(x, w_b) + b_b]`` where ``M`` is the fixed kernel prior
(``kernel_prior_mask``) and each branch ``b`` is a small (dilated) depthwise conv.

Because every term is a zero-padded "same" depthwise conv centred on the same tap, the sum is ONE depthwise conv
whose kernel is ``W * M`` plus each branch kernel dilated into its dense equivalent and zero-padded to the main
kernel's size (``merged_kernel``) -- equal everywhere, borders included. The block computes that merged kernel
in every forward (a few thousand multiply-adds per channel) and runs a single ``dwconv3d``: one pass over the
volume instead of 1 + len(branches), on the fast kernels, with the same gradients as separate branches (it is the
same function of the same parameters).

:func:`reparameterize` turns such a model (or a plain one) into a plain ``UXNet`` with the official state_dict:
branches and prior merged into ``dwconv``, and the folds that are exact at volume borders: layer scale gamma into
pwconv2, the block LayerNorm affine into pwconv1, and the LayerNorm affine before each 2x2x2 stride-2 downsampling
conv into that conv (no padding there). The stem's and stage outputs' LayerNorm affines feed zero-padded convs, so
folding them would change border voxels; they are kept.

The building blocks the model itself needs (branch specs, ``RepBranch``, the prior, ``merged_kernel``) live in
``uxnet.networks.blocks.rep_branches``; this module imports the model, the model never imports this module.
"""

import copy

import torch
from torch import nn

from .nets.uxnet import UXNet


# ---- inference folds, all exact at volume borders ---------------------------------------------------------

def fold_layer_scale(pwconv2: nn.Conv3d, gamma: nn.Parameter) -> None:
    """``gamma * (w2 h + b2)`` == ``(gamma w2) h + gamma b2``; gamma := 1."""
    _assign(pwconv2.weight, pwconv2.weight * gamma.reshape(-1, 1, 1, 1, 1))
    _assign(pwconv2.bias, pwconv2.bias * gamma)
    _assign(gamma, torch.ones_like(gamma))


def fold_norm_into_grouped_pointwise(norm: nn.Module, pwconv1: nn.Conv3d) -> None:
    """pwconv1 (C -> 4C, groups=C) sees ``ln_w[c] n_c + ln_b[c]`` on outputs 4c..4c+3:
    ``w1' = w1 ln_w[c]``, ``b1' = b1 + w1 ln_b[c]``; LN affine := identity."""
    out_per_group = pwconv1.weight.shape[0] // norm.weight.shape[0]
    ln_w = norm.weight.repeat_interleave(out_per_group)
    ln_b = norm.bias.repeat_interleave(out_per_group)
    w1 = pwconv1.weight.reshape(-1)
    _assign(pwconv1.bias, pwconv1.bias + w1 * ln_b)
    _assign(pwconv1.weight, (w1 * ln_w).reshape(pwconv1.weight.shape))
    _reset_affine(norm)


def fold_norm_into_unpadded_conv(norm: nn.Module, conv: nn.Conv3d) -> None:
    """A dense conv without padding sees ``ln_w[c] n + ln_b[c]`` at every tap:
    ``W'[o, c] = W[o, c] ln_w[c]``, ``b'[o] = b[o] + sum_{c, taps} W[o, c] ln_b[c]``; LN affine := identity."""
    if any(p != 0 for p in conv.padding) or conv.groups != 1:
        raise ValueError("fold_norm_into_unpadded_conv: the conv must have no padding and groups=1 to fold exactly")
    w = conv.weight
    _assign(conv.bias, conv.bias + (w * norm.bias.reshape(1, -1, 1, 1, 1)).sum(dim=(1, 2, 3, 4)))
    _assign(conv.weight, w * norm.weight.reshape(1, -1, 1, 1, 1))
    _reset_affine(norm)


def _reset_affine(norm: nn.Module) -> None:
    _assign(norm.weight, torch.ones_like(norm.weight))
    _assign(norm.bias, torch.zeros_like(norm.bias))


def _assign(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile`` (``_orig_mod``) and DistributedDataParallel / DataParallel (``module``)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


TRAINING_ONLY_OPTIONS = ("rep_branches", "kernel_prior", "deep_supervision")


def plain_config(config: dict) -> dict:
    """``config`` without the training-time options: re-parameterisation branches, the kernel prior, and the deep
    supervision heads (which an inference model never runs)."""
    return {k: v for k, v in config.items() if k not in TRAINING_ONLY_OPTIONS}


@torch.no_grad()
def reparameterize(model: nn.Module, fold_norms: bool = True):
    """A new plain ``UXNet`` (eval mode, same dtype and device) equal to ``model`` in eval mode.

    Branches and the kernel prior are merged into each block's ``dwconv``; with ``fold_norms`` (default) gamma,
    the block LayerNorm affines and the pre-downsampling LayerNorm affines are folded as described in the module
    docstring. Deep-supervision heads are dropped (eval mode never runs them). All of it is computed in float64 and
    cast back once. The result's state_dict has exactly the
    official keys and shapes, so it loads with strict=True into a plain ``UXNet(**plain_config(model.config))``
    or the official ``UXNET``. ``model`` is left unchanged.
    """
    model = unwrap(model)
    if not isinstance(model, UXNet):
        raise TypeError(f"reparameterize: expected a uxnet.UXNet, got {type(model).__name__}")
    param = next(model.parameters())
    source = copy.deepcopy(model).double()
    plain = UXNet(**plain_config(model.config)).double()
    source_state = source.state_dict()
    plain.load_state_dict({k: source_state[k] for k in plain.state_dict()}, strict=True)

    for src_stage, dst_stage in zip(source.uxnet_3d.stages, plain.uxnet_3d.stages):
        for src, dst in zip(src_stage, dst_stage):
            weight, bias = src.effective_kernel()
            _assign(dst.dwconv.weight, weight)
            _assign(dst.dwconv.bias, bias)
            if fold_norms:
                if dst.gamma is not None:
                    fold_layer_scale(dst.pwconv2, dst.gamma)
                fold_norm_into_grouped_pointwise(dst.norm, dst.pwconv1)
    if fold_norms:
        for layer in list(plain.uxnet_3d.downsample_layers)[1:]:
            fold_norm_into_unpadded_conv(layer[0], layer[1])
    return plain.to(device=param.device, dtype=param.dtype).eval()


__all__ = ["reparameterize", "plain_config", "unwrap", "fold_layer_scale", "fold_norm_into_grouped_pointwise",
           "fold_norm_into_unpadded_conv", "TRAINING_ONLY_OPTIONS"]
