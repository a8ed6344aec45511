"""The ``uxnet train`` data pipeline against the official 3D UX-Net transform chain on CT-sized volumes: random
crops per second per CPU worker, both chains in the same process, interleaved rounds.

    PYTHONPATH=. python benchmarks/scripts/train_data.py                        # 512x512x120 at 0.8x0.8x2.5 mm
    PYTHONPATH=. python benchmarks/scripts/train_data.py --volumes 2 --samples 6 --rounds 3 --json out.json

Both chains are the official recipe (``uxnet/training/recipe.py``): RAS, spacing 1.0x1.0x1.2 mm, CT window
-125..275 -> 0..1, crop to the foreground, 2 pos/neg crops of 96^3 per volume, intensity shift, affine. Both cache
the deterministic part once per volume, as the official ``main_train.py`` does with its CacheDataset (MONAI caches up
to the first random transform): the official chain up to ``CropForegroundd``, uxnet's ``load_transforms`` (which
also finds the crop-centre candidates once, ``FgBgToIndicesd``, and keeps the label as uint8). What is timed is the
per-sample random part, which is what the data workers run for every training step:

* official: RandCropByPosNegLabeld scanning the whole resampled label for its fg/bg indices on every sample,
  RandShiftIntensityd, RandAffined (a new grid per sample), ToTensord, all on MetaTensors;
* uxnet: ``augment_transforms`` (RandCropByPosNegLabeld from the cached indices, RandShiftIntensityd, RandAffined with
  a cached grid).

One worker = one process with one torch thread (``torch.set_num_threads(1)``), as each DataLoader worker is. The
printed arithmetic: the workers that feed one H100 at a step time estimated from the model's training FLOPs
(``uxnet.bench.flops``; no H100 step was measured here) for the official step (2 crops of 96^3 per GPU).
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs=3, default=(512, 512, 120))
    p.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 2.5), help="of the synthetic volumes (mm)")
    p.add_argument("--volumes", type=int, default=2)
    p.add_argument("--samples", type=int, default=4, help="samples (volumes drawn) per chain and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--roi", type=int, default=96)
    p.add_argument("--dir", help="where to write the synthetic NIfTI volumes (default: a temporary folder)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def ct_volume(rng, shape):
    """(image int16 HU, label uint8): air around an elliptic body (soft tissue ~40 HU, noise), a liver-, a kidney-,
    a spleen-like ellipsoid (classes 1..3) and bone-like rim; the body fills ~60 % of the volume as in abdominal CT."""
    grids = np.ogrid[tuple(slice(-1, 1, complex(0, n)) for n in shape)]
    x, y, z = grids
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2 <= 1.0
    body = np.broadcast_to(body, shape)
    image = np.full(shape, -1000, np.int16)
    image[body] = 40
    label = np.zeros(shape, np.uint8)
    for cls, (c, r, hu) in enumerate([((-0.3, -0.1, 0.1), (0.35, 0.3, 0.5), 60), ((0.35, 0.2, 0.0), (0.12, 0.12, 0.25), 150),
                                      ((0.45, -0.3, 0.2), (0.12, 0.1, 0.2), 45)], start=1):
        inside = ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1.0
        label[inside] = cls
        image[inside] = hu
    image += rng.normal(0, 20, shape).astype(np.int16)
    return image, label


def write_volumes(folder, n, shape, spacing, seed):
    import nibabel as nib

    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        image, label = ct_volume(rng, shape)
        affine = np.diag([*spacing, 1.0])
        paths = {"image": os.path.join(folder, f"ct{i}.nii"), "label": os.path.join(folder, f"ct{i}_seg.nii")}
        nib.save(nib.Nifti1Image(image, affine), paths["image"])
        nib.save(nib.Nifti1Image(label, affine), paths["label"])
        cases.append(paths)
    return cases


def split_official(recipe):
    """The official chain as (cached deterministic part, per-sample random part), where MONAI's CacheDataset splits
    it: before the first Randomizable transform."""
    from monai.transforms import Compose, Randomizable

    from uxnet.training.recipe import official_transforms

    chain = official_transforms(recipe).transforms
    k = next(i for i, t in enumerate(chain) if isinstance(t, Randomizable))
    return Compose(chain[:k]), Compose(chain[k:])


def time_chain(chain, cached, samples, seed):
    t0 = time.perf_counter()
    crops = 0
    for s in range(samples):
        chain.set_random_state(seed=seed + s)
        out = chain(dict(cached[s % len(cached)]))
        crops += len(out) if isinstance(out, list) else 1
    return crops / (time.perf_counter() - t0)


def h100_step_estimate(roi: int, crops: int) -> dict:
    """Seconds per step estimated from FLOPs: the forward and backward FLOPs of the official model (in 1, out 14;
    ``uxnet.bench.flops.model_flops``, FlopCounterMode with grouped convolutions counted right) on ``crops`` crops
    of ``roi``^3, at assumed sustained throughputs (the optimizer step is negligible next to it)."""
    from uxnet.bench.flops import DEFAULT_MODEL, model_flops

    fwd = model_flops(DEFAULT_MODEL, patch=(roi,) * 3, batch=1)
    total = model_flops(DEFAULT_MODEL, patch=(roi,) * 3, batch=crops, backward=True)
    # fp32 FMA peak 66.9 TFLOP/s (no TF32); TF32 tensor cores at an assumed 40 % of 494 TFLOP/s; bf16 at 40 % of 989
    rates = {"fp32 at the FMA peak (66.9 TFLOP/s)": 66.9e12, "TF32 at 40 % of peak (198 TFLOP/s)": 0.4 * 494e12,
             "bf16 AMP at 40 % of peak (396 TFLOP/s)": 0.4 * 989e12}
    return {"forward_gflops_per_crop": fwd / 1e9, "step_tflop": total / 1e12,
            "step_s": {name: total / rate for name, rate in rates.items()}}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    from uxnet.training.recipe import Recipe, augment_transforms, load_transforms

    recipe = Recipe(roi=(args.roi,) * 3)
    tmp = None
    folder = args.dir
    if folder is None:
        tmp = tempfile.TemporaryDirectory()
        folder = tmp.name
    os.makedirs(folder, exist_ok=True)
    t0 = time.perf_counter()
    cases = write_volumes(folder, args.volumes, tuple(args.shape), tuple(args.spacing), args.seed)
    print(f"wrote {args.volumes} volumes {tuple(args.shape)} at {tuple(args.spacing)} mm in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)

    off_det, off_rand = split_official(recipe)
    ux_det, ux_rand = load_transforms(recipe), augment_transforms(recipe)
    cache = {"official": [], "uxnet": []}
    prep_s = {"official": [], "uxnet": []}
    for case in cases:
        for name, det in (("official", off_det), ("uxnet", ux_det)):
            t0 = time.perf_counter()
            cache[name].append(det(dict(case)))
            prep_s[name].append(time.perf_counter() - t0)
    shape = tuple(cache["uxnet"][0]["image"].shape)
    print(f"cached (one-time, per volume): official {statistics.mean(prep_s['official']):.2f} s, uxnet "
          f"{statistics.mean(prep_s['uxnet']):.2f} s; resampled and cropped to the foreground: {shape}", flush=True)

    chains = {"official": off_rand, "uxnet": ux_rand}
    for name, chain in chains.items():  # warm-up (grids, allocator)
        time_chain(chain, cache[name], 1, 10_000)
    rates = {name: [] for name in chains}
    for r in range(args.rounds):
        for name, chain in chains.items():
            rates[name].append(time_chain(chain, cache[name], args.samples, 1000 * r))
        print(f"round {r}: " + ", ".join(f"{n} {rates[n][-1]:.2f} crops/s" for n in chains), flush=True)
    med = {n: statistics.median(v) for n, v in rates.items()}
    paired = statistics.median(u / o for u, o in zip(rates["uxnet"], rates["official"]))
    print(f"crops/s per worker (median of {args.rounds} rounds of {args.samples} samples x "
          f"{recipe.crops_per_volume} crops): official {med['official']:.2f}, uxnet {med['uxnet']:.2f}; "
          f"uxnet / official {med['uxnet'] / med['official']:.2f}x (paired {paired:.2f}x)")

    est = h100_step_estimate(args.roi, recipe.crops_per_step)
    print(f"H100 step estimate: {est['step_tflop']:.2f} TFLOP per step ({recipe.crops_per_step} crops of "
          f"{args.roi}^3, {est['forward_gflops_per_crop']:.0f} GFLOP forward per crop)")
    workers = {}
    for how, step_s in est["step_s"].items():
        need = recipe.crops_per_step / step_s
        workers[how] = {n: need / med[n] for n in chains}
        print(f"  {how}: {step_s * 1000:.0f} ms/step -> {need:.0f} crops/s -> workers needed: official "
              f"{workers[how]['official']:.1f}, uxnet {workers[how]['uxnet']:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "prep_s": prep_s, "rates": rates, "median": med, "paired": paired,
                       "cached_shape": shape, "h100_estimate": est, "workers": workers}, f, indent=1)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
