"""Triton kernels of the instance-norm ops: ``lrelu(instance_norm(z) + r_hat)`` with statistics per (n, c) over the
D * H * W voxels of a plane, no affine, and r_hat = 0 (RESIDUAL=0), a residual r (1), or a normalised shortcut
``(r - r_mean) * r_rstd`` (2).

Planes are large (96^3 voxels at UX-Net's full resolution) and few (N * C can be 96), so no program holds a plane:
every reduction is split over "chunks" of a plane and finished by torch ops on the (small) partials (host code below):

    stats       program (n, chunk, channel block) -> partial[0|1, n, c, chunk] = mean, M2 of the chunk
    (host)    Chan's formula over the chunks, in float64 -> mean, rstd (N, C) float32
    forward     program (n, tile, channel block): out = lrelu((z - mean) * rstd + r_hat)
    bwd sums    program (n, chunk, channel block) -> partial[0|1|2, n, c, chunk] = sums of gs, gs * xhat, gs * r_hat
    (host)    a, b[, b_r] = the means over the plane, float64 sums -> coefficients (2 or 3, N, C) float32
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

from typing import List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op
from triton.language.standard import _sum_combine

from .launch import (
    EMPTY_GRAD_SHAPE,
    INTERPRETED,
    as_float32,
    canonical,
    empty_grad,
    empty_like_layout,
    in_layout,
    is_channels_last,
    launcher,
    poisoned,
    pow2,
)

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


# ---- host code and operators ------------------------------------------------------------------------------------

# Elements per tile (GPU, interpreter), the most tiles per reduction chunk, and the number of reduction programs to aim
# for (chunks get longer, up to the maximum, while there are at least that many).
_INSTANCE_TILE = 1024
_INTERPRETER_INSTANCE_TILE = 512
_INSTANCE_MAX_TILES = 16
_INSTANCE_REDUCE_PROGRAMS = 4096


class _InstanceGrid(NamedTuple):
    """How the instance-norm kernels cover an (N, C, D, H, W) tensor: tiles of block_v voxels x block_c channels,
    `tiles` per batch item; reductions run over chunks of `tiles_per_chunk` tiles, `chunks` per batch item."""

    n: int
    c: int
    voxels: int
    block_v: int
    block_c: int
    c_blocks: int
    tiles: int
    tiles_per_chunk: int
    chunks: int
    warps: int


def _instance_grid(shape, channels_last: bool) -> _InstanceGrid:
    n, c, d, h, w = shape
    voxels = d * h * w
    elements = _INTERPRETER_INSTANCE_TILE if INTERPRETED else _INSTANCE_TILE
    # NCDHW: one channel per tile (a plane's voxels are contiguous); channels_last_3d: up to 64 channels per voxel.
    block_c = min(pow2(c), 64) if channels_last else 1
    block_v = min(max(elements // block_c, 1), pow2(voxels))
    c_blocks = triton.cdiv(c, block_c)
    tiles = triton.cdiv(voxels, block_v)
    per_chunk = 1
    while (per_chunk * 2 <= min(_INSTANCE_MAX_TILES, tiles)
           and n * c_blocks * triton.cdiv(tiles, per_chunk * 2) >= _INSTANCE_REDUCE_PROGRAMS):
        per_chunk *= 2
    warps = 4 if block_v * block_c <= 1024 else 8
    return _InstanceGrid(n, c, voxels, block_v, block_c, c_blocks, tiles, per_chunk,
                         triton.cdiv(tiles, per_chunk), warps)


def _instance_stats(x: torch.Tensor, channels_last: bool, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, rstd), (N, C) float32, of x (canonical layout, numel > 0): per-chunk (mean, M2) from the kernel,
    merged over the chunks with Chan's formula in float64."""
    g = _instance_grid(x.shape, channels_last)
    partial = poisoned(x.new_empty((STATS_ROWS, g.n, g.c, g.chunks), dtype=torch.float32))
    launch = launcher(instance_norm_stats_kernel, x)
    if launch is not None:
        launch[(g.n * g.chunks, g.c_blocks)](
            x, partial, g.n * g.c, g.c, g.voxels, g.chunks,
            TILES=g.tiles_per_chunk, CHANNELS_LAST=channels_last, BLOCK_V=g.block_v, BLOCK_C=g.block_c,
            num_warps=g.warps,
        )
    chunk_voxels = g.tiles_per_chunk * g.block_v
    starts = torch.arange(g.chunks, device=x.device, dtype=torch.float64) * chunk_voxels
    counts = (g.voxels - starts).clamp(max=chunk_voxels)
    chunk_mean, chunk_m2 = partial.double().unbind(0)
    mean = (chunk_mean * counts).sum(-1) / g.voxels
    m2 = chunk_m2.sum(-1) + ((chunk_mean - mean[..., None]).square() * counts).sum(-1)
    rstd = (m2 / g.voxels + eps).rsqrt()
    return mean.float(), rstd.float()


def _nan_stats(x: torch.Tensor) -> torch.Tensor:
    """Statistics over zero voxels (an empty input): undefined, NaN (as the compiled ops)."""
    return x.new_full(x.shape[:2], float("nan"), dtype=torch.float32)


