"""Argument checks for the public ops: every error names the op and states expected versus got."""

from typing import Optional

import torch


def _fail(op: str, message: str):
    raise ValueError(f"uxnet_kernels.{op}: {message}")


def check_tensor(op: str, name: str, t, rank: Optional[int] = None, shape_hint: str = "") -> None:
    if not isinstance(t, torch.Tensor):
        _fail(op, f"expected {name} to be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        _fail(op, f"expected {name} to have a floating dtype (float32, bfloat16, float16, float64), got {t.dtype}")
    if rank is not None and t.dim() != rank:
        _fail(op, f"expected {name} of shape {shape_hint} ({rank}-d), got {t.dim()}-d tensor of shape {tuple(t.shape)}")


def check_same_dtype_device(op: str, main_name: str, main: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is None:
            continue
        if t.dtype != main.dtype:
            _fail(op, f"expected {name} dtype {main.dtype} (the dtype of {main_name}), got {t.dtype}")
        if t.device != main.device:
            _fail(op, f"expected {name} on device {main.device} (the device of {main_name}), got {t.device}")


def check_numel(op: str, name: str, t: torch.Tensor, numel: int, shapes: str) -> None:
    if t.numel() != numel:
        _fail(op, f"expected {name} with {numel} elements (shape {shapes}), got shape {tuple(t.shape)}")


def check_dwconv3d(x, weight, bias) -> None:
    op = "dwconv3d"
    check_tensor(op, "x", x, 5, "(N, C, D, H, W)")
    check_tensor(op, "weight", weight, 5, "(C, 1, KD, KH, KW)")
    channels = x.shape[1]
    if weight.shape[0] != channels or weight.shape[1] != 1:
        _fail(op, f"expected weight of shape ({channels}, 1, KD, KH, KW) for x with {channels} channels, "
                  f"got {tuple(weight.shape)}")
    kernel = tuple(weight.shape[2:])
    if any(k % 2 == 0 for k in kernel):
        _fail(op, f"expected odd kernel sizes (same padding is k // 2 per side), got {kernel}")
    if bias is not None:
        check_tensor(op, "bias", bias, 1, f"({channels},)")
        if bias.shape[0] != channels:
            _fail(op, f"expected bias of shape ({channels},), got {tuple(bias.shape)}")
    check_same_dtype_device(op, "x", x, weight=weight, bias=bias)


def check_layer_norm(x, weight, bias, eps) -> None:
    op = "layer_norm_channels_first"
    check_tensor(op, "x", x, 5, "(N, C, D, H, W)")
    channels = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias)):
        check_tensor(op, name, t, 1, f"({channels},)")
        if t.shape[0] != channels:
            _fail(op, f"expected {name} of shape ({channels},), got {tuple(t.shape)}")
    check_same_dtype_device(op, "x", x, weight=weight, bias=bias)
    if not eps > 0:
        _fail(op, f"expected eps > 0, got {eps}")


def check_ux_mlp(y, residual, ln_weight, ln_bias, w1, b1, w2, b2, gamma, eps) -> None:
    op = "ux_mlp"
    check_tensor(op, "y", y, 5, "(N, C, D, H, W)")
    c = y.shape[1]
    if residual is not None:
        check_tensor(op, "residual", residual, 5, "(N, C, D, H, W)")
        if residual.shape != y.shape:
            _fail(op, f"expected residual of shape {tuple(y.shape)} (the shape of y), got {tuple(residual.shape)}")
    params = {
        "ln_weight": (ln_weight, c, f"({c},)"),
        "ln_bias": (ln_bias, c, f"({c},)"),
        "w1": (w1, 4 * c, f"({4 * c}, 1, 1, 1, 1) or ({c}, 4)"),
        "b1": (b1, 4 * c, f"({4 * c},) or ({c}, 4)"),
        "w2": (w2, 4 * c, f"({c}, 4, 1, 1, 1) or ({c}, 4)"),
        "b2": (b2, c, f"({c},)"),
        "gamma": (gamma, c, f"({c},)"),
    }
    for name, (t, numel, shapes) in params.items():
        if t is None and name == "gamma":
            continue
        check_tensor(op, name, t)
        check_numel(op, name, t, numel, shapes)
    check_same_dtype_device(op, "y", y, residual=residual, **{k: v[0] for k, v in params.items()})
    if not eps > 0:
        _fail(op, f"expected eps > 0, got {eps}")


