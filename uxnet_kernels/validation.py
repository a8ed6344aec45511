"""Argument-check helpers of the op families: every error is a ValueError that names the op and states expected
versus got. The checks of each op live in its family module (``uxnet_kernels/ops/<op>.py``)."""

from typing import Optional

import torch


def fail(op: str, message: str):
    raise ValueError(f"uxnet_kernels.{op}: {message}")


def check_tensor(op: str, name: str, t, rank: Optional[int] = None, shape_hint: str = "") -> None:
    if not isinstance(t, torch.Tensor):
        fail(op, f"expected {name} to be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        fail(op, f"expected {name} to have a floating dtype (float32, bfloat16, float16, float64), got {t.dtype}")
    if rank is not None and t.dim() != rank:
        fail(op, f"expected {name} of shape {shape_hint} ({rank}-d), got {t.dim()}-d tensor of shape {tuple(t.shape)}")


def check_same_dtype_device(op: str, main_name: str, main: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is None:
            continue
        if t.dtype != main.dtype:
            fail(op, f"expected {name} dtype {main.dtype} (the dtype of {main_name}), got {t.dtype}")
        if t.device != main.device:
            fail(op, f"expected {name} on device {main.device} (the device of {main_name}), got {t.device}")


def check_numel(op: str, name: str, t: torch.Tensor, numel: int, shapes: str) -> None:
    if t.numel() != numel:
        fail(op, f"expected {name} with {numel} elements (shape {shapes}), got shape {tuple(t.shape)}")


def check_slope_eps(op: str, negative_slope, eps) -> None:
    if not (isinstance(negative_slope, (int, float)) and negative_slope > 0 and negative_slope != float("inf")):
        fail(op, f"expected a finite negative_slope > 0, got {negative_slope!r}: the backward recovers the "
                  "normalised values from the saved output by inverting the LeakyReLU, which needs a slope > 0 "
                  "(use the reference ops, or torch.nn.functional, for ReLU or a negative slope)")
    if not eps > 0:
        fail(op, f"expected eps > 0, got {eps}")


def check_spatial_size(op: str, name: str, x: torch.Tensor) -> None:
    if x.shape[2] * x.shape[3] * x.shape[4] == 1:
        fail(op, f"expected more than one voxel per (n, c) to normalise over, got {name} of shape {tuple(x.shape)}: "
                  "the instance norm of a single value is 0 whatever the input (torch.nn.functional.instance_norm "
                  "refuses it too; in UXNet, an input of 16 voxels along every axis leaves one voxel at the 1/16 "
                  "bottleneck)")


def check_eps(op: str, eps) -> None:
    if not eps > 0:
        fail(op, f"expected eps > 0, got {eps}")
