"""Ad-hoc CPU benchmark of uxnet::conv3d_3x3x3 (Winograd F(2x2x2, 3x3x3)) against F.conv3d (oneDNN) in NCDHW and
channels_last_3d.

All cases run in one process; the three contenders of a case (uxnet in the case's input layout, F.conv3d NCDHW,
F.conv3d channels_last_3d) are timed in interleaved rounds (uxnet/timing.py's ``interleaved``), and each time is the
median over rounds, so load bursts on a shared machine hit all three alike. GFLOP/s count the direct convolution's
2 * 27 * C_in FLOPs per output element (forward; fwd+bwd: 3x, forward + input gradient + weight gradient), the
same count for every contender, so GFLOP/s compare as speed. Shapes: the default model's stride-1 3x3x3
convolutions of a 96^3 patch at batch 1 (encoder blocks C -> C, decoder blocks 2C -> C); the 96^3 ones run as a
96 x 96 x 32 slab unless --full-depth.

    python benchmarks/scripts/cpu_conv3d.py [--threads 2] [--suite fwd|fwdbwd|all|bf16] [--full-depth] [--library PATH]

``--suite bf16`` (inference): oneDNN's bfloat16 convolution (NCDHW and channels_last_3d) against the Winograd
kernel on channels-last bfloat16 inputs (bf16 products where the CPU has AVX512_BF16, else computed in float32) with
the weight packed once (what the model does under bfloat16 autocast) and transformed per call, and on float32 inputs;
and the norm error against the float64 convolution of the float32 inputs, over PyTorch bfloat16's.
"""

import argparse
import os

import torch
import torch.nn.functional as F
from checkout_timing import timing

# (C_in, C_out, D, H, W)
ENCODER = [(48, 48, 96, 96, 96), (96, 96, 48, 48, 48), (192, 192, 24, 24, 24), (384, 384, 12, 12, 12),
           (768, 768, 6, 6, 6)]
DECODER = [(96, 48, 96, 96, 96), (192, 96, 48, 48, 48), (384, 192, 24, 24, 24), (768, 384, 12, 12, 12)]
SLAB_DEPTH = 32


def load_ops(library):
    if library:
        torch.ops.load_library(library)
    else:
        import uxnet_kernels  # noqa: F401  (loads the compiled extension)
    return torch.ops.uxnet


def side_by_side_ms(fns, rounds, round_s):
    return {key: t.median_s * 1e3 for key, t in timing.interleaved(fns, rounds, round_s).items()}


def shapes(full_depth):
    for cin, cout, d, h, w in ENCODER + DECODER:
        yield cin, cout, (d if full_depth or d < 96 else SLAB_DEPTH), h, w


def inputs(cin, cout, d, h, w):
    x = torch.randn(1, cin, d, h, w)
    return x, torch.randn(cout, cin, 3, 3, 3) / (27 * cin) ** 0.5, torch.randn(cout), torch.randn(1, cout, d, h, w)


def layouts(t):
    return t.contiguous(), t.contiguous(memory_format=torch.channels_last_3d)


def bench_bf16(ops, full_depth, rounds, round_s):
    print("| shape (batch 1) | oneDNN bf16 NCDHW ms | oneDNN bf16 CL ms | uxnet bf16 packed ms | uxnet bf16 per-call ms "
          "| uxnet fp32 packed ms | packed vs faster oneDNN bf16 | error vs PyTorch bf16 |\n"
          "|---|---|---|---|---|---|---|---|", flush=True)
    for cin, cout, d, h, w in shapes(full_depth):
        x, wt, b, _ = inputs(cin, cout, d, h, w)
        x_cl = x.contiguous(memory_format=torch.channels_last_3d)
        xb, wb, bb = x_cl.bfloat16(), wt.bfloat16(), b.bfloat16()
        xb_ncdhw = xb.contiguous()
        with torch.inference_mode():
            packed, packed_fp32 = ops.conv3d_3x3x3_pack_weight(wb), ops.conv3d_3x3x3_pack_weight(wt)
            t = side_by_side_ms({"ncdhw": lambda: F.conv3d(xb_ncdhw, wb, bb, padding=1),
                                 "cl": lambda: F.conv3d(xb, wb, bb, padding=1),
                                 "packed": lambda: ops.conv3d_3x3x3_packed(xb, wb, packed, bb),
                                 "call": lambda: ops.conv3d_3x3x3(xb, wb, bb),
                                 "fp32": lambda: ops.conv3d_3x3x3_packed(x_cl, wt, packed_fp32, b)}, rounds, round_s)
            truth = F.conv3d(x.double(), wt.double(), b.double(), padding=1)
            ours = (ops.conv3d_3x3x3_packed(xb, wb, packed, bb).double() - truth).norm()
            torchs = (F.conv3d(xb, wb, bb, padding=1).double() - truth).norm()
        faster = min(t["ncdhw"], t["cl"])
        print(f"| {cin}->{cout} @ {d}x{h}x{w} | {t['ncdhw']:.1f} | {t['cl']:.1f} | {t['packed']:.1f} | "
              f"{t['call']:.1f} | {t['fp32']:.1f} | {faster / t['packed']:.2f}x | {ours / torchs:.2f}x |", flush=True)


