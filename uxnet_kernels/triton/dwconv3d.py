"""Triton kernels of the depthwise 3D convolution (stride 1, zero "same" padding, odd kernel sizes).

Forward: one program per (BLOCK_D x BLOCK_H x BLOCK_W output tile of one sample, BLOCK_C channels); it loops
over the kernel's depth and height taps at run time and takes the width taps KW_CHUNK at a time as one
[tile, KW_CHUNK, BLOCK_C] load (KW is the only kernel size that is a compile-time constant, so k = 3 ... 21 needs
one specialisation per KW, not per kernel volume). Grad-input is this forward with the spatially flipped kernel
(below). Grad-weight: one program per (chunk of output tiles, channel block, (kd, kh)) writes the partial
sums of its KW taps; the host code reduces the chunks in a second, deterministic pass — no atomics.

Tensors are addressed through their strides: channels_last_3d (channels contiguous, the fast layout) and
contiguous NCDHW (width contiguous) are both exact; the CHANNELS_LAST flag only tells the compiler which
stride is 1. Program ids and every stride product are int64.
"""

import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op
from triton.language.standard import _sum_combine

from .launch import (
    INTERPRETED,
    as_float32,
    autotune_enabled,
    canonical,
    empty_grad,
    empty_like_layout,
    in_layout,
    launcher,
    poisoned,
    pow2,
    split_tile,
)


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

if INTERPRETED:
    dwconv3d_fwd_tuned_cl = dwconv3d_fwd_tuned_cf = None
else:
    dwconv3d_fwd_tuned_cl = triton.autotune(configs=_fwd_configs(True), key=_FWD_KEY)(dwconv3d_fwd_kernel)
    dwconv3d_fwd_tuned_cf = triton.autotune(configs=_fwd_configs(False), key=_FWD_KEY)(dwconv3d_fwd_kernel)


# ---- host code and operators ------------------------------------------------------------------------------------

# Upper bound of the grad-weight partial-sum buffer (bytes) and the number of programs it is sized for.
_GRAD_WEIGHT_PARTIAL_BYTES = 128 << 20
_TARGET_PROGRAMS = 4096
# Outputs per program under the interpreter, which pays per program and per op, not per element.
_INTERPRETER_FWD_TILE = 4096
_INTERPRETER_GRAD_WEIGHT_TILE = 16384



def _dwconv_fwd_blocks(c: int, d: int, h: int, w: int, kw: int, channels_last: bool) -> dict:
    if INTERPRETED:
        bc = min(pow2(c), 16)
        bd, bh, bw = split_tile(max(_INTERPRETER_FWD_TILE // bc, 1), d, h, w)
        chunk = int(os.environ.get("UXNET_TRITON_KW_CHUNK", "0")) or pow2(kw)
        return dict(BLOCK_D=bd, BLOCK_H=bh, BLOCK_W=bw, BLOCK_C=bc, KW_CHUNK=chunk)
    config = _fwd_configs(channels_last)[0]
    return dict(config.kwargs, num_warps=config.num_warps)


def _dwconv_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Forward into a new tensor in x's (canonical) layout; x already canonical."""
    x, channels_last = canonical(x)
    n, c, d, h, w = x.shape
    kd, kh, kw = weight.shape[2:]
    w32 = as_float32(weight).reshape(c, kd * kh * kw)
    b32 = as_float32(bias) if bias is not None else w32
    out = empty_like_layout(x, channels_last)
    args = (x, w32, b32, out, c, d, h, w, kd, kh, *x.stride(), *out.stride())
    flags = dict(KW=kw, HAS_BIAS=bias is not None, CHANNELS_LAST=channels_last)

    def grid(meta):
        tiles = (n * triton.cdiv(d, meta["BLOCK_D"]) * triton.cdiv(h, meta["BLOCK_H"])
                 * triton.cdiv(w, meta["BLOCK_W"]))
        return (tiles, triton.cdiv(c, meta["BLOCK_C"]))

    if autotune_enabled():
        tuned = dwconv3d_fwd_tuned_cl if channels_last else dwconv3d_fwd_tuned_cf
        launch = launcher(tuned, x)
        if launch is not None:
            launch[grid](*args, **flags)
    else:
        blocks = _dwconv_fwd_blocks(c, d, h, w, kw, channels_last)
        launch = launcher(dwconv3d_fwd_kernel, x)
        if launch is not None:
            launch[grid(blocks)](*args, **flags, **blocks)
    return out


def _dwconv_grad_weight(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                        channels_last: bool) -> torch.Tensor:
    n, c, d, h, w = x.shape
    kd, kh, kw = weight.shape[2:]
    block_kw = pow2(kw)
    if INTERPRETED:
        bc = min(pow2(c), 16)
        volume = max(_INTERPRETER_GRAD_WEIGHT_TILE // (block_kw * bc), 1)
    else:
        bc = min(pow2(c), 16 if channels_last else 2)
        volume = max(4096 // (block_kw * bc), 16)
    bd, bh, bw = split_tile(volume, d, h, w)
    num_tiles = n * triton.cdiv(d, bd) * triton.cdiv(h, bh) * triton.cdiv(w, bw)
    c_blocks = triton.cdiv(c, bc)
    by_memory = max(_GRAD_WEIGHT_PARTIAL_BYTES // (4 * c * kd * kh * kw), 1)
    chunks = max(min(num_tiles, by_memory, _TARGET_PROGRAMS // (c_blocks * kd * kh)), 1)
    tiles_per_chunk = triton.cdiv(num_tiles, chunks)
    chunks = triton.cdiv(num_tiles, tiles_per_chunk)
    partial = poisoned(torch.empty((chunks, c, kd, kh, kw), device=x.device, dtype=torch.float32))
    launch = launcher(dwconv3d_grad_weight_kernel, x, grad_out)
    if launch is not None:
        launch[(chunks, c_blocks, kd * kh)](
            grad_out, x, partial, c, d, h, w, kd, kh, *grad_out.stride(), *x.stride(), num_tiles, tiles_per_chunk,
            KW=kw, BLOCK_KW=block_kw, CHANNELS_LAST=channels_last,
            BLOCK_D=bd, BLOCK_H=bh, BLOCK_W=bw, BLOCK_C=bc,
        )
    return partial.sum(0).unsqueeze(1).to(weight.dtype)


@triton_op("uxnet::dwconv3d_triton", mutates_args=())
def dwconv3d_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _dwconv_forward(x, weight, bias)


@triton_op("uxnet::dwconv3d_triton_backward", mutates_args=())
def dwconv3d_triton_backward(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, output_mask: List[bool]
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_out, channels_last = canonical(grad_out)
    x = in_layout(x, channels_last)
    # grad_x[p] = sum_k grad_out[p - k + pad] w[k] = a "same" convolution of grad_out with the flipped kernel.
    grad_x = _dwconv_forward(grad_out, weight.flip((2, 3, 4)), None) if output_mask[0] else empty_grad(x)
    grad_weight = _dwconv_grad_weight(grad_out, x, weight, channels_last) if output_mask[1] else empty_grad(x)
    if output_mask[2]:
        grad_bias = grad_out.sum(dim=(0, 2, 3, 4), dtype=torch.float32).to(weight.dtype)
    else:
        grad_bias = empty_grad(x)
    return grad_x, grad_weight, grad_bias




