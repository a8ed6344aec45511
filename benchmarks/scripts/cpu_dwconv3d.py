"""Ad-hoc CPU benchmark of uxnet::dwconv3d against F.conv3d(groups=C) in NCDHW and channels_last_3d.

All cases run in one process. The three contenders of a case are timed in interleaved rounds (uxnet, NCDHW,
channels_last_3d, uxnet, ...; uxnet/timing.py's ``interleaved``), and each time is the median over rounds of the
mean time per call in a round, so load bursts on a shared machine hit all three alike. Prints a markdown table of
milliseconds, GFLOP/s (2 * k^3 FLOPs per output element per pass) and speedups vs the faster PyTorch layout.

    python benchmarks/scripts/cpu_dwconv3d.py [--threads 2] [--suite fwd|fwdbwd|all] [--library PATH]

--library loads a privately built operator library instead of importing uxnet_kernels (development builds).
"""

import argparse
import os

import torch
import torch.nn.functional as F

from checkout_timing import timing

FWD_CASES = [  # (N, C, S, k): UX-Net stage shapes of a 96^3 patch at batch 1 (k = 7), plus larger kernels
    (1, 48, 48, 7),
    (1, 96, 24, 7),
    (1, 192, 12, 7),
    (1, 384, 6, 7),
    (1, 96, 24, 13),
    (1, 192, 12, 21),
]
FWDBWD_CASES = [(1, 48, 32, 7), (1, 96, 16, 7)]


def load_ops(library):
    if library:
        torch.ops.load_library(library)
    else:
        import uxnet_kernels  # noqa: F401  (loads the compiled extension)
    return torch.ops.uxnet


def torch_conv(x, w, b):
    k = w.shape[2:]
    return F.conv3d(x, w, b, padding=(k[0] // 2, k[1] // 2, k[2] // 2), groups=x.shape[1])


def side_by_side_ms(fns, rounds, round_s):
    """Median milliseconds per call of each function, timed in interleaved rounds of about round_s seconds."""
    return {key: t.median_s * 1e3 for key, t in timing.interleaved(fns, rounds, round_s).items()}


def make(n, c, s, k, layout):
    x = torch.randn(n, c, s, s, s)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x, torch.randn(c, 1, k, k, k), torch.randn(c)


def bench_forward(ops, cases, rounds, round_s):
    for n, c, s, k in cases:
        flops = 2 * k**3 * n * c * s**3
        for layout in ("ncdhw", "cl"):
            x, w, b = make(n, c, s, k, layout)
            x_nc, x_cl = x.contiguous(), x.contiguous(memory_format=torch.channels_last_3d)
            t = side_by_side_ms(
                {
                    "ux": lambda: ops.dwconv3d(x, w, b),
                    "nc": lambda: torch_conv(x_nc, w, b),
                    "cl": lambda: torch_conv(x_cl, w, b),
                },
                rounds,
                round_s,
            )
            print_row("fwd", f"{n}x{c}x{s}^3 k={k}", layout, t["ux"], t["nc"], t["cl"], flops)


def bench_fwdbwd(ops, cases, rounds, round_s):
    for n, c, s, k in cases:
        flops = 3 * 2 * k**3 * n * c * s**3  # forward + grad input + grad weight
        for layout in ("ncdhw", "cl"):
            x, w, b = make(n, c, s, k, layout)
            g = torch.randn_like(x)

            def ux():
                return ops.dwconv3d(x, w, b), ops.dwconv3d_backward(g, x, w, [True, True, True])

            def pt(xl, gl):
                xr, wr, br = xl.detach().requires_grad_(), w.detach().requires_grad_(), b.detach().requires_grad_()
                y = torch_conv(xr, wr, br)
                return torch.autograd.grad(y, (xr, wr, br), gl)

            x_nc, x_cl = x.contiguous(), x.contiguous(memory_format=torch.channels_last_3d)
            g_nc, g_cl = g.contiguous(), g.contiguous(memory_format=torch.channels_last_3d)
            t = side_by_side_ms({"ux": ux, "nc": lambda: pt(x_nc, g_nc), "cl": lambda: pt(x_cl, g_cl)}, rounds, round_s)
            print_row("fwd+bwd", f"{n}x{c}x{s}^3 k={k}", layout, t["ux"], t["nc"], t["cl"], flops)


HEADER = (
    "| pass | shape | input layout | uxnet ms | F.conv3d NCDHW ms | F.conv3d CL3d ms | uxnet GFLOP/s "
    "| vs faster torch | vs NCDHW |\n|---|---|---|---|---|---|---|---|---|"
)


def print_row(kind, shape, layout, t_ux, t_nc, t_cl, flops):
    best = min(t_nc, t_cl)
    print(
        f"| {kind} | {shape} | {layout} | {t_ux:.2f} | {t_nc:.2f} | {t_cl:.2f} | {flops / t_ux / 1e6:.0f} "
        f"| {best / t_ux:.2f}x | {t_nc / t_ux:.2f}x |",
        flush=True,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--suite", choices=("fwd", "fwdbwd", "all"), default="all")
    parser.add_argument("--library", default="")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-seconds", type=float, default=0.2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ops = load_ops(args.library)
    isa = os.environ.get("UXNET_CPU_ISA", "auto")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, UXNET_CPU_ISA={isa}")
    print(HEADER, flush=True)
    if args.suite in ("fwdbwd", "all"):
        bench_fwdbwd(ops, FWDBWD_CASES, args.rounds, args.round_seconds)
    if args.suite in ("fwd", "all"):
        bench_forward(ops, FWD_CASES, args.rounds, args.round_seconds)


if __name__ == "__main__":
    main()
