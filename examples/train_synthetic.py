"""Train UXNet inside a MONAI pipeline on a synthetic 3D segmentation dataset (needs ``pip install 'uxnet[monai]'``).

The dataset: CT-like volumes (Hounsfield-ish intensities) holding several ellipsoidal "organs" of different
intensities at random positions, sizes and orientations, under a smooth multiplicative bias field and Gaussian
noise, each saved as NIfTI (image and label) with its own voxel spacing and origin in the affine. Training uses
MONAI transforms as the official pipelines do (LoadImaged, Orientationd to RAS, Spacingd to a fixed voxel spacing,
intensity windowing, random crops, flips, intensity augmentation), ``DiceCELoss`` (wrapped in
``uxnet.DeepSupervisionLoss`` with ``--deep-supervision``) and AdamW; validation runs ``sliding_window_inference``
(Gaussian blending) on the held-out volumes and reports the Dice of every organ class (MONAI ``DiceMetric``,
background excluded). ``--save`` writes a uxnet checkpoint that records this preprocessing, so ``uxnet segment``
resamples any volume the same way and maps the labels back.

    python examples/train_synthetic.py                      # the documented configuration (see README)
    python examples/train_synthetic.py --steps 40 --size 32  # a quick smoke run
    python examples/train_synthetic.py --deep-supervision --save model.pt --data-dir data
    uxnet segment model.pt data/val000_img.nii.gz -o seg.nii.gz && uxnet evaluate seg.nii.gz data/val000_seg.nii.gz

``main(argv)`` returns the metrics as a dict (used by tests/test_monai_example.py).
"""

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np
import torch

ORGAN_HU = (60.0, 160.0, -90.0)  # mean intensity of organ classes 1, 2, 3 (a liver-, kidney-, fat-like mix)
BACKGROUND_HU = -10.0
WINDOW_HU = (-250.0, 250.0)
CLASS_NAMES = ("background", "liver_like", "kidney_like", "fat_like")
ORIENTATION = "RAS"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="where to write the NIfTI dataset (default: a temp dir)")
    p.add_argument("--n-train", type=int, default=16, help="training volumes")
    p.add_argument("--n-val", type=int, default=4, help="held-out validation volumes")
    p.add_argument("--size", type=int, default=48, help="volume edge in voxels")
    p.add_argument("--roi", type=int, default=32, help="training crop and inference window edge (multiple of 16)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=240, help="optimiser steps")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--feat-size", type=int, nargs=4, default=(8, 16, 32, 64))
    p.add_argument("--depths", type=int, nargs=4, default=(1, 1, 1, 1))
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--kernel-size", type=int, default=7)
    p.add_argument("--spacing", type=float, nargs=3, default=(1.0, 1.0, 1.0), metavar=("X", "Y", "Z"),
                   help="training voxel spacing in mm (volumes are reoriented to RAS and resampled to it)")
    p.add_argument("--no-resample", action="store_true", help="train on each volume's own grid instead")
    p.add_argument("--deep-supervision", action="store_true",
                   help="UXNet(deep_supervision=True) trained with uxnet.DeepSupervisionLoss (nnU-Net weights)")
    p.add_argument("--save", default=None, help="write the trained model and its preprocessing (uxnet checkpoint)")
    p.add_argument("--noise", type=float, default=25.0, help="Gaussian noise sigma in HU")
    p.add_argument("--val-every", type=int, default=0, help="also validate every N steps (0: only at the end)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the metrics to this JSON file")
    return p.parse_args(argv)


# ---- synthetic data ---------------------------------------------------------------------------------------

