"""Triton kernels of the instance-norm ops: ``lrelu(instance_norm(z) + r_hat)`` with statistics per (n, c) over the
D * H * W voxels of a plane, no affine, and r_hat = 0 (RESIDUAL=0), a residual r (1), or a normalised shortcut
``(r - r_mean) * r_rstd`` (2).

Planes are large (96^3 voxels at UX-Net's full resolution) and few (N * C can be 96), so no program holds a plane:
every reduction is split over "chunks" of a plane and finished by torch ops on the (small) partials in ops.py:

    stats       program (n, chunk, channel block) -> partial[0|1, n, c, chunk] = mean, M2 of the chunk
    (ops.py)    Chan's formula over the chunks, in float64 -> mean, rstd (N, C) float32
    forward     program (n, tile, channel block): out = lrelu((z - mean) * rstd + r_hat)
    bwd sums    program (n, chunk, channel block) -> partial[0|1|2, n, c, chunk] = sums of gs, gs * xhat, gs * r_hat
    (ops.py)    a, b[, b_r] = the means over the plane, float64 sums -> coefficients (2 or 3, N, C) float32
    bwd apply   program (n, tile, channel block): grad_z = rstd * (gs - a - xhat * b),
                grad_r = gs (RESIDUAL=1) or r_rstd * (gs - a - r_hat * b_r) (RESIDUAL=2)

with gs = grad_out * lrelu'(out) and xhat = lrelu^-1(out) - r_hat (the LeakyReLU is inverted, slope > 0).

A tile is BLOCK_V voxels x BLOCK_C channels of one batch item; a chunk is TILES consecutive tiles. TILES is a
compile-time constant (1 ... 16): the loop over a chunk's tiles has constant bounds, so it needs no run-time loop
bound (which triton 3.6's interpreter cannot iterate). Inside a chunk the statistics merge per tile with Chan's
formula (each tile's M2 is taken about the tile's own mean, in registers), so no sum of squares about zero ever
cancels. Inputs are contiguous NCDHW (BLOCK_C = 1 is the natural choice: voxels are contiguous) or
channels_last_3d (CHANNELS_LAST; channels contiguous). Offsets are int64; math is float32 for every storage dtype.
"""

import triton
import triton.language as tl
from triton.language.standard import _sum_combine

from . import is_interpreted

RESIDUAL_NONE = 0
RESIDUAL_PLAIN = 1
RESIDUAL_NORMALIZED = 2
STATS_ROWS = 2  # partial rows of the stats kernel: chunk mean, chunk M2
BACKWARD_ROWS = 3  # partial rows of the backward sums: sum gs, sum gs * xhat, sum gs * r_hat


@triton.jit
def _program(pid_c, C, BLOCK_C: tl.constexpr):
    """Channels c [BLOCK_C] (int64) of channel block pid_c and their mask."""
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    return c, c < C


@triton.jit
def _tile(n, tile, c, c_mask, C, S, CHANNELS_LAST: tl.constexpr, BLOCK_V: tl.constexpr):
    """Element offsets [BLOCK_V, BLOCK_C] (int64) of voxel tile `tile` of batch item n, channels c; the mask."""
    v = tile * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = (v < S)[:, None] & c_mask[None, :]
    if CHANNELS_LAST:
        offs = n * S * C + (v * C)[:, None] + c[None, :]
    else:
        offs = n * C * S + (c * S)[None, :] + v[:, None]
    return offs, mask


@triton.jit
def _residual_hat(r_ptr, r_mean_ptr, r_rstd_ptr, offs, mask, plane, c_mask, RESIDUAL: tl.constexpr):
    """r_hat [BLOCK_V, BLOCK_C] (0 where masked) and r_rstd [BLOCK_C] (1 unless RESIDUAL_NORMALIZED)."""
    if RESIDUAL == 0:
        r_hat = tl.full(offs.shape, 0.0, tl.float32)
        r_rstd = tl.full(plane.shape, 1.0, tl.float32)
    else:
        r_hat = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if RESIDUAL == 2:
            r_mean = tl.load(r_mean_ptr + plane, mask=c_mask, other=0.0)
            r_rstd = tl.load(r_rstd_ptr + plane, mask=c_mask, other=0.0)
            r_hat = tl.where(mask, (r_hat - r_mean[None, :]) * r_rstd[None, :], 0.0)
        else:
            r_rstd = tl.full(plane.shape, 1.0, tl.float32)
    return r_hat, r_rstd


