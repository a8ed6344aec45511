"""``torch.library.triton_op`` operators over the Triton kernels, with autograd.

Operators (all in the ``uxnet`` namespace; parameters may be any floating dtype, math is float32):

    dwconv3d_triton(x, weight, bias?) -> out
    dwconv3d_triton_backward(grad_out, x, weight, output_mask[3]) -> (grad_x, grad_weight, grad_bias)
    layer_norm_cf_triton(x, weight, bias, eps) -> (out, mean, rstd)
    layer_norm_cf_triton_backward(grad_out, x, weight, mean, rstd, output_mask[3]) -> (grad_x, grad_weight, grad_bias)
    ux_mlp_triton(y, residual?, ln_weight, ln_bias, w1, b1, w2, b2, gamma?, eps) -> (out, mean, rstd)
    ux_mlp_triton_backward(grad_out, y, ln_weight, ln_bias, w1, b1, w2, b2, gamma?, mean, rstd) -> 8 grads
    instance_norm_lrelu_triton(x, negative_slope, eps) -> (out, mean, rstd)
    instance_norm_lrelu_triton_backward(grad_out, out, rstd, negative_slope) -> grad_x
    instance_norm_add_lrelu_triton(z, residual?, shortcut_inputs[], shortcut_weights[], negative_slope, eps)
        -> (out, mean, rstd, shortcut_mean, shortcut_rstd)
    instance_norm_add_lrelu_triton_backward(grad_out, out, residual?, shortcut_inputs[], shortcut_weights[], rstd,
        shortcut_mean, shortcut_rstd, negative_slope) -> (grad_z, grad_residual, grad_shortcut_inputs[],
        grad_shortcut_weights[])

They follow the conventions of the compiled ops (csrc/uxnet_ops.h): outputs take the memory format of the first
tensor argument (channels_last_3d only for inputs that are exactly that), inputs with other strides are made
contiguous, masked-out gradients are empty (0,) tensors, mean/rstd are (N, D, H, W) float32 ((N, C) float32 for the
instance-norm ops, whose unused shortcut statistics and residual gradient are (0,) tensors). The instance-norm ops
run the shortcut's 1x1x1 convolutions (and their backward) with ATen; statistics and backward sums are finished
from per-chunk partials by torch ops in float64.

Parameter gradients are per-program partial sums reduced here with ``torch.sum`` over a fixed-size buffer, so
every result is deterministic (no atomics); ``torch.use_deterministic_algorithms`` needs no special path.
No kernel uses ``tl.dot``, so TF32 settings do not apply.

``UXNET_POISON_OUTPUTS=1`` fills every buffer a kernel writes with NaN before the launch (tests use it to prove
the kernels write every element). ``UXNET_TRITON_AUTOTUNE=0`` replaces autotuning by one heuristic config.
"""

import os
from typing import List, NamedTuple, Optional, Tuple

import torch
import triton
from torch.library import triton_op, wrap_triton

from ..autograd_rules import (dwconv3d_rule, instance_norm_add_lrelu_rule, instance_norm_lrelu_rule, layer_norm_rule,
                              ux_mlp_rule)
from . import dwconv3d as dw_kernels
from . import instance_norm as in_kernels
from . import layer_norm as ln_kernels
from . import ux_mlp as mlp_kernels

INTERPRETED = dw_kernels.INTERPRETED
EMPTY_GRAD_SHAPE = (0,)
# Upper bound of the grad-weight partial-sum buffer (bytes) and the number of programs it is sized for.
_GRAD_WEIGHT_PARTIAL_BYTES = 128 << 20
_TARGET_PROGRAMS = 4096
# Programs of the layer_norm / ux_mlp backward kernels (each writes one row of parameter-grad partial sums).
_VOXEL_BACKWARD_PROGRAMS = 2048
# Outputs per program under the interpreter, which pays per program and per op, not per element.
_INTERPRETER_FWD_TILE = 4096
_INTERPRETER_GRAD_WEIGHT_TILE = 16384
# Instance-norm kernels: elements per tile (GPU, interpreter), the most tiles per reduction chunk, and the number of
# reduction programs to aim for (chunks get longer, up to the maximum, while there are at least that many).
_INSTANCE_TILE = 1024
_INTERPRETER_INSTANCE_TILE = 512
_INSTANCE_MAX_TILES = 16
_INSTANCE_REDUCE_PROGRAMS = 4096