def _check_slope_eps(op: str, negative_slope, eps) -> None:
    if not (isinstance(negative_slope, (int, float)) and negative_slope > 0 and negative_slope != float("inf")):
        _fail(op, f"expected a finite negative_slope > 0, got {negative_slope!r}: the backward recovers the "
                  "normalised values from the saved output by inverting the LeakyReLU, which needs a slope > 0 "
                  "(use the reference ops, or torch.nn.functional, for ReLU or a negative slope)")
    if not eps > 0:
        _fail(op, f"expected eps > 0, got {eps}")


def _check_spatial_size(op: str, name: str, x: torch.Tensor) -> None:
    if x.shape[2] * x.shape[3] * x.shape[4] == 1:
        _fail(op, f"expected more than one voxel per (n, c) to normalise over, got {name} of shape {tuple(x.shape)}: "
                  "the instance norm of a single value is 0 whatever the input (torch.nn.functional.instance_norm "
                  "refuses it too; in UXNet, an input of 16 voxels along every axis leaves one voxel at the 1/16 "
                  "bottleneck)")


def check_instance_norm_lrelu(x, negative_slope, eps) -> None:
    op = "instance_norm_lrelu"
    check_tensor(op, "x", x, 5, "(N, C, D, H, W)")
    _check_spatial_size(op, "x", x)
    _check_slope_eps(op, negative_slope, eps)


def check_instance_norm_add_lrelu(z, residual, shortcut_inputs, shortcut_weights, negative_slope, eps) -> None:
    op = "instance_norm_add_lrelu"
    check_tensor(op, "z", z, 5, "(N, C, D, H, W)")
    _check_spatial_size(op, "z", z)
    n, c, *spatial = z.shape
    if residual is not None:
        if shortcut_inputs or shortcut_weights:
            _fail(op, "expected either residual or shortcut_inputs/shortcut_weights, got both")
        check_tensor(op, "residual", residual, 5, "(N, C, D, H, W)")
        if residual.shape != z.shape:
            _fail(op, f"expected residual of shape {tuple(z.shape)} (the shape of z), got {tuple(residual.shape)}")
        check_same_dtype_device(op, "z", z, residual=residual)
    else:
        if not isinstance(shortcut_inputs, (list, tuple)) or not isinstance(shortcut_weights, (list, tuple)):
            _fail(op, "expected shortcut_inputs and shortcut_weights to be lists of tensors")
        if len(shortcut_inputs) == 0 or len(shortcut_inputs) != len(shortcut_weights):
            _fail(op, "expected a residual, or as many shortcut_weights as shortcut_inputs (at least one), got "
                      f"{len(shortcut_inputs)} inputs and {len(shortcut_weights)} weights")
        for i, (x, w) in enumerate(zip(shortcut_inputs, shortcut_weights)):
            check_tensor(op, f"shortcut_inputs[{i}]", x, 5, f"({n}, C_{i}, {', '.join(map(str, spatial))})")
            if x.shape[1] == 0:
                _fail(op, f"expected shortcut_inputs[{i}] with at least one channel, got shape {tuple(x.shape)}")
            if x.shape[0] != n or list(x.shape[2:]) != spatial:
                _fail(op, f"expected shortcut_inputs[{i}] of shape ({n}, C_{i}, {', '.join(map(str, spatial))}) "
                          f"(batch and spatial size of z), got {tuple(x.shape)}")
            check_tensor(op, f"shortcut_weights[{i}]", w, 5, f"({c}, {x.shape[1]}, 1, 1, 1)")
            if tuple(w.shape) != (c, x.shape[1], 1, 1, 1):
                _fail(op, f"expected shortcut_weights[{i}] of shape ({c}, {x.shape[1]}, 1, 1, 1) (a 1x1x1 conv "
                          f"from shortcut_inputs[{i}] to the {c} channels of z), got {tuple(w.shape)}")
            check_same_dtype_device(op, "z", z, **{f"shortcut_inputs[{i}]": x, f"shortcut_weights[{i}]": w})
    _check_slope_eps(op, negative_slope, eps)