def _shortcut_product(a: torch.Tensor, b: torch.Tensor, like: torch.Tensor, channels: int,
                      channels_last: bool) -> torch.Tensor:
    """a @ b as a 5-D tensor shaped like ``like`` with ``channels`` channels: (N, V, C_in) @ (C_in, C') for
    channels_last_3d, (C', C_in) @ (N, C_in, V) otherwise."""
    n, _, d, h, w = like.shape
    if channels_last:
        return torch.matmul(a, b).view(n, d, h, w, channels).permute(0, 4, 1, 2, 3)
    return torch.matmul(a, b).view(n, channels, d, h, w)


def _shortcut_projection(like: torch.Tensor, inputs: List[torch.Tensor], weights: List[torch.Tensor],
                         channels_last: bool) -> torch.Tensor:
    """sum_i conv3d(x_i, w_i) of the 1x1x1 shortcut weights, as matrix products on (N, C, V) views (no convolution
    workspace), in the given layout."""
    projected = None
    for x, w in zip(inputs, weights):
        x, w = x.flatten(2), w.flatten(1)  # (N, C_i, V), (C, C_i)
        term = (_shortcut_product(x.transpose(1, 2), w.t(), like, like.shape[1], True) if channels_last
                else _shortcut_product(w, x, like, like.shape[1], False))
        projected = in_layout(term, channels_last) if projected is None else projected.add_(term)
    return projected


def _shortcut_backward(grad_proj: torch.Tensor, x_in: torch.Tensor, w_in: torch.Tensor):
    """(grad of x_in, grad of w_in) of one shortcut convolution from the projection's gradient."""
    g, x, w = grad_proj.flatten(2), x_in.flatten(2), w_in.flatten(1)
    channels_last = is_channels_last(x_in)
    grad_x = (_shortcut_product(g.transpose(1, 2), w, x_in, x_in.shape[1], True) if channels_last
              else _shortcut_product(w.t(), g, x_in, x_in.shape[1], False))
    grad_w = torch.matmul(g, x.transpose(1, 2)).sum(0).view(w_in.shape)
    return in_layout(grad_x, channels_last), grad_w


def _instance_forward(z: torch.Tensor, channels_last: bool, r: Optional[torch.Tensor], mode: int,
                      r_stats: Optional[Tuple[torch.Tensor, torch.Tensor]], negative_slope: float, eps: float):
    """(out, mean, rstd) of out = lrelu(IN(z) + r_hat); z and r in the canonical layout, numel > 0."""
    g = _instance_grid(z.shape, channels_last)
    mean, rstd = _instance_stats(z, channels_last, eps)
    r_mean, r_rstd = r_stats if r_stats is not None else (mean, rstd)  # placeholders unless normalized
    out = empty_like_layout(z, channels_last)
    launch = launcher(instance_norm_lrelu_fwd_kernel, z)
    if launch is not None:
        launch[(g.n * g.tiles, g.c_blocks)](
            z, r if r is not None else z, mean, rstd, r_mean, r_rstd, out, g.c, g.voxels, g.tiles, negative_slope,
            RESIDUAL=mode, CHANNELS_LAST=channels_last, BLOCK_V=g.block_v, BLOCK_C=g.block_c, num_warps=g.warps,
        )
    return out, mean, rstd


