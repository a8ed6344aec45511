"""What the Triton kernels of the two channels-first ops (LayerNorm and the UX block tail) share: a program holds
BLOCK_V voxels with all their channels; voxel indices and offsets are int64; the backward kernels write per-program
partial sums of the parameter gradients."""

from typing import Tuple

import torch
import triton
import triton.language as tl

from .launch import INTERPRETED, poisoned, pow2

# Programs of the backward kernels (each writes one row of parameter-grad partial sums).
_VOXEL_BACKWARD_PROGRAMS = 2048


@triton.jit
def voxel_channel_offsets(v, c, C, S, CHANNELS_LAST: tl.constexpr):
    """Element offsets [BLOCK_V, BLOCK_C] of voxels v (int64, flat over N * S, S = D * H * W) and channels c."""
    n = v // S
    s = v % S
    c64 = c.to(tl.int64)
    if CHANNELS_LAST:
        offs = (n * S * C + s * C)[:, None] + c64[None, :]
    else:
        offs = (n * S * C + s)[:, None] + (c64 * S)[None, :]
    return offs



def voxel_blocks(c: int, hidden: int) -> Tuple[int, int, int]:
    """(BLOCK_V, BLOCK_C, num_warps): all channels of a voxel in one program, `hidden` values per channel."""
    block_c = pow2(c)
    budget = 16384 if INTERPRETED else 2048
    block_v = max(min(budget // (block_c * hidden), 128), 1)
    warps = 4 if block_c * block_v * hidden <= 2048 else 8
    return block_v, block_c, warps


def backward_programs(voxels: int, block_v: int) -> Tuple[int, int]:
    """(programs, blocks per program) for kernels that accumulate parameter-grad partial sums."""
    blocks = triton.cdiv(voxels, block_v)
    per_program = triton.cdiv(blocks, min(blocks, _VOXEL_BACKWARD_PROGRAMS))
    return triton.cdiv(blocks, per_program), per_program


def voxel_stats(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    n, _, d, h, w = x.shape
    return (poisoned(x.new_empty((n, d, h, w), dtype=torch.float32)),
            poisoned(x.new_empty((n, d, h, w), dtype=torch.float32)))