def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def synthetic_case(rng: np.random.Generator, size: int, noise_hu: float):
    """(image float32 HU, label uint8) of shape (size,) * 3: ellipsoid organs, bias field, noise."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, size)] * 3, indexing="ij"), -1)
    label = np.zeros((size,) * 3, np.uint8)
    body = ((grid / np.array([0.95, 0.85, 0.95])) ** 2).sum(-1) <= 1.0
    image = np.where(body, BACKGROUND_HU, -900.0).astype(np.float32)
    for cls, hu in enumerate(ORGAN_HU, start=1):
        center = rng.uniform(-0.45, 0.45, 3)
        radii = rng.uniform(0.18, 0.38, 3)
        local = (grid - center) @ _rotation(rng)
        inside = ((local / radii) ** 2).sum(-1) <= 1.0
        label[inside] = cls
        image[inside] = hu + rng.normal(0, 10.0)  # per-case organ intensity shift
    coeffs = rng.normal(0, 0.08, (3, 3))
    bias = 1.0 + sum(coeffs[i, j] * grid[..., i] ** (j + 1) for i in range(3) for j in range(2))
    image = image * bias + rng.normal(0, noise_hu, image.shape)
    return image.astype(np.float32), label


def write_dataset(root: str, n: int, size: int, noise_hu: float, seed: int, prefix: str) -> List[Dict[str, str]]:
    import nibabel as nib

    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        image, label = synthetic_case(rng, size, noise_hu)
        spacing = rng.uniform(0.7, 1.6, 3)
        affine = np.diag([*spacing, 1.0])
        affine[:3, 3] = rng.uniform(-200, 200, 3)
        paths = {"image": os.path.join(root, f"{prefix}{i:03d}_img.nii.gz"),
                 "label": os.path.join(root, f"{prefix}{i:03d}_seg.nii.gz")}
        nib.save(nib.Nifti1Image(image, affine), paths["image"])
        nib.save(nib.Nifti1Image(label, affine), paths["label"])
        items.append(paths)
    return items


# ---- MONAI pipeline -----------------------------------------------------------------------------------------

def preprocessing(args):
    """What the model is trained with, as ``uxnet segment`` will apply it (recorded by ``--save``)."""
    from uxnet.preprocessing import Preprocessing

    return Preprocessing(
        spacing=None if args.no_resample else tuple(args.spacing),
        orientation=None if args.no_resample else ORIENTATION,
        intensity_range=WINDOW_HU, output_range=(0.0, 1.0), clip=True,
        roi_size=(args.roi,) * 3, class_names=CLASS_NAMES,
    )


def load_transforms(prep):
    """Deterministic loading (cached by CacheDataset): NIfTI -> channel-first -> RAS at ``prep.spacing`` (bilinear
    image, nearest label) -> CT window [-250, 250] -> [0, 1] -> padded to at least the ROI."""
    from monai import transforms as T

    keys = ["image", "label"]
    spatial = [] if not prep.resamples else [
        T.Orientationd(keys=keys, axcodes=prep.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        T.Spacingd(keys=keys, pixdim=prep.spacing, mode=("bilinear", "nearest"), padding_mode="border"),
    ]
    a_min, a_max = prep.intensity_range
    b_min, b_max = prep.output_range
    return T.Compose([
        T.LoadImaged(keys=keys),
        T.EnsureChannelFirstd(keys=keys),
        *spatial,
        T.ScaleIntensityRanged(keys="image", a_min=a_min, a_max=a_max, b_min=b_min, b_max=b_max, clip=prep.clip),
        T.SpatialPadd(keys=keys, spatial_size=prep.roi_size),
        T.EnsureTyped(keys=keys, track_meta=False),
    ])


def augment_transforms(roi: int):
    """Random crop to the ROI, flips on every axis, intensity scaling and shifting (as in the paper)."""
    from monai import transforms as T

    return T.Compose([
        T.RandSpatialCropd(keys=["image", "label"], roi_size=(roi,) * 3, random_size=False),
        T.RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
        T.RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=1),
        T.RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=2),
        T.RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        T.RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
    ])


def evaluate(model, loader, roi: int, num_classes: int) -> List[float]:
    """Dice per organ class (background excluded) over the loader's volumes, with sliding-window inference."""
    from monai.inferers import sliding_window_inference
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    metric = DiceMetric(include_background=False, reduction="mean_batch")
    model.eval()
    with torch.no_grad():
        for batch in loader:
            logits = sliding_window_inference(batch["image"], (roi,) * 3, 4, model, overlap=0.25, mode="gaussian")
            pred = one_hot(logits.argmax(1, keepdim=True), num_classes)
            metric(pred, one_hot(batch["label"].long(), num_classes))
    dice = metric.aggregate().tolist()
    model.train()
    return dice


