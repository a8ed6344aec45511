"""Argmax agreement of uxnet's fp32 inference routes with a float64 run of the official model, on trained weights.

Random weights give logits whose top two classes are often near ties, so agreement there says little about a
model users deploy. This script trains the default UXNet (the paper's widths, 4 classes) for ``--steps`` AdamW
steps on random crops of the CT-like volumes of ``examples/train_synthetic.py`` (windowed to [0, 1], MONAI's
DiceCELoss), then segments a fresh volume of ``--size``^3 and compares, voxel by voxel:

* the official model in float64 (``UXNet(fused_decoder=False)`` on the reference backend): the truth;
* official fp32 eager; uxnet fp32 eval (Winograd 3x3x3 convolutions, packed weights cached);
* uxnet fp32 with ``winograd=False`` (oneDNN); uxnet under bfloat16 autocast.

    PYTHONPATH=. python benchmarks/scripts/trained_agreement.py [--steps 300] [--roi 48] [--size 96]
        [--save trained.pt] [--load trained.pt]

Needs MONAI (``pip install 'uxnet[monai]'``).
"""

import argparse
import importlib.util
import os
import time

import numpy as np
import torch

import uxnet_kernels as uk
from uxnet import UXNet

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "examples", "train_synthetic.py")
CLASSES = 4


def _example():
    spec = importlib.util.spec_from_file_location("train_synthetic", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _volume(example, rng, size):
    image, label = example.synthetic_case(rng, size, 25.0)
    low, high = example.WINDOW_HU
    image = np.clip((image - low) / (high - low), 0.0, 1.0)
    return torch.from_numpy(image)[None, None], torch.from_numpy(label.astype(np.int64))[None, None]


def train(model, example, steps, roi, seed):
    from monai.losses import DiceCELoss

    rng = np.random.default_rng(seed)
    volumes = [_volume(example, rng, 2 * roi) for _ in range(8)]
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=1e-5)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        image, label = volumes[step % len(volumes)]
        z, y, x = rng.integers(0, roi + 1, 3)
        crop = (slice(None), slice(None), slice(z, z + roi), slice(y, y + roi), slice(x, x + roi))
        loss = loss_fn(model(image[crop]), label[crop])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 25 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  {time.perf_counter() - start:.0f} s", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--roi", type=int, default=48, help="training crop (multiple of 16)")
    parser.add_argument("--size", type=int, default=96, help="the compared volume (multiple of 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", help="write the trained state_dict here")
    parser.add_argument("--load", help="skip training: load this state_dict")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    example = _example()
    model = UXNet(in_chans=1, out_chans=CLASSES)
    if args.load:
        model.load_state_dict(torch.load(args.load, weights_only=True))
    else:
        train(model, example, args.steps, args.roi, args.seed)
        if args.save:
            torch.save(model.state_dict(), args.save)
    state = model.state_dict()
    image, label = _volume(example, np.random.default_rng(args.seed + 1000), args.size)

    def built(**kwargs):
        net = UXNet(in_chans=1, out_chans=CLASSES, **kwargs).eval()
        net.load_state_dict(state)
        return net

    official64, official, winograd, onednn = (built(fused_decoder=False).double(), built(fused_decoder=False),
                                              built(), built(winograd=False))  # outside inference_mode: cached
    with torch.inference_mode():
        with uk.use_backend("reference"):
            truth = official64(image.double())
            routes = {"official eager fp32": official(image)}
        routes["uxnet fp32 (Winograd, cached)"] = winograd(image)
        routes["uxnet fp32 (Winograd, cached), 2nd call"] = winograd(image)
        routes["uxnet fp32 (oneDNN 3x3x3)"] = onednn(image)
        with torch.autocast("cpu", torch.bfloat16):
            routes["uxnet bf16 autocast"] = winograd(image).float()
    labels = truth.argmax(1)
    dice = [(2 * ((labels == c) & (label[:, 0] == c)).sum() / ((labels == c).sum() + (label[:, 0] == c).sum())).item()
            for c in range(1, CLASSES)]
    print(f"\nfloat64 official on a fresh {args.size}^3 volume: Dice per organ class vs its label "
          f"{', '.join(f'{d:.3f}' for d in dice)} (trained {args.steps} steps at {args.roi}^3)")
    print("| route | argmax agreement vs float64 official | disagreeing voxels | max abs logit error |")
    print("|---|---|---|---|")
    for name, logits in routes.items():
        agree = (logits.argmax(1) == labels)
        print(f"| {name} | {100 * agree.double().mean().item():.4f}% | {int((~agree).sum())} of {agree.numel()} | "
              f"{(logits.double() - truth).abs().max().item():.2e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
