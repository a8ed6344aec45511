"""``torch.library.triton_op`` operators over the Triton kernels, with autograd.

Operators (all in the ``uxnet`` namespace; parameters may be any floating dtype, math is float32):

    dwconv3d_triton(x, weight, bias?) -> out
    dwconv3d_triton_backward(grad_out, x, weight, output_mask[3]) -> (grad_x, grad_weight, grad_bias)
    layer_norm_cf_triton(x, weight, bias, eps) -> (out, mean, rstd)
    layer_norm_cf_triton_backward(grad_out, x, weight, mean, rstd, output_mask[3]) -> (grad_x, grad_weight, grad_bias)
    ux_mlp_triton(y, residual?, ln_weight, ln_bias, w1, b1, w2, b2, gamma?, eps) -> (out, mean, rstd)
    ux_mlp_triton_backward(grad_out, y, ln_weight, ln_bias, w1, b1, w2, b2, gamma?, mean, rstd) -> 8 grads

They follow the conventions of the compiled ops (csrc/uxnet_ops.h): outputs take the memory format of the first
tensor argument (channels_last_3d only for inputs that are exactly that), inputs with other strides are made
contiguous, masked-out gradients are empty (0,) tensors, mean/rstd are (N, D, H, W) float32.

Parameter gradients are per-program partial sums reduced here with ``torch.sum`` over a fixed-size buffer, so
every result is deterministic (no atomics); ``torch.use_deterministic_algorithms`` needs no special path.
No kernel uses ``tl.dot``, so TF32 settings do not apply.

``UXNET_POISON_OUTPUTS=1`` fills every buffer a kernel writes with NaN before the launch (tests use it to prove
the kernels write every element). ``UXNET_TRITON_AUTOTUNE=0`` replaces autotuning by one heuristic config.
"""

import os
from typing import List, Optional, Tuple

import torch
import triton
from torch.library import triton_op, wrap_triton

from ..autograd_rules import dwconv3d_rule, layer_norm_rule, ux_mlp_rule
from . import dwconv3d as dw_kernels
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
