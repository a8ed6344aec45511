"""Compile every Triton kernel of uxnet for a GPU architecture, without a GPU (Triton's own ptxas, no driver).

    python benchmarks/gpu/compile_kernels.py [--arch 90] [--dtypes fp32,bf16] [--layouts cl,cf] [--resources]

Catches errors that only the compiler sees (the interpreter runs kernels as Python and accepts code that
``triton.compile`` rejects). With --resources, prints registers and local (spill) bytes per thread of each kernel (cuobjdump).
Must run without TRITON_INTERPRET (it is removed from the environment before triton is imported).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from uxnet_kernels.triton import dwconv3d as dw  # noqa: E402
from uxnet_kernels.triton import instance_norm as inorm  # noqa: E402
from uxnet_kernels.triton import layer_norm_channels_first as ln  # noqa: E402
from uxnet_kernels.triton import ux_mlp as mlp  # noqa: E402

_F32_PARAMS = ("w_ptr", "b_ptr", "lnw_ptr", "lnb_ptr", "w1_ptr", "b1_ptr", "w2_ptr", "b2_ptr", "gamma_ptr",
               "mean_ptr", "rstd_ptr", "partial_ptr", "r_mean_ptr", "r_rstd_ptr", "coef_ptr")
_DATA = ("x_ptr", "out_ptr", "go_ptr", "gx_ptr", "y_ptr", "res_ptr", "gy_ptr", "z_ptr", "r_ptr", "gz_ptr", "gr_ptr")
_FLOATS = ("eps", "slope")


def _signature(kernel, dtype, constexprs):
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _F32_PARAMS:
            sig[name] = "*fp32"
        elif name in _DATA:
            sig[name] = f"*{dtype}"
        elif name in _FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def cases(dtypes, layouts):
    for dtype in dtypes:
        for layout in layouts:
            cl = layout == "cl"
            for kw, chunk in ((7, 4), (21, 4)):
                yield dw.dwconv3d_fwd_kernel, dtype, dict(KW=kw, KW_CHUNK=chunk, HAS_BIAS=True, CHANNELS_LAST=cl,
                                                           BLOCK_D=1, BLOCK_H=4, BLOCK_W=8, BLOCK_C=16), 4
            yield dw.dwconv3d_grad_weight_kernel, dtype, dict(KW=7, BLOCK_KW=8, CHANNELS_LAST=cl, BLOCK_D=1,
                                                               BLOCK_H=2, BLOCK_W=16, BLOCK_C=16), 4
            yield ln.layer_norm_channels_first_fwd_kernel, dtype, dict(CHANNELS_LAST=cl, BLOCK_V=32, BLOCK_C=64), 4
            yield ln.layer_norm_channels_first_bwd_kernel, dtype, dict(CHANNELS_LAST=cl, BLOCK_V=16, BLOCK_C=64), 4
            yield mlp.ux_mlp_fwd_kernel, dtype, dict(HAS_RESIDUAL=True, HAS_GAMMA=True, CHANNELS_LAST=cl,
                                                      BLOCK_V=8, BLOCK_C=64), 4
            yield mlp.ux_mlp_bwd_kernel, dtype, dict(HAS_GAMMA=cl, CHANNELS_LAST=cl, BLOCK_V=4, BLOCK_C=64), 4
            # instance norm: the GPU tiles of triton/instance_norm.py (_instance_grid), 16 tiles per reduction chunk
            tile = dict(CHANNELS_LAST=cl, BLOCK_V=16 if cl else 1024, BLOCK_C=64 if cl else 1)
            yield inorm.instance_norm_stats_kernel, dtype, dict(TILES=16, **tile), 4
            for residual in (0, 2):
                yield inorm.instance_norm_lrelu_fwd_kernel, dtype, dict(RESIDUAL=residual, **tile), 4
            yield inorm.instance_norm_lrelu_bwd_sums_kernel, dtype, dict(RESIDUAL=2, TILES=16, **tile), 4
            for residual in (1, 2):
                yield inorm.instance_norm_lrelu_bwd_apply_kernel, dtype, dict(RESIDUAL=residual, **tile), 4


def resource_usage(cubin: bytes) -> str:
    """Registers and local (spill) memory per thread from the cubin, via the cuobjdump that ships with Triton."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        proc = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    regs = re.search(r"REG:(\d+)", proc.stdout)
    local = re.search(r"LOCAL:(\d+)", proc.stdout)
    return f"regs {regs.group(1) if regs else '?'}, local (spill) {local.group(1) if local else '?'} B"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--layouts", default="cl,cf")
    parser.add_argument("--resources", action="store_true")
    args = parser.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    for kernel, dtype, constexprs, warps in cases(args.dtypes.split(","), args.layouts.split(",")):
        start = time.perf_counter()
        compiled = triton.compile(ASTSource(kernel, _signature(kernel, dtype, constexprs), constexprs),
                                  target=target, options=dict(num_warps=warps))
        flags = {k: v for k, v in constexprs.items() if not k.startswith("BLOCK_")}
        extra = f"; {resource_usage(compiled.asm['cubin'])}" if args.resources else ""
        print(f"{kernel.fn.__name__ if hasattr(kernel, 'fn') else kernel.__name__} {dtype} {flags}: "
              f"{time.perf_counter() - start:.1f} s{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
