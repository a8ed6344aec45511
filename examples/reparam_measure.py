"""Parameters, FLOPs and CPU inference latency of a UXNet trained with branches vs its re-parameterised export.

    python examples/reparam_measure.py [--size 64] [--repeats 5] [--branches "3,1 5,1 3,2"] [--prior]

Three variants of the same function, measured in one run:
  separate  - the training-time model with each branch run as its own dilated depthwise conv (RepLKNet style)
  merged    - the training-time model as uxnet runs it: branches merged into one kernel inside every forward
  exported  - uxnet.reparameterize(model): the plain official architecture, folds applied
FLOPs come from torch.utils.flop_counter.FlopCounterMode (convolutions and matmuls; element-wise work such as
the per-forward kernel merge is not counted). Latency: median of --repeats forwards, variants interleaved.
"""

import argparse
import copy
import json
import types

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import uxnet_kernels as uk
from uxnet import UXBlock, UXNet, count_parameters, reparameterize
from uxnet.timing import interleaved


def separate_branch_conv(block, x):
    """The block's large-kernel conv with each branch as its own dilated depthwise conv."""
    channels = x.shape[1]
    weight = block.dwconv.weight
    if block.kernel_prior_mask is not None:
        weight = weight * block.kernel_prior_mask.to(weight.dtype)
    y = uk.dwconv3d(x, weight, block.dwconv.bias)
    for branch in block.rep_branches:
        d = branch.dilation
        y = y + F.conv3d(x, branch.scaled_weight(), branch.bias, dilation=d, groups=channels,
                         padding=[d * (k // 2) for k in branch.kernel_size])
    return y


def with_separate_branches(model):
    for stage in model.uxnet_3d.stages:
        for block in stage:
            block.large_kernel_conv = types.MethodType(separate_branch_conv, block)
    return model


def flops(model, shape):
    x = torch.empty(shape, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), uk.use_backend("reference"):
        model.to("meta")(x)
    return counter.get_total_flops()


def median_latency(models, x, repeats):
    with torch.no_grad():
        timings = interleaved({name: (lambda m=m: m(x)) for name, m in models.items()}, rounds=repeats)
    return {name: t.median_s for name, t in timings.items()}


def block_variants(config, channels):
    """One UX block of the stage-1 width in the three variants (same function)."""
    block = UXBlock(channels, kernel_size=7, rep_branches=config["rep_branches"],
                    kernel_prior=config["kernel_prior"]).eval()
    with torch.no_grad():
        block.gamma.uniform_(0.5, 1.5)
    separate = copy.deepcopy(block)
    separate.large_kernel_conv = types.MethodType(separate_branch_conv, separate)
    plain = UXBlock(channels, kernel_size=7).eval()
    weight, bias = block.effective_kernel()
    plain.load_state_dict({k: v for k, v in block.state_dict().items() if k in plain.state_dict()})
    with torch.no_grad():
        plain.dwconv.weight.copy_(weight)
        plain.dwconv.bias.copy_(bias)
    return {"separate": separate, "merged": block, "exported": plain}


def parse_branches(text):
    return [tuple(int(v) for v in item.split(",")) for item in text.split()]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="cubic input size for latency (multiple of 16)")
    parser.add_argument("--flops-size", type=int, default=96, help="cubic input size for FLOPs (meta tensors)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--branches", default="3,1 5,1 3,2", help='"k,d k,d ..."')
    parser.add_argument("--prior", action="store_true", help="also train with kernel_prior='distance'")
    parser.add_argument("--out-chans", type=int, default=14)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--skip-model-latency", action="store_true", help="only the block-level latency")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = dict(in_chans=1, out_chans=args.out_chans, rep_branches=parse_branches(args.branches),
                  kernel_prior="distance" if args.prior else None)
    trained = UXNet(**config).eval()
    with torch.no_grad():  # trained-looking layer scales, so the blocks matter in the error check
        for block in (b for stage in trained.uxnet_3d.stages for b in stage):
            block.gamma.uniform_(0.5, 1.5)
    exported = reparameterize(trained)
    separate = with_separate_branches(UXNet(**config).eval())
    separate.load_state_dict(trained.state_dict())

    flop_shape = (1, 1) + (args.flops_size,) * 3
    result = {
        "config": {k: v for k, v in config.items() if v is not None},
        "threads": torch.get_num_threads(),
        "backend": uk.backend_report("cpu")["would_use"],
        "params": {"training (with branches)": count_parameters(trained), "exported": count_parameters(exported)},
        "flops_input": list(flop_shape),
    }
    latency_shape = (1, 1) + (args.size,) * 3
    x = torch.randn(latency_shape)
    result["latency_input"] = list(latency_shape)
    if not args.skip_model_latency:
        result["latency_s"] = median_latency({"separate": separate, "merged": trained, "exported": exported}, x,
                                             args.repeats)
    block_shape = (1, 48, args.size // 2, args.size // 2, args.size // 2)
    blocks = block_variants(config, 48)
    xb = torch.randn(block_shape)
    result["block_input"] = list(block_shape)
    result["block_latency_s"] = median_latency(blocks, xb, 5 * args.repeats)
    with torch.no_grad():
        result["block_flops"] = {name: flops(copy.deepcopy(m), block_shape) for name, m in blocks.items()}
        ref = separate(x)
        result["max_rel_error_exported_vs_separate"] = ((exported(x) - ref).norm() / ref.norm()).item()
    result["flops"] = {name: flops(copy.deepcopy(m), flop_shape)
                       for name, m in (("separate", separate), ("merged", trained), ("exported", exported))}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