@triton.jit
def _invert_lrelu(go_ptr, out_ptr, offs, mask, slope):
    """(gs, s): grad_out through the LeakyReLU, and its input recovered from its output (slope > 0)."""
    g = tl.load(go_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    positive = o > 0.0
    return tl.where(positive, g, g * slope), tl.where(positive, o, o / slope)


@triton.jit
def instance_norm_stats_kernel(
    x_ptr,  # (N, C, D, H, W), contiguous or channels_last_3d
    partial_ptr,  # (2, N, C, chunks) float32: mean and M2 (sum of squared deviations) of each chunk
    NC, C, S, chunks,
    TILES: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program (n * chunks + chunk, channel block): mean and M2 of voxels [chunk * TILES * BLOCK_V, + TILES *
    BLOCK_V) of each channel, tile by tile with Chan's merge. An empty tail tile merges with weight 0."""
    pid = tl.program_id(0).to(tl.int64)
    n = pid // chunks
    chunk = pid % chunks
    c, c_mask = _program(tl.program_id(1), C, BLOCK_C)
    first = chunk * TILES * BLOCK_V
    mean = tl.full((BLOCK_C,), 0.0, tl.float32)
    m2 = tl.full((BLOCK_C,), 0.0, tl.float32)
    for i in range(TILES):  # constant bounds: TILES is a constexpr
        offs, mask = _tile(n, chunk * TILES + i, c, c_mask, C, S, CHANNELS_LAST, BLOCK_V)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        before = tl.minimum(S - first, i * BLOCK_V).to(tl.float32)  # voxels of the chunk already merged
        count = tl.minimum(tl.maximum(S - first - i * BLOCK_V, 0), BLOCK_V).to(tl.float32)
        tile_mean = tl.reduce(x, 0, _sum_combine) / tl.maximum(count, 1.0)
        dev = tl.where(mask, x - tile_mean[None, :], 0.0)
        tile_m2 = tl.reduce(dev * dev, 0, _sum_combine)
        weight = count / tl.maximum(before + count, 1.0)
        delta = tile_mean - mean
        mean += delta * weight
        m2 += tile_m2 + delta * delta * before * weight
    dst = partial_ptr + (n * C + c) * chunks + chunk
    tl.store(dst, mean, mask=c_mask)
    tl.store(dst + NC * chunks, m2, mask=c_mask)


@triton.jit
def instance_norm_lrelu_fwd_kernel(
    z_ptr,  # (N, C, D, H, W), contiguous or channels_last_3d
    r_ptr,  # like z (RESIDUAL 1: the residual; 2: the shortcut projection); unused for RESIDUAL 0
    mean_ptr, rstd_ptr,  # (N, C) float32, of z
    r_mean_ptr, r_rstd_ptr,  # (N, C) float32, of r; used for RESIDUAL 2 only
    out_ptr,  # like z
    C, S, tiles, slope,
    RESIDUAL: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program (n * tiles + tile, channel block): out = lrelu((z - mean) * rstd + r_hat)."""
    pid = tl.program_id(0).to(tl.int64)
    n = pid // tiles
    c, c_mask = _program(tl.program_id(1), C, BLOCK_C)
    plane = n * C + c
    offs, mask = _tile(n, pid % tiles, c, c_mask, C, S, CHANNELS_LAST, BLOCK_V)
    mean = tl.load(mean_ptr + plane, mask=c_mask, other=0.0)
    rstd = tl.load(rstd_ptr + plane, mask=c_mask, other=0.0)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r_hat, _ = _residual_hat(r_ptr, r_mean_ptr, r_rstd_ptr, offs, mask, plane, c_mask, RESIDUAL)
    s = (z - mean[None, :]) * rstd[None, :] + r_hat
    out = tl.where(s > 0.0, s, s * slope)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def instance_norm_lrelu_bwd_sums_kernel(
    go_ptr,  # (N, C, D, H, W), contiguous or channels_last_3d
    out_ptr,  # like grad_out: the forward output
    r_ptr,  # like grad_out; unused for RESIDUAL 0
    r_mean_ptr, r_rstd_ptr,  # (N, C) float32; used for RESIDUAL 2 only
    partial_ptr,  # (3, N, C, chunks) float32: sums of gs, gs * xhat, gs * r_hat over each chunk
    NC, C, S, chunks, slope,
    RESIDUAL: tl.constexpr,
    TILES: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program (n * chunks + chunk, channel block): the chunk's sums of the backward (row 2 only for RESIDUAL 2)."""
    pid = tl.program_id(0).to(tl.int64)
    n = pid // chunks
    chunk = pid % chunks
    c, c_mask = _program(tl.program_id(1), C, BLOCK_C)
    plane = n * C + c
    acc_gs = tl.full((BLOCK_C,), 0.0, tl.float32)
    acc_gx = tl.full((BLOCK_C,), 0.0, tl.float32)
    acc_gr = tl.full((BLOCK_C,), 0.0, tl.float32)
    for i in range(TILES):  # constant bounds: TILES is a constexpr
        offs, mask = _tile(n, chunk * TILES + i, c, c_mask, C, S, CHANNELS_LAST, BLOCK_V)
        gs, s = _invert_lrelu(go_ptr, out_ptr, offs, mask, slope)
        r_hat, _ = _residual_hat(r_ptr, r_mean_ptr, r_rstd_ptr, offs, mask, plane, c_mask, RESIDUAL)
        acc_gs += tl.reduce(gs, 0, _sum_combine)
        acc_gx += tl.reduce(gs * (s - r_hat), 0, _sum_combine)
        if RESIDUAL == 2:
            acc_gr += tl.reduce(gs * r_hat, 0, _sum_combine)
    dst = partial_ptr + plane * chunks + chunk
    tl.store(dst, acc_gs, mask=c_mask)
    tl.store(dst + NC * chunks, acc_gx, mask=c_mask)
    if RESIDUAL == 2:
        tl.store(dst + 2 * NC * chunks, acc_gr, mask=c_mask)


@triton.jit
def instance_norm_lrelu_bwd_apply_kernel(
    go_ptr,  # (N, C, D, H, W), contiguous or channels_last_3d
    out_ptr,  # like grad_out: the forward output
    r_ptr,  # like grad_out; unused for RESIDUAL 0
    rstd_ptr,  # (N, C) float32, of z
    r_mean_ptr, r_rstd_ptr,  # (N, C) float32; used for RESIDUAL 2 only
    coef_ptr,  # (3, N, C) float32: a = mean(gs), b = mean(gs * xhat), b_r = mean(gs * r_hat) over each plane
    gz_ptr,  # like grad_out
    gr_ptr,  # like grad_out; unused for RESIDUAL 0
    NC, C, S, tiles, slope,
    RESIDUAL: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program (n * tiles + tile, channel block): grad_z and, with a residual, grad_r."""
    pid = tl.program_id(0).to(tl.int64)
    n = pid // tiles
    c, c_mask = _program(tl.program_id(1), C, BLOCK_C)
    plane = n * C + c
    offs, mask = _tile(n, pid % tiles, c, c_mask, C, S, CHANNELS_LAST, BLOCK_V)
    gs, s = _invert_lrelu(go_ptr, out_ptr, offs, mask, slope)
    r_hat, r_rstd = _residual_hat(r_ptr, r_mean_ptr, r_rstd_ptr, offs, mask, plane, c_mask, RESIDUAL)
    rstd = tl.load(rstd_ptr + plane, mask=c_mask, other=0.0)
    a = tl.load(coef_ptr + plane, mask=c_mask, other=0.0)
    b = tl.load(coef_ptr + NC + plane, mask=c_mask, other=0.0)
    gz = rstd[None, :] * (gs - a[None, :] - (s - r_hat) * b[None, :])
    tl.store(gz_ptr + offs, gz.to(gz_ptr.dtype.element_ty), mask=mask)
    if RESIDUAL == 1:
        tl.store(gr_ptr + offs, gs.to(gr_ptr.dtype.element_ty), mask=mask)
    if RESIDUAL == 2:
        b_r = tl.load(coef_ptr + 2 * NC + plane, mask=c_mask, other=0.0)
        gr = r_rstd[None, :] * (gs - a[None, :] - r_hat * b_r[None, :])
        tl.store(gr_ptr + offs, gr.to(gr_ptr.dtype.element_ty), mask=mask)


INTERPRETED = is_interpreted(instance_norm_stats_kernel)