def _instance_backward(grad_out: torch.Tensor, out: torch.Tensor, channels_last: bool, r: Optional[torch.Tensor],
                       mode: int, rstd: torch.Tensor, r_stats: Optional[Tuple[torch.Tensor, torch.Tensor]],
                       negative_slope: float) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(grad_z, grad_r or None); grad_out, out and r in the canonical layout, numel > 0. A normalized residual (the
    shortcut projection, a temporary of the caller) is overwritten by its gradient: the apply kernel reads each
    element before writing its gradient at the same place, and the backward peak is one full-size buffer lower."""
    g = _instance_grid(grad_out.shape, channels_last)
    rows = BACKWARD_ROWS if mode == RESIDUAL_NORMALIZED else BACKWARD_ROWS - 1
    rstd = as_float32(rstd)
    r_mean, r_rstd = (as_float32(t) for t in r_stats) if r_stats is not None else (rstd, rstd)
    r_arg = r if r is not None else out
    partial = poisoned(out.new_empty((rows, g.n, g.c, g.chunks), dtype=torch.float32))
    launch = launcher(instance_norm_lrelu_bwd_sums_kernel, grad_out, out)
    if launch is not None:
        launch[(g.n * g.chunks, g.c_blocks)](
            grad_out, out, r_arg, r_mean, r_rstd, partial, g.n * g.c, g.c, g.voxels, g.chunks, negative_slope,
            RESIDUAL=mode, TILES=g.tiles_per_chunk, CHANNELS_LAST=channels_last, BLOCK_V=g.block_v,
            BLOCK_C=g.block_c, num_warps=g.warps,
        )
    coefficients = (partial.double().sum(-1) / g.voxels).float()  # (rows, N, C): a, b[, b_r]
    grad_z = empty_like_layout(grad_out, channels_last)
    if mode == RESIDUAL_NORMALIZED:
        grad_r = r
    elif mode == RESIDUAL_PLAIN:
        grad_r = empty_like_layout(grad_out, channels_last)
    else:
        grad_r = None
    launch = launcher(instance_norm_lrelu_bwd_apply_kernel, grad_out, out)
    if launch is not None:
        launch[(g.n * g.tiles, g.c_blocks)](
            grad_out, out, r_arg, rstd, r_mean, r_rstd, coefficients, grad_z,
            grad_r if grad_r is not None else grad_z, g.n * g.c, g.c, g.voxels, g.tiles, negative_slope,
            RESIDUAL=mode, CHANNELS_LAST=channels_last, BLOCK_V=g.block_v, BLOCK_C=g.block_c, num_warps=g.warps,
        )
    return grad_z, grad_r


@triton_op("uxnet::instance_norm_lrelu_triton", mutates_args=())
def instance_norm_lrelu_triton(
    x: torch.Tensor, negative_slope: float, eps: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, channels_last = canonical(x)
    if x.numel() == 0:
        return empty_like_layout(x, channels_last), _nan_stats(x), _nan_stats(x)
    return _instance_forward(x, channels_last, None, RESIDUAL_NONE, None, negative_slope, eps)


@triton_op("uxnet::instance_norm_lrelu_triton_backward", mutates_args=())
def instance_norm_lrelu_triton_backward(
    grad_out: torch.Tensor, out: torch.Tensor, rstd: torch.Tensor, negative_slope: float
) -> torch.Tensor:
    grad_out, channels_last = canonical(grad_out)
    out = in_layout(out, channels_last)
    if out.numel() == 0:
        return empty_like_layout(grad_out, channels_last)
    return _instance_backward(grad_out, out, channels_last, None, RESIDUAL_NONE, rstd, None,
                              negative_slope)[0]




@triton_op("uxnet::instance_norm_add_lrelu_triton", mutates_args=())
def instance_norm_add_lrelu_triton(
    z: torch.Tensor, residual: Optional[torch.Tensor], shortcut_inputs: List[torch.Tensor],
    shortcut_weights: List[torch.Tensor], negative_slope: float, eps: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    z, channels_last = canonical(z)
    if residual is not None:
        r, mode = in_layout(residual, channels_last), RESIDUAL_PLAIN
        no_stats = z.new_empty(EMPTY_GRAD_SHAPE, dtype=torch.float32)
        r_stats = (no_stats, no_stats.clone())
    elif z.numel() == 0:
        r, mode, r_stats = None, RESIDUAL_NORMALIZED, (_nan_stats(z), _nan_stats(z))
    else:
        r = _shortcut_projection(z, shortcut_inputs, shortcut_weights, channels_last)
        mode = RESIDUAL_NORMALIZED
        r_stats = _instance_stats(r, channels_last, eps)
    if z.numel() == 0:
        return empty_like_layout(z, channels_last), _nan_stats(z), _nan_stats(z), *r_stats
    out, mean, rstd = _instance_forward(z, channels_last, r, mode,
                                        r_stats if mode == RESIDUAL_NORMALIZED else None,
                                        negative_slope, eps)
    return out, mean, rstd, *r_stats


@triton_op("uxnet::instance_norm_add_lrelu_triton_backward", mutates_args=())
def instance_norm_add_lrelu_triton_backward(
    grad_out: torch.Tensor, out: torch.Tensor, residual: Optional[torch.Tensor], shortcut_inputs: List[torch.Tensor],
    shortcut_weights: List[torch.Tensor], rstd: torch.Tensor, shortcut_mean: torch.Tensor,
    shortcut_rstd: torch.Tensor, negative_slope: float,
) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    grad_out, channels_last = canonical(grad_out)
    out = in_layout(out, channels_last)
    if residual is not None:
        r, mode, r_stats = in_layout(residual, channels_last), RESIDUAL_PLAIN, None
    else:
        r = _shortcut_projection(out, shortcut_inputs, shortcut_weights, channels_last) if out.numel() > 0 else None
        mode, r_stats = RESIDUAL_NORMALIZED, (shortcut_mean, shortcut_rstd)
    if out.numel() == 0:
        grad_z = empty_like_layout(grad_out, channels_last)
        grad_r = torch.zeros_like(grad_out, memory_format=torch.channels_last_3d if channels_last
                                  else torch.contiguous_format)
    else:
        grad_z, grad_r = _instance_backward(grad_out, out, channels_last, r, mode, rstd, r_stats, negative_slope)
    if residual is not None:
        return grad_z, grad_r, [], []
    grad_inputs, grad_weights = [], []
    for x, w in zip(shortcut_inputs, shortcut_weights):
        grad_x, grad_w = _shortcut_backward(grad_r, x, w)
        grad_inputs.append(grad_x)
        grad_weights.append(grad_w)
    return grad_z, empty_grad(out), grad_inputs, grad_weights


