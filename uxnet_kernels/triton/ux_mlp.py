"""Triton kernels of the fused UX block tail ``out = residual + gamma * pwconv2(GELU(pwconv1(LN(y))))``.

Both 1x1x1 convolutions are grouped per channel (C -> 4C -> C, groups=C), so each voxel's channel c only needs
its own four hidden units: programs hold BLOCK_V voxels x all channels, and the hidden layer as a
[BLOCK_V, 4, BLOCK_C] tensor. GELU is the exact erf form; statistics are float32. The backward recomputes the
hidden activations from y and the saved mean/rstd, and writes per-program partial sums of the 16 parameter-grad
rows, (programs, 16, C), reduced in a second deterministic pass by the host code:

    row 0: ln_weight   1: ln_bias   2-5: w1[:, j]   6-9: b1[:, j]   10-13: w2[:, j]   14: b2   15: gamma
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op
from triton.language.standard import _sum_combine

from .channels_first import backward_programs, voxel_blocks, voxel_channel_offsets, voxel_stats
from .launch import as_float32, canonical, empty_grad, empty_like_layout, in_layout, launcher, poisoned

PARTIAL_ROWS = 16


@triton.jit
def _gelu(a):
    return 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))


@triton.jit
def _gelu_grad(a):
    return 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476)) + a * 0.3989422804014327 * tl.exp(-0.5 * a * a)


@triton.jit
def _load_hidden_params(w1_ptr, b1_ptr, w2_ptr, c, c_mask):
    """w1, b1, w2 as [4, BLOCK_C] from their (C, 4) float32 storage."""
    j = tl.arange(0, 4)
    offs = c[None, :] * 4 + j[:, None]
    m = c_mask[None, :]
    w1 = tl.load(w1_ptr + offs, mask=m, other=0.0)
    b1 = tl.load(b1_ptr + offs, mask=m, other=0.0)
    w2 = tl.load(w2_ptr + offs, mask=m, other=0.0)
    return w1, b1, w2


@triton.jit
def ux_mlp_fwd_kernel(
    y_ptr,  # (N, C, D, H, W), contiguous or channels_last_3d
    res_ptr,  # like y; unused unless HAS_RESIDUAL
    lnw_ptr, lnb_ptr,  # (C,) float32
    w1_ptr, b1_ptr, w2_ptr,  # (C, 4) float32
    b2_ptr,  # (C,) float32
    gamma_ptr,  # (C,) float32; unused unless HAS_GAMMA
    out_ptr,  # like y
    mean_ptr, rstd_ptr,  # (N, D, H, W) float32
    V, C, S, eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
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
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.reduce(y, 1, _sum_combine) / C
    yc = tl.where(mask, y - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.reduce(yc * yc, 1, _sum_combine) / C + eps)
    lnw = tl.load(lnw_ptr + c, mask=c_mask, other=0.0)
    lnb = tl.load(lnb_ptr + c, mask=c_mask, other=0.0)
    normed = yc * rstd[:, None] * lnw[None, :] + lnb[None, :]
    w1, b1, w2 = _load_hidden_params(w1_ptr, b1_ptr, w2_ptr, c, c_mask)
    hidden = _gelu(normed[:, None, :] * w1[None, :, :] + b1[None, :, :])  # [BLOCK_V, 4, BLOCK_C]
    z = tl.reduce(hidden * w2[None, :, :], 1, _sum_combine) + tl.load(b2_ptr + c, mask=c_mask, other=0.0)[None, :]
    if HAS_GAMMA:
        z = z * tl.load(gamma_ptr + c, mask=c_mask, other=0.0)[None, :]
    if HAS_RESIDUAL:
        z += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, z.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + v, mean, mask=v_mask)
    tl.store(rstd_ptr + v, rstd, mask=v_mask)


@triton.jit
def ux_mlp_bwd_kernel(
    go_ptr,  # (N, C, D, H, W), same layout as y
    y_ptr,  # (N, C, D, H, W)
    lnw_ptr, lnb_ptr,  # (C,) float32
    w1_ptr, b1_ptr, w2_ptr,  # (C, 4) float32
    b2_ptr,  # (C,) float32
    gamma_ptr,  # (C,) float32; unused unless HAS_GAMMA
    mean_ptr, rstd_ptr,  # (N, D, H, W) float32
    gy_ptr,  # like y
    partial_ptr,  # (programs, 16, C) float32, rows as in the module docstring
    V, C, S, blocks_per_program,
    HAS_GAMMA: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    c_mask = c < C
    lnw = tl.load(lnw_ptr + c, mask=c_mask, other=0.0)
    lnb = tl.load(lnb_ptr + c, mask=c_mask, other=0.0)
    b2 = tl.load(b2_ptr + c, mask=c_mask, other=0.0)
    if HAS_GAMMA:
        gamma = tl.load(gamma_ptr + c, mask=c_mask, other=0.0)
    w1, b1, w2 = _load_hidden_params(w1_ptr, b1_ptr, w2_ptr, c, c_mask)
    acc_lnw = tl.full((BLOCK_C,), 0.0, tl.float32)
    acc_lnb = tl.full((BLOCK_C,), 0.0, tl.float32)
    acc_b2 = tl.full((BLOCK_C,), 0.0, tl.float32)
    acc_gamma = tl.full((BLOCK_C,), 0.0, tl.float32)
    acc_w1 = tl.full((4, BLOCK_C), 0.0, tl.float32)
    acc_b1 = tl.full((4, BLOCK_C), 0.0, tl.float32)
    acc_w2 = tl.full((4, BLOCK_C), 0.0, tl.float32)
    for i in range(0, blocks_per_program):
        v = (pid * blocks_per_program + i) * BLOCK_V + tl.arange(0, BLOCK_V)
        v_mask = v < V
        mask = v_mask[:, None] & c_mask[None, :]
        offs = voxel_channel_offsets(v, c, C, S, CHANNELS_LAST)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        go = tl.load(go_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + v, mask=v_mask, other=0.0)
        rstd = tl.load(rstd_ptr + v, mask=v_mask, other=0.0)
        xhat = tl.where(mask, (y - mean[:, None]) * rstd[:, None], 0.0)
        normed = xhat * lnw[None, :] + lnb[None, :]
        pre = normed[:, None, :] * w1[None, :, :] + b1[None, :, :]  # [BLOCK_V, 4, BLOCK_C]
        hidden = _gelu(pre)
        if HAS_GAMMA:
            z = tl.reduce(hidden * w2[None, :, :], 1, _sum_combine) + b2[None, :]
            acc_gamma += tl.reduce(tl.where(mask, go * z, 0.0), 0, _sum_combine)
            gz = go * gamma[None, :]
        else:
            gz = go
        acc_b2 += tl.reduce(gz, 0, _sum_combine)
        acc_w2 += tl.reduce(gz[:, None, :] * hidden, 0, _sum_combine)
        g_pre = gz[:, None, :] * w2[None, :, :] * _gelu_grad(pre)
        acc_b1 += tl.reduce(g_pre, 0, _sum_combine)
        acc_w1 += tl.reduce(g_pre * normed[:, None, :], 0, _sum_combine)
        g_normed = tl.reduce(g_pre * w1[None, :, :], 1, _sum_combine)  # [BLOCK_V, BLOCK_C]
        acc_lnw += tl.reduce(g_normed * xhat, 0, _sum_combine)
        acc_lnb += tl.reduce(g_normed, 0, _sum_combine)
        g = g_normed * lnw[None, :]
        g_mean = tl.reduce(g, 1, _sum_combine) / C
        gx_mean = tl.reduce(g * xhat, 1, _sum_combine) / C
        gy = rstd[:, None] * (g - g_mean[:, None] - xhat * gx_mean[:, None])
        tl.store(gy_ptr + offs, gy.to(gy_ptr.dtype.element_ty), mask=mask)

    base = partial_ptr + pid * 16 * C + c
    j = tl.arange(0, 4)
    rows4 = base[None, :] + j[:, None] * C
    m4 = c_mask[None, :]
    tl.store(base, acc_lnw, mask=c_mask)
    tl.store(base + C, acc_lnb, mask=c_mask)
    tl.store(rows4 + 2 * C, acc_w1, mask=m4)
    tl.store(rows4 + 6 * C, acc_b1, mask=m4)
    tl.store(rows4 + 10 * C, acc_w2, mask=m4)
    tl.store(base + 14 * C, acc_b2, mask=c_mask)
    tl.store(base + 15 * C, acc_gamma, mask=c_mask)


# ---- host code and operators ------------------------------------------------------------------------------------


@triton_op("uxnet::ux_mlp_triton", mutates_args=())
def ux_mlp_triton(
    y: torch.Tensor, residual: Optional[torch.Tensor], ln_weight: torch.Tensor, ln_bias: torch.Tensor,
    w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, gamma: Optional[torch.Tensor],
    eps: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, channels_last = canonical(y)
    n, c, d, h, w = y.shape
    voxels, spatial = n * d * h * w, d * h * w
    res = in_layout(residual, channels_last) if residual is not None else y
    params = [as_float32(p) for p in (ln_weight, ln_bias, w1.reshape(c, 4), b1.reshape(c, 4), w2.reshape(c, 4), b2)]
    gamma32 = as_float32(gamma) if gamma is not None else params[0]
    out = empty_like_layout(y, channels_last)
    mean, rstd = voxel_stats(y)
    block_v, block_c, warps = voxel_blocks(c, 4)
    launch = launcher(ux_mlp_fwd_kernel, y)
    if launch is not None:
        launch[(triton.cdiv(voxels, block_v),)](
            y, res, *params, gamma32, out, mean, rstd, voxels, c, spatial, eps,
            HAS_RESIDUAL=residual is not None, HAS_GAMMA=gamma is not None, CHANNELS_LAST=channels_last,
            BLOCK_V=block_v, BLOCK_C=block_c, num_warps=warps,
        )
    return out, mean, rstd


@triton_op("uxnet::ux_mlp_triton_backward", mutates_args=())
def ux_mlp_triton_backward(
    grad_out: torch.Tensor, y: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
    w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, gamma: Optional[torch.Tensor],
    mean: torch.Tensor, rstd: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    grad_out, channels_last = canonical(grad_out)
    y = in_layout(y, channels_last)
    n, c, d, h, w = y.shape
    voxels, spatial = n * d * h * w, d * h * w
    params = [as_float32(p) for p in (ln_weight, ln_bias, w1.reshape(c, 4), b1.reshape(c, 4), w2.reshape(c, 4), b2)]
    gamma32 = as_float32(gamma) if gamma is not None else params[0]
    block_v, block_c, warps = voxel_blocks(c, 8)
    programs, per_program = backward_programs(voxels, block_v)
    grad_y = empty_like_layout(grad_out, channels_last)
    partial = poisoned(y.new_empty((programs, PARTIAL_ROWS, c), dtype=torch.float32))
    launch = launcher(ux_mlp_bwd_kernel, y, grad_out)
    if launch is not None:
        launch[(programs,)](
            grad_out, y, *params, gamma32, mean.contiguous(), rstd.contiguous(), grad_y, partial,
            voxels, c, spatial, per_program,
            HAS_GAMMA=gamma is not None, CHANNELS_LAST=channels_last,
            BLOCK_V=block_v, BLOCK_C=block_c, num_warps=warps,
        )
    sums = partial.sum(0)  # (16, C)

    def as_param(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return rows.to(like.dtype).reshape(like.shape).clone(memory_format=torch.contiguous_format)

    grad_gamma = as_param(sums[15], gamma) if gamma is not None else empty_grad(y)
    return (
        grad_y,
        as_param(sums[0], ln_weight),
        as_param(sums[1], ln_bias),
        as_param(sums[2:6].t(), w1),
        as_param(sums[6:10].t(), b1),
        as_param(sums[10:14].t(), w2),
        as_param(sums[14], b2),
        grad_gamma,
    )




