"""CPU LayerNorm and fused UX MLP: forward+backward time of the compiled kernels vs the reference ops, the
bandwidth floor of each case, and the activation bytes autograd saves for one UX block tail on each path.

    python benchmarks/scripts/cpu_ln_mlp.py [--shapes 48x32 96x24] [--min-run-time 1.0] [--json out.json]

Both paths run in the same process, in interleaved rounds per case (uxnet/timing.py's ``interleaved``); times are
medians over the rounds.
"""

import argparse
import json
import platform

import torch

import uxnet_kernels  # noqa: F401  (loads the compiled ops and their autograd)
from checkout_timing import timing
from uxnet_kernels import _extension, reference

COPY_BANDWIDTH = 42e9  # bytes/s, measured copy bandwidth of the dev machine (docs/PERFORMANCE.md)
EPS = 1e-6
ROUNDS = 5
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}


def block_tail_inputs(channels, size, layout, dtype=torch.float32, seed=0):
    """(y, residual, ln_weight, ln_bias, w1, b1, w2, b2, gamma), all requiring grad, as in a training step."""
    gen = torch.Generator().manual_seed(seed)
    shape = (1, channels, size, size, size)

    def rand(*s, scale=1.0):
        return (torch.randn(*s, generator=gen) * scale).to(dtype)

    y = rand(*shape).contiguous(memory_format=LAYOUTS[layout])
    res = rand(*shape).contiguous(memory_format=LAYOUTS[layout])
    params = [1 + rand(channels, scale=0.1), rand(channels, scale=0.1), rand(channels, 4), rand(channels, 4, scale=0.1),
              rand(channels, 4, scale=0.5), rand(channels, scale=0.1), rand(channels)]
    return [t.requires_grad_() for t in [y, res] + params]


def ux_mlp_compiled(y, res, lnw, lnb, w1, b1, w2, b2, gamma):
    return torch.ops.uxnet.ux_mlp(y, res, lnw, lnb, w1, b1, w2, b2, gamma, EPS)[0]


def ux_mlp_reference(y, res, lnw, lnb, w1, b1, w2, b2, gamma):
    return reference.ux_mlp(y, res, lnw, lnb, w1, b1, w2, b2, gamma, EPS)


def layer_norm_compiled(x, w, b):
    return torch.ops.uxnet.layer_norm_channels_first(x, w, b, EPS)[0]


def layer_norm_reference(x, w, b):
    return reference.layer_norm_channels_first(x, w, b, EPS)


def floor_seconds(op, channels, voxels, elem_bytes=4, stat_bytes=4):
    """Each activation read and written once, forward + backward, at the copy bandwidth.

    ux_mlp: forward reads y, residual, writes out and the two stats; backward reads grad_out, y and the stats and
    writes grad_y (grad_residual is grad_out itself). layer_norm: forward reads x, writes out and the stats;
    backward reads grad_out, x and the stats and writes grad_x.
    """
    tensors = 6 if op == "ux_mlp" else 5
    return (tensors * channels * voxels * elem_bytes + 4 * voxels * stat_bytes) / COPY_BANDWIDTH


def fwd_bwd_step(fn, args):
    """One forward + backward of fn(*args), the gradients reset first."""
    layout = torch.contiguous_format if args[0].is_contiguous() else torch.channels_last_3d
    grad_out = torch.randn(args[0].shape).contiguous(memory_format=layout)

    def step():
        for a in args:
            a.grad = None
        fn(*args).backward(grad_out)

    return step


def saved_activation_bytes(fn, args):
    """Bytes of the distinct storages autograd saves for backward in one forward of fn, minus the inputs'."""
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    input_ptrs = {a.untyped_storage().data_ptr() for a in args if a is not None}
    total = sum(saved.values())
    beyond_inputs = sum(n for ptr, n in saved.items() if ptr not in input_ptrs)
    del out
    return total, beyond_inputs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["48x32", "96x24"], help="CxS for (1, C, S, S, S)")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per path and case")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if not (_extension.has_kernel("ux_mlp", "CPU") and _extension.has_kernel("layer_norm_channels_first", "CPU")):
        raise SystemExit("the compiled CPU kernels of ux_mlp / layer_norm_channels_first are not available; build the "
                         "extension")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    rows = []
    header = (f"{'op':<11}{'shape':<11}{'layout':<18}{'compiled ms':>12}{'reference ms':>14}{'speedup':>9}"
              f"{'floor ms':>10}")
    print(header)
    for spec in args.shapes:
        channels, size = (int(v) for v in spec.split("x"))
        voxels = size ** 3
        for layout in LAYOUTS:
            inputs = block_tail_inputs(channels, size, layout)
            cases = [
                ("ux_mlp", ux_mlp_compiled, ux_mlp_reference, inputs),
                ("layer_norm", layer_norm_compiled, layer_norm_reference, [inputs[0], inputs[2], inputs[3]]),
            ]
            for op, fast, slow, op_args in cases:
                times = timing.interleaved({"compiled": fwd_bwd_step(fast, op_args),
                                            "reference": fwd_bwd_step(slow, op_args)},
                                           rounds=ROUNDS, round_s=args.min_run_time / ROUNDS)
                t_fast, t_slow = times["compiled"].median_s, times["reference"].median_s
                floor = floor_seconds(op, channels, voxels)
                row = dict(op=op, channels=channels, size=size, layout=layout, compiled_s=t_fast, reference_s=t_slow,
                           speedup=t_slow / t_fast, floor_s=floor)
                rows.append(row)
                print(f"{op:<11}{f'{channels}x{size}^3':<11}{layout:<18}{t_fast * 1e3:>12.2f}{t_slow * 1e3:>14.2f}"
                      f"{t_slow / t_fast:>8.1f}x{floor * 1e3:>10.2f}")

    channels, size = (int(v) for v in args.shapes[0].split("x"))
    inputs = block_tail_inputs(channels, size, "channels_last_3d")
    memory = {}
    for name, fn in (("compiled", ux_mlp_compiled), ("reference", ux_mlp_reference)):
        total, beyond = saved_activation_bytes(fn, inputs)
        memory[name] = dict(saved_bytes=total, saved_beyond_inputs_bytes=beyond)
    activation = channels * size ** 3 * 4
    print(f"\nsaved for backward by one UX block tail at {channels}x{size}^3 fp32 "
          f"(one activation = {activation / 2**20:.1f} MiB):")
    for name, m in memory.items():
        print(f"  {name:<10} {m['saved_bytes'] / 2**20:8.1f} MiB in all, "
              f"{m['saved_beyond_inputs_bytes'] / 2**20:8.1f} MiB beyond the inputs")
    saved = memory["reference"]["saved_bytes"] - memory["compiled"]["saved_bytes"]
    print(f"  saved by the fused backward: {saved / 2**20:.1f} MiB ({saved / activation:.1f} activations)")
    if args.json:
        with open(args.json, "w") as f:
            result = dict(torch=torch.__version__, threads=torch.get_num_threads(), timings=rows, saved_tensors=memory)
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
