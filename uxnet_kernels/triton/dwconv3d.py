"""Triton kernels of the depthwise 3D convolution (stride 1, zero "same" padding, odd kernel sizes).

Forward: one program per (BLOCK_D x BLOCK_H x BLOCK_W output tile of one sample, BLOCK_C channels); it loops
over the kernel's depth and height taps at run time and takes the width taps KW_CHUNK at a time as one
[tile, KW_CHUNK, BLOCK_C] load (KW is the only kernel size that is a compile-time constant, so k = 3 ... 21 needs
one specialisation per KW, not per kernel volume). Grad-input is this forward with the spatially flipped kernel
(see ops.py). Grad-weight: one program per (chunk of output tiles, channel block, (kd, kh)) writes the partial
sums of its KW taps; ops.py reduces the chunks in a second, deterministic pass — no atomics.

Tensors are addressed through their strides: channels_last_3d (channels contiguous, the fast layout) and
contiguous NCDHW (width contiguous) are both exact; the CHANNELS_LAST flag only tells the compiler which
stride is 1. Program ids and every stride product are int64.
"""

import triton
import triton.language as tl
from triton.language.standard import _sum_combine

from . import fix_interpreter_scalar_index, is_interpreted


@triton.jit
def _tile_coords(tile, D, H, W, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """(n, od, oh, ow) of the flat tile index `tile`; od/oh/ow are [BLOCK_D * BLOCK_H * BLOCK_W] int64."""
    tiles_w = (W + BLOCK_W - 1) // BLOCK_W  # not tl.cdiv: jit helpers are slow under the interpreter
    tiles_h = (H + BLOCK_H - 1) // BLOCK_H
    tiles_d = (D + BLOCK_D - 1) // BLOCK_D
    tw = tile % tiles_w
    rest = tile // tiles_w
    th = rest % tiles_h
    rest = rest // tiles_h
    td = rest % tiles_d
    n = rest // tiles_d
    s = tl.arange(0, BLOCK_D * BLOCK_H * BLOCK_W)
    od = td * BLOCK_D + s // (BLOCK_H * BLOCK_W)
    oh = th * BLOCK_H + (s // BLOCK_W) % BLOCK_H
    ow = tw * BLOCK_W + s % BLOCK_W
    return n, od, oh, ow


@triton.jit
def dwconv3d_fwd_kernel(
    x_ptr,  # (N, C, D, H, W) strided by sx_*
    w_ptr,  # (C, KD * KH * KW) float32, contiguous
    b_ptr,  # (C,) float32; unused unless HAS_BIAS
    out_ptr,  # (N, C, D, H, W) strided by so_*
    C, D, H, W, KD, KH,
    sx_n, sx_c, sx_d, sx_h, sx_w,
    so_n, so_c, so_d, so_h, so_w,
    KW: tl.constexpr,
    KW_CHUNK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program (output tile, channel block). Width taps go KW_CHUNK at a time as [tile, KW_CHUNK, BLOCK_C]
    loads; depth and height taps are run-time loops."""
    if CHANNELS_LAST:
        sx_c = 1
        so_c = 1
    else:
        sx_w = 1
        so_w = 1
    tile = tl.program_id(0).to(tl.int64)
    n, od, oh, ow = _tile_coords(tile, D, H, W, BLOCK_D, BLOCK_H, BLOCK_W)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    c64 = c.to(tl.int64)
    pad_d = KD // 2
    pad_h = KH // 2
    PAD_W: tl.constexpr = KW // 2
    out_ok = (od < D) & (oh < H) & (ow < W)

    id0 = od - pad_d
    ih0 = oh - pad_h
    acc = tl.full((BLOCK_D * BLOCK_H * BLOCK_W, BLOCK_C), 0.0, tl.float32)
    for k0 in range(0, KW, KW_CHUNK):
        kw = (k0 + tl.arange(0, KW_CHUNK)).to(tl.int64)
        iw = ow[:, None] + (kw[None, :] - PAD_W)  # [S, KW_CHUNK]
        w_ok = out_ok[:, None] & (kw[None, :] < KW) & (iw >= 0) & (iw < W)
        x_w = x_ptr + n * sx_n + (iw * sx_w)[:, :, None] + (c64 * sx_c)[None, None, :]
        ok_wc = w_ok[:, :, None] & c_mask[None, None, :]
        w_kc = w_ptr + (c64 * (KD * KH * KW))[None, :] + kw[:, None]  # [KW_CHUNK, BLOCK_C]
        w_kc_ok = (kw[:, None] < KW) & c_mask[None, :]
        acc_w = tl.full((BLOCK_D * BLOCK_H * BLOCK_W, KW_CHUNK, BLOCK_C), 0.0, tl.float32)
        for kd in range(0, KD):
            id_ = id0 + kd
            x_d = x_w + (id_ * sx_d)[:, None, None]
            ok_d = ok_wc & ((id_ >= 0) & (id_ < D))[:, None, None]
            w_d = w_kc + kd * (KH * KW)
            for kh in range(0, KH):
                ih = ih0 + kh
                ok = ok_d & ((ih >= 0) & (ih < H))[:, None, None]
                xv = tl.load(x_d + (ih * sx_h)[:, None, None], mask=ok, other=0.0)
                wv = tl.load(w_d + kh * KW, mask=w_kc_ok, other=0.0)
                acc_w += xv.to(tl.float32) * wv[None, :, :]
        acc += tl.reduce(acc_w, 1, _sum_combine)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=c_mask, other=0.0)[None, :]

    out_off = n * so_n + od * so_d + oh * so_h + ow * so_w
    out_ptrs = out_ptr + out_off[:, None] + c64[None, :] * so_c
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_ok[:, None] & c_mask[None, :])


@triton.jit
def dwconv3d_grad_weight_kernel(
    go_ptr,  # (N, C, D, H, W) strided by sg_*
    x_ptr,  # (N, C, D, H, W) strided by sx_* (same layout as grad_out)
    partial_ptr,  # (num_chunks, C, KD, KH, KW) float32, contiguous
    C, D, H, W, KD, KH,
    sg_n, sg_c, sg_d, sg_h, sg_w,
    sx_n, sx_c, sx_d, sx_h, sx_w,
    num_tiles, tiles_per_chunk,
    KW: tl.constexpr,
    BLOCK_KW: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program (chunk, channel block, kd * KH + kh): partial[chunk, c, kd, kh, :] = sum over the chunk's output
    tiles of grad_out[n, c, o] * x[n, c, o + (kd, kh, kw) - pad], all width taps at once ([tile, BLOCK_KW, BLOCK_C])."""
    if CHANNELS_LAST:
        sx_c = 1
        sg_c = 1
    else:
        sx_w = 1
        sg_w = 1
    chunk = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    kd = tl.program_id(2) // KH
    kh = tl.program_id(2) % KH
    c_mask = c < C
    c64 = c.to(tl.int64)
    kw = tl.arange(0, BLOCK_KW)
    kw_mask = kw < KW
    iw_rel = (kw - KW // 2).to(tl.int64)
    d_rel = (kd - KD // 2).to(tl.int64)
    h_rel = (kh - KH // 2).to(tl.int64)
    first = chunk * tiles_per_chunk
    last = tl.minimum(first + tiles_per_chunk, num_tiles)
    tiles_w = (W + BLOCK_W - 1) // BLOCK_W
    tiles_hw = (H + BLOCK_H - 1) // BLOCK_H * tiles_w
    tiles_dhw = (D + BLOCK_D - 1) // BLOCK_D * tiles_hw
    s = tl.arange(0, BLOCK_D * BLOCK_H * BLOCK_W).to(tl.int64)
    sd = s // (BLOCK_H * BLOCK_W)
    sh = (s // BLOCK_W) % BLOCK_H
    sw = s % BLOCK_W
    go_c = go_ptr + (c64 * sg_c)[None, :]
    x_c = x_ptr + (c64 * sx_c)[None, None, :]
    c_ok3 = kw_mask[None, :, None] & c_mask[None, None, :]

    acc = tl.full((BLOCK_D * BLOCK_H * BLOCK_W, BLOCK_KW, BLOCK_C), 0.0, tl.float32)
    for t in range(first, last):
        # the tile decode of _tile_coords, inlined: a nested jit call per iteration is costly under the interpreter
        tile = tl.cast(t, tl.int64)  # the interpreter iterates plain Python ints
        n = tile // tiles_dhw
        od = (tile % tiles_dhw) // tiles_hw * BLOCK_D + sd
        oh = (tile % tiles_hw) // tiles_w * BLOCK_H + sh
        ow = tile % tiles_w * BLOCK_W + sw
        out_ok = (od < D) & (oh < H) & (ow < W)
        go = tl.load(go_c + (n * sg_n + od * sg_d + oh * sg_h + ow * sg_w)[:, None],
                     mask=out_ok[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
        id_ = od + d_rel
        ih = oh + h_rel
        row_ok = out_ok & (id_ >= 0) & (id_ < D) & (ih >= 0) & (ih < H)
        iw = ow[:, None] + iw_rel[None, :]  # [S, BLOCK_KW]
        ok = row_ok[:, None] & (iw >= 0) & (iw < W)
        x_off = (n * sx_n + id_ * sx_d + ih * sx_h)[:, None] + iw * sx_w
        xv = tl.load(x_c + x_off[:, :, None], mask=ok[:, :, None] & c_ok3, other=0.0)
        acc += go[:, None, :] * xv.to(tl.float32)
    part = tl.reduce(acc, 0, _sum_combine)  # [BLOCK_KW, BLOCK_C]
    dst = partial_ptr + chunk * C * (KD * KH * KW) + c64[None, :] * (KD * KH * KW) + (kd * KH + kh) * KW + kw[:, None]
    tl.store(dst, part, mask=kw_mask[:, None] & c_mask[None, :])


def _fwd_configs(channels_last: bool):
    """A small default set per layout: tiles of 256-512 outputs, channels across lanes (channels_last_3d) or
    width across lanes (NCDHW)."""
    if channels_last:
        shapes = [(1, 4, 8, 16, 4), (1, 2, 8, 32, 4), (2, 4, 8, 16, 8), (1, 4, 4, 64, 8)]
    else:
        shapes = [(1, 4, 32, 2, 4), (1, 8, 32, 1, 4), (2, 4, 32, 2, 8), (1, 4, 64, 1, 4)]
    return [
        triton.Config({"BLOCK_D": bd, "BLOCK_H": bh, "BLOCK_W": bw, "BLOCK_C": bc, "KW_CHUNK": 4}, num_warps=warps)
        for bd, bh, bw, bc, warps in shapes
    ]


_FWD_KEY = ["C", "D", "H", "W", "KD", "KH", "KW"]

INTERPRETED = is_interpreted(dwconv3d_fwd_kernel)
if INTERPRETED:
    fix_interpreter_scalar_index()
    dwconv3d_fwd_tuned_cl = dwconv3d_fwd_tuned_cf = None
else:
    dwconv3d_fwd_tuned_cl = triton.autotune(configs=_fwd_configs(True), key=_FWD_KEY)(dwconv3d_fwd_kernel)
    dwconv3d_fwd_tuned_cf = triton.autotune(configs=_fwd_configs(False), key=_FWD_KEY)(dwconv3d_fwd_kernel)
