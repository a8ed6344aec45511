"""One UXNet training step (forward + backward + SGD step, float32), the official-equivalent model against uxnet's
variants, measured side by side: interleaved rounds in one process, medians, and the saved activations of each
variant (unique storages kept for backward, parameters excluded) from a saved-tensor hook pass.

    PYTHONPATH=. python benchmarks/scripts/train_step.py --size 64 --rounds 5
    PYTHONPATH=. python benchmarks/scripts/train_step.py --size 48 --variants official uxnet uxnet-ckpt

Variants: official (UXNet(fused_decoder=False) on the reference backend: the official model's computation, op for
op), uxnet (the default UXNet on the fast backend), uxnet-ckpt (activation_checkpointing=True, selective),
uxnet-ckpt-full ("full"), uxnet-cl (uxnet with the model and input in channels_last_3d), uxnet-unfused
(fused_decoder=False on the fast backend), uxnet-cat (the up blocks concatenate the skip connection instead of
splitting conv1/conv3 over the two halves), uxnet-nofold (conv1 of the full-resolution up block reads the upsampled
tensor instead of folding the transposed conv into its kernel), uxnet-onednn (``winograd=False``: the UNETR blocks'
3x3x3 convolutions on oneDNN instead of the Winograd kernel). Peak memory needs fresh processes:
`python examples/training_memory.py`.

Printed per variant: the median and fastest step, the ratio of the medians to the first variant's, and the paired
ratio (the median over rounds of the first variant's step / this one's in the same round).
"""

import argparse
import json
import statistics

import torch

import uxnet_kernels as uk
from uxnet import UXNet
from uxnet.timing import interleaved

VARIANTS = {
    "official": ("reference", dict(fused_decoder=False), False),
    "uxnet": ("auto", {}, False),
    "uxnet-ckpt": ("auto", dict(activation_checkpointing=True), False),
    "uxnet-ckpt-full": ("auto", dict(activation_checkpointing="full"), False),
    "uxnet-cl": ("auto", {}, True),
    "uxnet-unfused": ("auto", dict(fused_decoder=False), False),
    "uxnet-cat": ("auto", {}, False),  # the up blocks concatenate instead of splitting conv1/conv3 (split_concat)
    "uxnet-nofold": ("auto", {}, False),  # conv1 reads the upsampled tensor (no fold_upsample)
    "uxnet-onednn": ("auto", dict(winograd=False), False),  # the UNETR 3x3x3 convolutions on oneDNN, not Winograd
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=64, help="cubic input edge (multiple of 16)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--out-chans", type=int, default=14)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--variants", nargs="+", default=["official", "uxnet", "uxnet-ckpt"], choices=sorted(VARIANTS))
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def saved_activation_bytes(model: torch.nn.Module, step) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(backward=False)
    return sum(storages.values())


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    reference = UXNet(in_chans=1, out_chans=args.out_chans)
    x = torch.randn(args.batch, 1, *(args.size,) * 3)
    y = torch.randint(0, args.out_chans, (args.batch, *(args.size,) * 3))
    steps = {}
    for name in args.variants:
        backend, kwargs, channels_last = VARIANTS[name]
        model = UXNet(in_chans=1, out_chans=args.out_chans, **kwargs)
        model.load_state_dict(reference.state_dict())
        for block in model.modules():
            if name == "uxnet-cat" and hasattr(block, "split_concat"):
                block.split_concat = False
            if name == "uxnet-nofold" and hasattr(block, "fold_upsample"):
                block.fold_upsample = False
        inp = x
        if channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
            inp = x.contiguous(memory_format=torch.channels_last_3d)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step(backward=True, model=model, inp=inp, opt=opt, backend=backend):
            with uk.use_backend(backend):
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(model(inp), y)
                if backward:
                    loss.backward()
                    opt.step()

        steps[name] = (model, step)
    results = {name: {"saved_activation_bytes": saved_activation_bytes(model, step)}
               for name, (model, step) in steps.items()}
    timings = interleaved({name: step for name, (_, step) in steps.items()}, rounds=args.rounds)
    for name, timing in timings.items():
        results[name]["times_s"] = list(timing.times_s)
    base = results.get("official") or next(iter(results.values()))
    base_time = statistics.median(base["times_s"])
    print(f"{args.batch}x1x{args.size}^3, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds")
    print(f"{'variant':16s} {'median step':>12s} {'min step':>9s} {'speed-up':>9s} {'paired':>7s} "
          f"{'saved activations':>18s} {'vs official':>11s}")
    for name, r in results.items():
        r["median_s"] = statistics.median(r["times_s"])
        r["min_s"] = min(r["times_s"])
        r["speedup_vs_first"] = base_time / r["median_s"]
        # the median over rounds of the first variant's step / this one's in the same round: drifts of a shared
        # machine's load cancel within a round
        r["paired_speedup_vs_first"] = statistics.median(b / t for b, t in zip(base["times_s"], r["times_s"]))
        r["saved_ratio_vs_first"] = r["saved_activation_bytes"] / base["saved_activation_bytes"]
        print(f"{name:16s} {r['median_s']:11.2f}s {r['min_s']:8.2f}s {r['speedup_vs_first']:8.2f}x "
              f"{r['paired_speedup_vs_first']:6.2f}x {r['saved_activation_bytes'] / 2**20:14.0f} MiB "
              f"{r['saved_ratio_vs_first']:10.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "batch": args.batch, "threads": torch.get_num_threads(),
                       "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