def bench(ops, suite, full_depth, rounds, round_s):
    if suite == "bf16":
        return bench_bf16(ops, full_depth, rounds, round_s)
    for cin, cout, d, h, w in shapes(full_depth):
        x, wt, b, g = inputs(cin, cout, d, h, w)
        flops = 2 * 27 * cin * cout * d * h * w
        x_nc, x_cl = layouts(x)
        g_nc, g_cl = layouts(g)
        shape = f"{cin}->{cout} @ {d}x{h}x{w}"
        for layout, xl, gl in (("ncdhw", x_nc, g_nc), ("cl", x_cl, g_cl)):
            if suite in ("fwd", "all"):
                with torch.inference_mode():
                    packed = ops.conv3d_3x3x3_pack_weight(wt)
                    t = side_by_side_ms({"ux": lambda: ops.conv3d_3x3x3(xl, wt, b),
                                         "packed": lambda: ops.conv3d_3x3x3_packed(xl, wt, packed, b),
                                         "nc": lambda: F.conv3d(x_nc, wt, b, padding=1),
                                         "cl": lambda: F.conv3d(x_cl, wt, b, padding=1)}, rounds, round_s)
                print_row("fwd", shape, layout, t, flops)
            if suite in ("fwdbwd", "all"):
                def ux(xl=xl, gl=gl):
                    return ops.conv3d_3x3x3(xl, wt, b), ops.conv3d_3x3x3_backward(gl, xl, wt, [True, True, True])

                def pt(xt, gt):
                    xr, wr, br = (t.detach().requires_grad_() for t in (xt, wt, b))
                    return torch.autograd.grad(F.conv3d(xr, wr, br, padding=1), (xr, wr, br), gt)

                t = side_by_side_ms({"ux": ux, "nc": lambda: pt(x_nc, g_nc), "cl": lambda: pt(x_cl, g_cl)}, rounds,
                                    round_s)
                print_row("fwd+bwd", shape, layout, t, 3 * flops)


HEADER = ("| pass | shape (batch 1) | uxnet input | uxnet ms | F.conv3d NCDHW ms | F.conv3d CL3d ms | uxnet GFLOP/s "
          "| oneDNN best GFLOP/s | vs faster oneDNN | packed weight: ms, vs faster oneDNN |"
          "\n|---|---|---|---|---|---|---|---|---|---|")


def print_row(kind, shape, layout, t, flops):
    """One table row; ``t["packed"]`` (forward only): the op with the weight transformed once (eval-mode cache)."""
    best = min(t["nc"], t["cl"])
    packed = f"{t['packed']:.1f}, {best / t['packed']:.2f}x" if "packed" in t else "-"
    print(f"| {kind} | {shape} | {layout} | {t['ux']:.1f} | {t['nc']:.1f} | {t['cl']:.1f} "
          f"| {flops / t['ux'] / 1e6:.0f} | {flops / best / 1e6:.0f} | {best / t['ux']:.2f}x | {packed} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--suite", choices=("fwd", "fwdbwd", "all", "bf16"), default="all")
    parser.add_argument("--full-depth", action="store_true", help="96^3 shapes at full depth instead of a slab")
    parser.add_argument("--library", default="")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-seconds", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ops = load_ops(args.library)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"UXNET_CPU_ISA={os.environ.get('UXNET_CPU_ISA', 'auto')}")
    if args.suite != "bf16":
        print(HEADER, flush=True)
    bench(ops, args.suite, args.full_depth, args.rounds, args.round_seconds)


if __name__ == "__main__":
    main()