# ---- shared helpers ------------------------------------------------------------------------------------------


def _poison_enabled() -> bool:
    return os.environ.get("UXNET_POISON_OUTPUTS", "0") == "1"


def _autotune_enabled() -> bool:
    return not INTERPRETED and os.environ.get("UXNET_TRITON_AUTOTUNE", "1") != "0"


def _new(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan")) if _poison_enabled() and t.is_floating_point() else t


def _is_channels_last(t: torch.Tensor) -> bool:
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d)


def _canonical(t: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    """(t as contiguous or exactly channels_last_3d, whether channels_last_3d)."""
    if _is_channels_last(t):
        return t, True
    return t.contiguous(), False


def _in_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)


def _empty_like_layout(t: torch.Tensor, channels_last: bool, dtype=None) -> torch.Tensor:
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    return _new(torch.empty_like(t, dtype=dtype, memory_format=fmt))


def _no_grad(like: torch.Tensor) -> torch.Tensor:
    """The (0,) placeholder of a gradient that was not asked for (a new one per output: outputs may not alias)."""
    return like.new_empty(EMPTY_GRAD_SHAPE)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous()


def _is_fake(*tensors) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return any(t is not None and is_fake(t) for t in tensors)


def _launcher(kernel, *tensors):
    """The kernel as launched inside a triton_op: ``wrap_triton`` for compiled kernels; interpreted kernels run
    as they are (wrap_triton cannot trace them) and are skipped on fake tensors (shape propagation only)."""
    if INTERPRETED:
        if _is_fake(*tensors):
            return None
        return kernel
    return wrap_triton(kernel)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _split_tile(volume: int, d: int, h: int, w: int) -> Tuple[int, int, int]:
    """A BLOCK_D x BLOCK_H x BLOCK_W tile of about `volume` outputs, filling W, then H, then D."""
    bw = min(_pow2(w), volume)
    bh = min(_pow2(h), max(volume // bw, 1))
    bd = min(_pow2(d), max(volume // (bw * bh), 1))
    return bd, bh, bw


# ---- dwconv3d --------------------------------------------------------------------------------------------------


def _dwconv_fwd_blocks(c: int, d: int, h: int, w: int, kw: int, channels_last: bool) -> dict:
    if INTERPRETED:
        bc = min(_pow2(c), 16)
        bd, bh, bw = _split_tile(max(_INTERPRETER_FWD_TILE // bc, 1), d, h, w)
        chunk = int(os.environ.get("UXNET_TRITON_KW_CHUNK", "0")) or _pow2(kw)
        return dict(BLOCK_D=bd, BLOCK_H=bh, BLOCK_W=bw, BLOCK_C=bc, KW_CHUNK=chunk)
    config = dw_kernels._fwd_configs(channels_last)[0]
    return dict(config.kwargs, num_warps=config.num_warps)


def _dwconv_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Forward into a new tensor in x's (canonical) layout; x already canonical."""
    x, channels_last = _canonical(x)
    n, c, d, h, w = x.shape
    kd, kh, kw = weight.shape[2:]
    w32 = _f32(weight).reshape(c, kd * kh * kw)
    b32 = _f32(bias) if bias is not None else w32
    out = _empty_like_layout(x, channels_last)
    args = (x, w32, b32, out, c, d, h, w, kd, kh, *x.stride(), *out.stride())
    flags = dict(KW=kw, HAS_BIAS=bias is not None, CHANNELS_LAST=channels_last)

    def grid(meta):
        tiles = (n * triton.cdiv(d, meta["BLOCK_D"]) * triton.cdiv(h, meta["BLOCK_H"])
                 * triton.cdiv(w, meta["BLOCK_W"]))
        return (tiles, triton.cdiv(c, meta["BLOCK_C"]))

    if _autotune_enabled():
        tuned = dw_kernels.dwconv3d_fwd_tuned_cl if channels_last else dw_kernels.dwconv3d_fwd_tuned_cf
        launch = _launcher(tuned, x)
        if launch is not None:
            launch[grid](*args, **flags)
    else:
        blocks = _dwconv_fwd_blocks(c, d, h, w, kw, channels_last)
        launch = _launcher(dw_kernels.dwconv3d_fwd_kernel, x)
        if launch is not None:
            launch[grid(blocks)](*args, **flags, **blocks)
    return out


def _dwconv_grad_weight(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                        channels_last: bool) -> torch.Tensor:
    n, c, d, h, w = x.shape
    kd, kh, kw = weight.shape[2:]
    block_kw = _pow2(kw)
    if INTERPRETED:
        bc = min(_pow2(c), 16)
        volume = max(_INTERPRETER_GRAD_WEIGHT_TILE // (block_kw * bc), 1)
    else:
        bc = min(_pow2(c), 16 if channels_last else 2)
        volume = max(4096 // (block_kw * bc), 16)
    bd, bh, bw = _split_tile(volume, d, h, w)
    num_tiles = n * triton.cdiv(d, bd) * triton.cdiv(h, bh) * triton.cdiv(w, bw)
    c_blocks = triton.cdiv(c, bc)
    by_memory = max(_GRAD_WEIGHT_PARTIAL_BYTES // (4 * c * kd * kh * kw), 1)
    chunks = max(min(num_tiles, by_memory, _TARGET_PROGRAMS // (c_blocks * kd * kh)), 1)
    tiles_per_chunk = triton.cdiv(num_tiles, chunks)
    chunks = triton.cdiv(num_tiles, tiles_per_chunk)
    partial = _new(torch.empty((chunks, c, kd, kh, kw), device=x.device, dtype=torch.float32))
    launch = _launcher(dw_kernels.dwconv3d_grad_weight_kernel, x, grad_out)
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
    grad_out, channels_last = _canonical(grad_out)
    x = _in_layout(x, channels_last)
    # grad_x[p] = sum_k grad_out[p - k + pad] w[k] = a "same" convolution of grad_out with the flipped kernel.
    grad_x = _dwconv_forward(grad_out, weight.flip((2, 3, 4)), None) if output_mask[0] else _no_grad(x)
    grad_weight = _dwconv_grad_weight(grad_out, x, weight, channels_last) if output_mask[1] else _no_grad(x)
    if output_mask[2]:
        grad_bias = grad_out.sum(dim=(0, 2, 3, 4), dtype=torch.float32).to(weight.dtype)
    else:
        grad_bias = _no_grad(x)
    return grad_x, grad_weight, grad_bias


_backward, _setup = dwconv3d_rule(torch.ops.uxnet.dwconv3d_triton_backward)
dwconv3d_triton.register_autograd(_backward, setup_context=_setup)


# ---- layer_norm_cf and ux_mlp ---------------------------------------------------------------------------------


def _voxel_blocks(c: int, hidden: int) -> Tuple[int, int, int]:
    """(BLOCK_V, BLOCK_C, num_warps): all channels of a voxel in one program, `hidden` values per channel."""
    block_c = _pow2(c)
    budget = 16384 if INTERPRETED else 2048
    block_v = max(min(budget // (block_c * hidden), 128), 1)
    warps = 4 if block_c * block_v * hidden <= 2048 else 8
    return block_v, block_c, warps


def _backward_programs(voxels: int, block_v: int) -> Tuple[int, int]:
    """(programs, blocks per program) for kernels that accumulate parameter-grad partial sums."""
    blocks = triton.cdiv(voxels, block_v)
    per_program = triton.cdiv(blocks, min(blocks, _VOXEL_BACKWARD_PROGRAMS))
    return triton.cdiv(blocks, per_program), per_program


def _stats(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    n, _, d, h, w = x.shape
    return (_new(x.new_empty((n, d, h, w), dtype=torch.float32)),
            _new(x.new_empty((n, d, h, w), dtype=torch.float32)))


@triton_op("uxnet::layer_norm_cf_triton", mutates_args=())
def layer_norm_cf_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, channels_last = _canonical(x)
    n, c, d, h, w = x.shape
    voxels, spatial = n * d * h * w, d * h * w
    out = _empty_like_layout(x, channels_last)
    mean, rstd = _stats(x)
    block_v, block_c, warps = _voxel_blocks(c, 1)
    launch = _launcher(ln_kernels.layer_norm_cf_fwd_kernel, x)
    if launch is not None:
        launch[(triton.cdiv(voxels, block_v),)](
            x, _f32(weight), _f32(bias), out, mean, rstd, voxels, c, spatial, eps,
            CHANNELS_LAST=channels_last, BLOCK_V=block_v, BLOCK_C=block_c, num_warps=warps,
        )
    return out, mean, rstd


@triton_op("uxnet::layer_norm_cf_triton_backward", mutates_args=())
def layer_norm_cf_triton_backward(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    output_mask: List[bool],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_out, channels_last = _canonical(grad_out)
    x = _in_layout(x, channels_last)
    n, c, d, h, w = x.shape
    voxels, spatial = n * d * h * w, d * h * w
    block_v, block_c, warps = _voxel_blocks(c, 2)
    programs, per_program = _backward_programs(voxels, block_v)
    grad_x = _empty_like_layout(grad_out, channels_last)
    partial = _new(x.new_empty((programs, 2, c), dtype=torch.float32))
    launch = _launcher(ln_kernels.layer_norm_cf_bwd_kernel, x, grad_out)
    if launch is not None:
        launch[(programs,)](
            grad_out, x, _f32(weight), mean.contiguous(), rstd.contiguous(), grad_x, partial,
            voxels, c, spatial, per_program,
            CHANNELS_LAST=channels_last, BLOCK_V=block_v, BLOCK_C=block_c, num_warps=warps,
        )
    sums = partial.sum(0).to(weight.dtype)
    return (
        grad_x if output_mask[0] else _no_grad(x),
        sums[0].clone() if output_mask[1] else _no_grad(x),
        sums[1].clone() if output_mask[2] else _no_grad(x),
    )


_backward, _setup = layer_norm_rule(torch.ops.uxnet.layer_norm_cf_triton_backward)
layer_norm_cf_triton.register_autograd(_backward, setup_context=_setup)


@triton_op("uxnet::ux_mlp_triton", mutates_args=())
def ux_mlp_triton(
    y: torch.Tensor, residual: Optional[torch.Tensor], ln_weight: torch.Tensor, ln_bias: torch.Tensor,
    w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, gamma: Optional[torch.Tensor],
    eps: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, channels_last = _canonical(y)
    n, c, d, h, w = y.shape
    voxels, spatial = n * d * h * w, d * h * w
    res = _in_layout(residual, channels_last) if residual is not None else y
    params = [_f32(p) for p in (ln_weight, ln_bias, w1.reshape(c, 4), b1.reshape(c, 4), w2.reshape(c, 4), b2)]
    gamma32 = _f32(gamma) if gamma is not None else params[0]
    out = _empty_like_layout(y, channels_last)
    mean, rstd = _stats(y)
    block_v, block_c, warps = _voxel_blocks(c, 4)
    launch = _launcher(mlp_kernels.ux_mlp_fwd_kernel, y)
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
    grad_out, channels_last = _canonical(grad_out)
    y = _in_layout(y, channels_last)
    n, c, d, h, w = y.shape
    voxels, spatial = n * d * h * w, d * h * w
    params = [_f32(p) for p in (ln_weight, ln_bias, w1.reshape(c, 4), b1.reshape(c, 4), w2.reshape(c, 4), b2)]
    gamma32 = _f32(gamma) if gamma is not None else params[0]
    block_v, block_c, warps = _voxel_blocks(c, 8)
    programs, per_program = _backward_programs(voxels, block_v)
    grad_y = _empty_like_layout(grad_out, channels_last)
    partial = _new(y.new_empty((programs, mlp_kernels.PARTIAL_ROWS, c), dtype=torch.float32))
    launch = _launcher(mlp_kernels.ux_mlp_bwd_kernel, y, grad_out)
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

    grad_gamma = as_param(sums[15], gamma) if gamma is not None else _no_grad(y)
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


_backward, _setup = ux_mlp_rule(torch.ops.uxnet.ux_mlp_triton_backward)
ux_mlp_triton.register_autograd(_backward, setup_context=_setup)


# ---- instance_norm_lrelu and instance_norm_add_lrelu ----------------------------------------------------------


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
    block_c = min(_pow2(c), 64) if channels_last else 1
    block_v = min(max(elements // block_c, 1), _pow2(voxels))
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
    partial = _new(x.new_empty((in_kernels.STATS_ROWS, g.n, g.c, g.chunks), dtype=torch.float32))
    launch = _launcher(in_kernels.instance_norm_stats_kernel, x)
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
        projected = _in_layout(term, channels_last) if projected is None else projected.add_(term)
    return projected


def _shortcut_backward(grad_proj: torch.Tensor, x_in: torch.Tensor, w_in: torch.Tensor):
    """(grad of x_in, grad of w_in) of one shortcut convolution from the projection's gradient."""
    g, x, w = grad_proj.flatten(2), x_in.flatten(2), w_in.flatten(1)
    channels_last = _is_channels_last(x_in)
    grad_x = (_shortcut_product(g.transpose(1, 2), w, x_in, x_in.shape[1], True) if channels_last
              else _shortcut_product(w.t(), g, x_in, x_in.shape[1], False))
    grad_w = torch.matmul(g, x.transpose(1, 2)).sum(0).view(w_in.shape)
    return _in_layout(grad_x, channels_last), grad_w


def _instance_forward(z: torch.Tensor, channels_last: bool, r: Optional[torch.Tensor], mode: int,
                      r_stats: Optional[Tuple[torch.Tensor, torch.Tensor]], negative_slope: float, eps: float):
    """(out, mean, rstd) of out = lrelu(IN(z) + r_hat); z and r in the canonical layout, numel > 0."""
    g = _instance_grid(z.shape, channels_last)
    mean, rstd = _instance_stats(z, channels_last, eps)
    r_mean, r_rstd = r_stats if r_stats is not None else (mean, rstd)  # placeholders unless normalized
    out = _empty_like_layout(z, channels_last)
    launch = _launcher(in_kernels.instance_norm_lrelu_fwd_kernel, z)
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
    rows = in_kernels.BACKWARD_ROWS if mode == in_kernels.RESIDUAL_NORMALIZED else in_kernels.BACKWARD_ROWS - 1
    rstd = _f32(rstd)
    r_mean, r_rstd = (_f32(t) for t in r_stats) if r_stats is not None else (rstd, rstd)
    r_arg = r if r is not None else out
    partial = _new(out.new_empty((rows, g.n, g.c, g.chunks), dtype=torch.float32))
    launch = _launcher(in_kernels.instance_norm_lrelu_bwd_sums_kernel, grad_out, out)
    if launch is not None:
        launch[(g.n * g.chunks, g.c_blocks)](
            grad_out, out, r_arg, r_mean, r_rstd, partial, g.n * g.c, g.c, g.voxels, g.chunks, negative_slope,
            RESIDUAL=mode, TILES=g.tiles_per_chunk, CHANNELS_LAST=channels_last, BLOCK_V=g.block_v,
            BLOCK_C=g.block_c, num_warps=g.warps,
        )
    coefficients = (partial.double().sum(-1) / g.voxels).float()  # (rows, N, C): a, b[, b_r]
    grad_z = _empty_like_layout(grad_out, channels_last)
    if mode == in_kernels.RESIDUAL_NORMALIZED:
        grad_r = r
    elif mode == in_kernels.RESIDUAL_PLAIN:
        grad_r = _empty_like_layout(grad_out, channels_last)
    else:
        grad_r = None
    launch = _launcher(in_kernels.instance_norm_lrelu_bwd_apply_kernel, grad_out, out)
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
    x, channels_last = _canonical(x)
    if x.numel() == 0:
        return _empty_like_layout(x, channels_last), _nan_stats(x), _nan_stats(x)
    return _instance_forward(x, channels_last, None, in_kernels.RESIDUAL_NONE, None, negative_slope, eps)


@triton_op("uxnet::instance_norm_lrelu_triton_backward", mutates_args=())
def instance_norm_lrelu_triton_backward(
    grad_out: torch.Tensor, out: torch.Tensor, rstd: torch.Tensor, negative_slope: float
) -> torch.Tensor:
    grad_out, channels_last = _canonical(grad_out)
    out = _in_layout(out, channels_last)
    if out.numel() == 0:
        return _empty_like_layout(grad_out, channels_last)
    return _instance_backward(grad_out, out, channels_last, None, in_kernels.RESIDUAL_NONE, rstd, None,
                              negative_slope)[0]


_backward, _setup = instance_norm_lrelu_rule(torch.ops.uxnet.instance_norm_lrelu_triton_backward)
instance_norm_lrelu_triton.register_autograd(_backward, setup_context=_setup)


@triton_op("uxnet::instance_norm_add_lrelu_triton", mutates_args=())
def instance_norm_add_lrelu_triton(
    z: torch.Tensor, residual: Optional[torch.Tensor], shortcut_inputs: List[torch.Tensor],
    shortcut_weights: List[torch.Tensor], negative_slope: float, eps: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    z, channels_last = _canonical(z)
    if residual is not None:
        r, mode = _in_layout(residual, channels_last), in_kernels.RESIDUAL_PLAIN
        no_stats = z.new_empty(EMPTY_GRAD_SHAPE, dtype=torch.float32)
        r_stats = (no_stats, no_stats.clone())
    elif z.numel() == 0:
        r, mode, r_stats = None, in_kernels.RESIDUAL_NORMALIZED, (_nan_stats(z), _nan_stats(z))
    else:
        r = _shortcut_projection(z, shortcut_inputs, shortcut_weights, channels_last)
        mode = in_kernels.RESIDUAL_NORMALIZED
        r_stats = _instance_stats(r, channels_last, eps)
    if z.numel() == 0:
        return _empty_like_layout(z, channels_last), _nan_stats(z), _nan_stats(z), *r_stats
    out, mean, rstd = _instance_forward(z, channels_last, r, mode,
                                        r_stats if mode == in_kernels.RESIDUAL_NORMALIZED else None,
                                        negative_slope, eps)
    return out, mean, rstd, *r_stats


@triton_op("uxnet::instance_norm_add_lrelu_triton_backward", mutates_args=())
def instance_norm_add_lrelu_triton_backward(
    grad_out: torch.Tensor, out: torch.Tensor, residual: Optional[torch.Tensor], shortcut_inputs: List[torch.Tensor],
    shortcut_weights: List[torch.Tensor], rstd: torch.Tensor, shortcut_mean: torch.Tensor,
    shortcut_rstd: torch.Tensor, negative_slope: float,
) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    grad_out, channels_last = _canonical(grad_out)
    out = _in_layout(out, channels_last)
    if residual is not None:
        r, mode, r_stats = _in_layout(residual, channels_last), in_kernels.RESIDUAL_PLAIN, None
    else:
        r = _shortcut_projection(out, shortcut_inputs, shortcut_weights, channels_last) if out.numel() > 0 else None
        mode, r_stats = in_kernels.RESIDUAL_NORMALIZED, (shortcut_mean, shortcut_rstd)
    if out.numel() == 0:
        grad_z = _empty_like_layout(grad_out, channels_last)
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
    return grad_z, _no_grad(out), grad_inputs, grad_weights


_backward, _setup = instance_norm_add_lrelu_rule(torch.ops.uxnet.instance_norm_add_lrelu_triton_backward)
instance_norm_add_lrelu_triton.register_autograd(_backward, setup_context=_setup)
