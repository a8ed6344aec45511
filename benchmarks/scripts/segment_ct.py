"""A whole CT, end to end: ``uxnet segment`` (its seconds per stage and peak memory) next to the official pipeline
(MONAI transforms, ``sliding_window_inference`` and ``Invertd``, as the official ``test_seg.py`` does), with the same
network weights in both, so the difference is the pipeline around the network.

    python benchmarks/scripts/segment_ct.py [--shape 512 512 200] [--spacing 0.8 0.8 2.5] [--target 1.5 1.5 1.5]
        [--overlap 0.5] [--feat-size 48 96 192 384] [--hidden-size 768] [--json out.json]

The CT is synthetic (soft tissue, a body outline, a few organ-like ellipsoids, air outside), written as int16 NIfTI
with a rescale slope like a scanner's. Each route runs in this process, uxnet first, then official; peak memory is
the RSS high-water mark of the route (uxnet.memory.tracker), so run one route per process (``--route``) for
independent peaks.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

ROUTES = ("uxnet", "official")


def synthetic_ct(shape, spacing, seed=0):
    """int16 Hounsfield-like volume: air outside an elliptic body, soft tissue with noise, brighter ellipsoids."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[(np.arange(n) - n / 2) * s for n, s in zip(shape, spacing)], indexing="ij")
    body = (grid[0] / (0.42 * shape[0] * spacing[0])) ** 2 + (grid[1] / (0.35 * shape[1] * spacing[1])) ** 2 < 1
    hu = np.where(body, 40.0, -1000.0) + rng.normal(0, 20, shape)
    for _ in range(6):
        centre = [rng.uniform(-0.2, 0.2) * n * s for n, s in zip(shape, spacing)]
        radii = [rng.uniform(20, 60) for _ in shape]
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) < 1
        hu[inside & body] += rng.uniform(40, 200)
    return np.round(hu + 1024).astype(np.int16)  # stored with slope 1, intercept -1024


def write_ct(path, shape, spacing):
    import nibabel as nib

    image = nib.Nifti1Image(synthetic_ct(shape, spacing), np.diag([*spacing, 1.0]))
    image.header.set_slope_inter(1.0, -1024.0)
    nib.save(image, path)


def make_checkpoint(path, args):
    import uxnet
    from uxnet.preprocessing import Preprocessing

    torch.manual_seed(0)
    model = uxnet.UXNet(in_chans=1, out_chans=args.out_chans, feat_size=tuple(args.feat_size),
                        hidden_size=args.hidden_size)
    prep = Preprocessing(spacing=tuple(args.target), orientation="RAS", intensity_range=(-175.0, 250.0),
                         output_range=(0.0, 1.0), clip=True, roi_size=(args.roi,) * 3)
    uxnet.save_checkpoint(model, path, preprocessing=prep)
    return model


def run_uxnet(ckpt, ct, out, args):
    from uxnet import cli

    argv = ["segment", ckpt, ct, "-o", out, "--overlap", str(args.overlap), "--device", "cpu"]
    start = time.perf_counter()
    code = cli.main(argv)
    if code != 0:
        raise SystemExit(f"uxnet segment failed with exit code {code}")
    return {"total_s": time.perf_counter() - start}


def run_official(model, ct, out_dir, args):
    """MONAI's dictionary pipeline as the official test_seg.py runs it, around the same network."""
    from monai import transforms as T
    from monai.inferers import sliding_window_inference

    stages = {}
    clock = time.perf_counter
    start = clock()
    pre = T.Compose([
        T.LoadImaged(keys="image"),
        T.EnsureChannelFirstd(keys="image"),
        T.Orientationd(keys="image", axcodes="RAS"),
        T.Spacingd(keys="image", pixdim=tuple(args.target), mode="bilinear"),
        T.ScaleIntensityRanged(keys="image", a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True),
    ])
    t = clock()
    data = pre({"image": ct})
    stages["load+resample+intensity"] = clock() - t
    model = model.eval()
    network = [0.0]

    def predictor(x):
        t0 = clock()
        y = model(x)
        network[0] += clock() - t0
        return y

    t = clock()
    with torch.inference_mode():
        data["pred"] = sliding_window_inference(data["image"][None], (args.roi,) * 3, 1, predictor,
                                                overlap=args.overlap, mode="gaussian")[0]
    stages["network"] = network[0]
    stages["stitch"] = clock() - t - network[0]
    post = T.Compose([
        T.Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
        T.AsDiscreted(keys="pred", argmax=True),
    ])
    t = clock()
    data = post(data)
    stages["invert"] = clock() - t
    t = clock()
    T.SaveImage(output_dir=out_dir, output_postfix="seg", separate_folder=False, output_dtype=np.uint8,
                print_log=False)(data["pred"])
    stages["write"] = clock() - t
    stages["total_s"] = clock() - start
    return stages


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 200))
    parser.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 2.5))
    parser.add_argument("--target", type=float, nargs=3, default=(1.5, 1.5, 1.5))
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--roi", type=int, default=96)
    parser.add_argument("--out-chans", type=int, default=14)
    parser.add_argument("--feat-size", type=int, nargs=4, default=(48, 96, 192, 384))
    parser.add_argument("--hidden-size", type=int, default=768)
    parser.add_argument("--route", choices=ROUTES + ("both",), default="both")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from uxnet.memory.tracker import PeakMemoryTracker

    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}; CT {tuple(args.shape)} at "
          f"{tuple(args.spacing)} mm -> {tuple(args.target)} mm, overlap {args.overlap}, "
          f"ROI {args.roi}, feat_size {tuple(args.feat_size)}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ct, ckpt = os.path.join(tmp, "ct.nii.gz"), os.path.join(tmp, "model.pt")
        write_ct(ct, args.shape, args.spacing)
        model = make_checkpoint(ckpt, args)
        for route in ROUTES if args.route == "both" else (args.route,):
            with PeakMemoryTracker(torch.device("cpu")) as tracker:
                if route == "uxnet":
                    row = run_uxnet(ckpt, ct, os.path.join(tmp, "uxnet_seg.nii.gz"), args)
                else:
                    row = run_official(model, ct, tmp, args)
            row["peak"] = str(tracker.result)
            results[route] = row
            print(f"{route}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in row.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
