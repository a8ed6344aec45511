"""Triton kernels of the channels-first LayerNorm: normalise each voxel of (N, C, D, H, W) over its C channels.

One program covers BLOCK_V voxels with all channels in registers (BLOCK_C = next_power_of_2(C)); statistics are
float32. The backward writes per-program partial sums of the weight and bias gradients, (programs, 2, C), that
the host code reduces in a second, deterministic pass. Inputs are either contiguous NCDHW or channels_last_3d
(CHANNELS_LAST); voxel indices and offsets are int64.
"""

from typing import List, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op
from triton.language.standard import _sum_combine

from .channels_first import backward_programs, voxel_blocks, voxel_channel_offsets, voxel_stats
from .launch import as_float32, canonical, empty_grad, empty_like_layout, in_layout, launcher, poisoned


@triton.jit
def layer_norm_channels_first_fwd_kernel(
    x_ptr,  # (N, C, D, H, W), contiguous or channels_last_3d
    w_ptr,  # (C,) float32
    b_ptr,  # (C,) float32
    out_ptr,  # like x
    mean_ptr,  # (N, D, H, W) float32
    rstd_ptr,  # (N, D, H, W) float32
    V, C, S, eps,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    v = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    c = tl.arange(0, BLOCK_C)
    v_mask = v < V
    c_mask = c < C
    mask = v_mask[:, None] & c_mask[None, :]
    offs = voxel_channel_offsets(v, c, C, S, CHANNELS_LAST)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.reduce(x, 1, _sum_combine) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.reduce(xc * xc, 1, _sum_combine) / C + eps)
    w = tl.load(w_ptr + c, mask=c_mask, other=0.0)
    b = tl.load(b_ptr + c, mask=c_mask, other=0.0)
    out = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + v, mean, mask=v_mask)
    tl.store(rstd_ptr + v, rstd, mask=v_mask)


@triton.jit
def layer_norm_channels_first_bwd_kernel(
    go_ptr,  # (N, C, D, H, W), same layout as x
    x_ptr,  # (N, C, D, H, W)
    w_ptr,  # (C,) float32
    mean_ptr,  # (N, D, H, W) float32
    rstd_ptr,  # (N, D, H, W) float32
    gx_ptr,  # like x
    partial_ptr,  # (programs, 2, C) float32: rows grad_weight, grad_bias
    V, C, S, blocks_per_program,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    c_mask = c < C
    w = tl.load(w_ptr + c, mask=c_mask, other=0.0)
    acc_w = tl.full((BLOCK_C,), 0.0, tl.float32)
    acc_b = tl.full((BLOCK_C,), 0.0, tl.float32)
    for i in range(0, blocks_per_program):
        v = (pid * blocks_per_program + i) * BLOCK_V + tl.arange(0, BLOCK_V)
        v_mask = v < V
        mask = v_mask[:, None] & c_mask[None, :]
        offs = voxel_channel_offsets(v, c, C, S, CHANNELS_LAST)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        go = tl.load(go_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + v, mask=v_mask, other=0.0)
        rstd = tl.load(rstd_ptr + v, mask=v_mask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        acc_w += tl.reduce(go * xhat, 0, _sum_combine)
        acc_b += tl.reduce(go, 0, _sum_combine)
        g = go * w[None, :]
        g_mean = tl.reduce(g, 1, _sum_combine) / C
        gx_mean = tl.reduce(g * xhat, 1, _sum_combine) / C
        gx = rstd[:, None] * (g - g_mean[:, None] - xhat * gx_mean[:, None])
        tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_ptr + pid * 2 * C + c, acc_w, mask=c_mask)
    tl.store(partial_ptr + pid * 2 * C + C + c, acc_b, mask=c_mask)


# ---- host code and operators ------------------------------------------------------------------------------------


@triton_op("uxnet::layer_norm_channels_first_triton", mutates_args=())
def layer_norm_channels_first_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, channels_last = canonical(x)
    n, c, d, h, w = x.shape
    voxels, spatial = n * d * h * w, d * h * w
    out = empty_like_layout(x, channels_last)
    mean, rstd = voxel_stats(x)
    block_v, block_c, warps = voxel_blocks(c, 1)
    launch = launcher(layer_norm_channels_first_fwd_kernel, x)
    if launch is not None:
        launch[(triton.cdiv(voxels, block_v),)](
            x, as_float32(weight), as_float32(bias), out, mean, rstd, voxels, c, spatial, eps,
            CHANNELS_LAST=channels_last, BLOCK_V=block_v, BLOCK_C=block_c, num_warps=warps,
        )
    return out, mean, rstd


@triton_op("uxnet::layer_norm_channels_first_triton_backward", mutates_args=())
def layer_norm_channels_first_triton_backward(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    output_mask: List[bool],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_out, channels_last = canonical(grad_out)
    x = in_layout(x, channels_last)
    n, c, d, h, w = x.shape
    voxels, spatial = n * d * h * w, d * h * w
    block_v, block_c, warps = voxel_blocks(c, 2)
    programs, per_program = backward_programs(voxels, block_v)
    grad_x = empty_like_layout(grad_out, channels_last)
    partial = poisoned(x.new_empty((programs, 2, c), dtype=torch.float32))
    launch = launcher(layer_norm_channels_first_bwd_kernel, x, grad_out)
    if launch is not None:
        launch[(programs,)](
            grad_out, x, as_float32(weight), mean.contiguous(), rstd.contiguous(), grad_x, partial,
            voxels, c, spatial, per_program,
            CHANNELS_LAST=channels_last, BLOCK_V=block_v, BLOCK_C=block_c, num_warps=warps,
        )
    sums = partial.sum(0).to(weight.dtype)
    return (
        grad_x if output_mask[0] else empty_grad(x),
        sums[0].clone() if output_mask[1] else empty_grad(x),
        sums[1].clone() if output_mask[2] else empty_grad(x),
    )