def _as_lists(items: List[dict]) -> Dict[str, list]:
    return {key: [item[key] for item in items] for key in items[0]}


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    args = parse_args(argv)
    from monai.data import CacheDataset, DataLoader
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism

    from uxnet import DeepSupervisionLoss, UXNet, save_checkpoint

    if args.roi % 16 or args.roi > args.size:
        raise SystemExit(f"--roi must be a multiple of 16 and <= --size, got {args.roi}")
    if args.threads:
        torch.set_num_threads(args.threads)
    set_determinism(seed=args.seed)
    start = time.perf_counter()
    num_classes = len(ORGAN_HU) + 1
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_dir or tmp
        os.makedirs(root, exist_ok=True)
        train_items = write_dataset(root, args.n_train, args.size, args.noise, args.seed, "train")
        val_items = write_dataset(root, args.n_val, args.size, args.noise, args.seed + 10_000, "val")
        # every volume is loaded into memory here, so the temporary directory may go afterwards
        prep = preprocessing(args)
        train_ds = CacheDataset(train_items, load_transforms(prep), cache_rate=1.0, progress=False)
        val_ds = CacheDataset(val_items, load_transforms(prep), cache_rate=1.0, progress=False)
    data_s = time.perf_counter() - start
    augment = augment_transforms(args.roi)
    # resampled volumes differ in size: batches are lists, cropped to the ROI one by one below
    loader = DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, num_workers=0, drop_last=True,
                        collate_fn=_as_lists)
    val_loader = DataLoader(val_ds, batch_size=1, num_workers=0)

    model = UXNet(in_chans=1, out_chans=num_classes, depths=args.depths, feat_size=args.feat_size,
                  hidden_size=args.hidden_size, kernel_size=args.kernel_size, deep_supervision=args.deep_supervision)
    # with deep supervision the model returns [full, 1/2, 1/4, 1/8] logits in training mode; the loss weights them
    loss_fn = DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)

    dice_untrained = evaluate(model, val_loader, args.roi, num_classes)
    losses, history = [], []
    train_start = time.perf_counter()
    step = 0
    while step < args.steps:
        for batch in loader:
            if step >= args.steps:
                break
            crops = [augment({"image": im, "label": lb}) for im, lb in zip(batch["image"], batch["label"])]
            x = torch.stack([c["image"] for c in crops])
            y = torch.stack([c["label"] for c in crops])
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
            if step % 20 == 0 or step == args.steps:
                print(f"step {step}/{args.steps}  loss {np.mean(losses[-20:]):.4f}  "
                      f"{time.perf_counter() - train_start:.0f} s", flush=True)
            if args.val_every and step % args.val_every == 0 and step < args.steps:
                dice = evaluate(model, val_loader, args.roi, num_classes)
                history.append({"step": step, "dice": dice})
                print(f"  val dice {np.round(dice, 3).tolist()} mean {np.mean(dice):.3f}", flush=True)
    train_s = time.perf_counter() - train_start
    dice = evaluate(model, val_loader, args.roi, num_classes)
    result = {
        "dice_per_class": dice,
        "mean_dice": float(np.mean(dice)),
        "dice_untrained": dice_untrained,
        "mean_dice_untrained": float(np.mean(dice_untrained)),
        "losses": losses,
        "history": history,
        "train_seconds": train_s,
        "total_seconds": time.perf_counter() - start,
        "data_seconds": data_s,
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "threads": torch.get_num_threads(),
        "preprocessing": prep.to_dict(),
    }
    if args.save:
        result["checkpoint"] = str(save_checkpoint(model, args.save, prep))
    print(f"held-out Dice per class {np.round(dice, 4).tolist()}  mean {result['mean_dice']:.4f} "
          f"(untrained {result['mean_dice_untrained']:.4f}); training {train_s:.0f} s, "
          f"total {result['total_seconds']:.0f} s" + (f"; saved {result['checkpoint']}" if args.save else ""),
          flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: v for k, v in result.items() if k != "losses"}, f, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
