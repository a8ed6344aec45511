"""``uxnet train DATA --output RUN_DIR``: train UXNet on a Medical Segmentation Decathlon folder or the official
imagesTr/labelsTr/imagesVal/labelsVal layout, with the official 3D UX-Net recipe on MONAI (``uxnet/training``).

    uxnet train Task09_Spleen --output runs/spleen                  # official recipe, planned to fit the GPU
    uxnet train Task09_Spleen --dry-run                             # check the dataset, print the plan
    uxnet train Task09_Spleen --output runs/spleen --resume runs/spleen
    uxnet train NewTask --output runs/ft --init runs/spleen/best.pt # finetune with a new class count
    torchrun --nproc_per_node 4 -m uxnet.cli train DATA --output RUN_DIR
"""

import sys

EXIT_ERROR = 2


def add_arguments(parser) -> None:
    parser.add_argument("data", help="dataset folder: MSD (dataset.json, imagesTr, labelsTr) or the official layout "
                                     "(imagesTr, labelsTr, imagesVal, labelsVal)")
    parser.add_argument("--output", "-o", metavar="RUN_DIR", help="run folder (last.pt, best.pt, train.csv, val.csv)")
    parser.add_argument("--dry-run", action="store_true", help="check the dataset and print the plan; do not train")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt")
    parser.add_argument("--init", metavar="CHECKPOINT", help="finetune from a uxnet or official checkpoint (the "
                        "output heads are replaced when the class count differs)")
    split = parser.add_argument_group("split (datasets without a validation split)")
    split.add_argument("--val-fraction", type=float, default=0.2, help="held-out fraction (default 0.2)")
    split.add_argument("--fold", type=int, help="hold out fold K of --folds instead")
    split.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    split.add_argument("--seed", type=int, default=0, help="seed of the split, the sample stream and the model init")
    rec = parser.add_argument_group("recipe (default: --recipe official; each flag overrides one part)")
    rec.add_argument("--recipe", choices=("official",), default="official")
    rec.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                     help="voxel spacing in mm (official 1.0 1.0 1.2, FLARE; AMOS 1.5 1.5 2.0)")
    rec.add_argument("--no-resample", action="store_true", help="train on each volume's own grid and orientation")
    rec.add_argument("--orientation", help="orientation code (default RAS)")
    rec.add_argument("--intensity", type=float, nargs=2, metavar=("A", "B"),
                     help="map [A, B] to [0, 1], clipped (default -125 275, CT)")
    rec.add_argument("--percentile-norm", action="store_true",
                     help="instead of --intensity, each volume's 0.5-99.5 percentiles to [0, 1] (MR)")
    rec.add_argument("--roi", type=int, nargs="+", metavar="N", help="crop size: 1 or 3 multiples of 16 (96)")
    rec.add_argument("--batch", type=int, help="volumes per process and step (1)")
    rec.add_argument("--crops-per-volume", type=int, help="random crops per volume (2)")
    rec.add_argument("--flip-prob", type=float, help="random flip per axis with this probability (0: the official "
                     "recipe has none)")
    rec.add_argument("--lr", type=float, help="AdamW learning rate (1e-4)")
    rec.add_argument("--weight-decay", type=float, help="AdamW weight decay (0.01)")
    rec.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant")
    rec.add_argument("--iterations", type=int, help="training steps (40000)")
    rec.add_argument("--val-every", type=int, help="validate every N steps (500)")
    rec.add_argument("--overlap", type=float, help="sliding-window overlap in validation (0.25)")
    rec.add_argument("--sw-batch", type=int, help="windows per forward in validation (2)")
    mod = parser.add_argument_group("model (default: the official UXNet, or the --init checkpoint's)")
    mod.add_argument("--feat-size", type=int, nargs=4, metavar="C")
    mod.add_argument("--hidden-size", type=int)
    mod.add_argument("--depths", type=int, nargs=4, metavar="D")
    mod.add_argument("--kernel-size", type=int)
    mod.add_argument("--rep-branches", type=int, nargs="+", metavar="K,D",
                     help="training-time branches as pairs of kernel size and dilation, e.g. 3 1 3 2 (each spans at "
                     "most --kernel-size)")
    mod.add_argument("--deep-supervision", action="store_true", help="extra heads at 1/2, 1/4, 1/8 "
                     "(uxnet.DeepSupervisionLoss)")
    mod.add_argument("--drop-path", type=float, help="stochastic depth rate (0)")
    run = parser.add_argument_group("memory and speed")
    run.add_argument("--budget", metavar="SIZE", help="memory to plan for, e.g. 24GB, or 'off' (default: free "
                     "memory of the GPU; on the CPU the available RAM)")
    run.add_argument("--checkpointing", choices=("off", "selective", "full"),
                     help="activation checkpointing (default: the plan chooses)")
    run.add_argument("--amp", action="store_true", help="autocast: bfloat16 where supported, else float16 + scaler")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                     help="parameter dtype (float64: for exact reproducibility checks)")
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 (default: cuda if available)")
    run.add_argument("--val-device", choices=("same", "cpu"), default="same",
                     help="where validation stitches the class scores (cpu for large volumes)")
    run.add_argument("--cache-rate", type=float, default=1.0, help="fraction of preprocessed volumes kept in RAM")
    run.add_argument("--cache-dir", help="PersistentDataset: preprocessed volumes on disk here instead (datasets "
                     "bigger than RAM)")
    run.add_argument("--workers", type=int, default=2, help="data workers (default 2)")
    run.add_argument("--worker-type", choices=("thread", "process"), default="thread")
    run.add_argument("--augment-on", choices=("auto", "workers", "device"), default="auto",
                     help="where random crops and affine run (auto: the GPU on CUDA, else the workers)")
    run.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    out = parser.add_argument_group("checkpoints and logs")
    out.add_argument("--save-every", type=int, default=500, help="write last.pt every N steps (and every 10 min)")
    out.add_argument("--log-every", type=int, default=10, help="a train.csv row every N steps")
    out.add_argument("--no-tensorboard", action="store_true")
    out.add_argument("--skip-label-check", action="store_true",
                     help="do not read every label to check its values (headers are still checked)")


def config_from_args(args):
    from uxnet.training.loop import TrainConfig
    from uxnet.training.recipe import RECIPES, TrainError

    recipe = RECIPES[args.recipe]
    roi = None
    if args.roi is not None:
        if len(args.roi) not in (1, 3):
            raise TrainError(f"--roi takes 1 or 3 sizes, got {args.roi}")
        roi = tuple(args.roi * 3 if len(args.roi) == 1 else args.roi)
    changes = dict(roi=roi, batch=args.batch, crops_per_volume=args.crops_per_volume, flip_prob=args.flip_prob,
                   lr=args.lr,
                   weight_decay=args.weight_decay, iterations=args.iterations, val_every=args.val_every,
                   overlap=args.overlap, sw_batch=args.sw_batch,
                   spacing=None if args.spacing is None else tuple(args.spacing),
                   orientation=args.orientation, intensity=None if args.intensity is None else tuple(args.intensity))
    recipe = recipe.replace(**changes)
    if args.no_resample:
        recipe = recipe.__class__(**{**recipe.__dict__, "spacing": None, "orientation": None})
    if args.percentile_norm:
        recipe = recipe.__class__(**{**recipe.__dict__, "intensity": None})
    branches = None
    if args.rep_branches:
        if len(args.rep_branches) % 2:
            raise TrainError(f"--rep-branches takes pairs (kernel size, dilation), got {args.rep_branches}")
        branches = [tuple(args.rep_branches[i:i + 2]) for i in range(0, len(args.rep_branches), 2)]
    model = dict(feat_size=args.feat_size, hidden_size=args.hidden_size, depths=args.depths,
                 kernel_size=args.kernel_size, rep_branches=branches, deep_supervision=args.deep_supervision,
                 drop_path_rate=args.drop_path)
    checkpointing = {None: None, "off": False, "selective": True, "full": "full"}[args.checkpointing]
    return TrainConfig(
        data=args.data, output=args.output, recipe=recipe, model=model, val_fraction=args.val_fraction,
        fold=args.fold, folds=args.folds, seed=args.seed, budget=args.budget, checkpointing=checkpointing,
        fixed_roi=args.roi is not None, fixed_batch=args.batch is not None, cache_rate=args.cache_rate,
        cache_dir=args.cache_dir, workers=args.workers, worker_type=args.worker_type, augment_on=args.augment_on,
        device=args.device, val_device=args.val_device, amp=args.amp, compile=args.compile, dtype=args.dtype,
        lr_schedule=args.lr_schedule, save_every=args.save_every, resume=args.resume, init=args.init,
        dry_run=args.dry_run, check_labels=not args.skip_label_check, tensorboard=not args.no_tensorboard,
        log_every=args.log_every, threads=args.threads)


def run(args) -> int:
    try:
        import monai  # noqa: F401
        import nibabel  # noqa: F401
    except ImportError as exc:
        print(f"uxnet train: error: {exc.name} is not installed; install the extra: pip install 'uxnet[monai]'",
              file=sys.stderr)
        return EXIT_ERROR
    from uxnet.training import TrainError
    from uxnet.training.loop import train

    try:
        train(config_from_args(args), out=lambda msg: print(msg, flush=True))
    except TrainError as exc:
        print(f"uxnet train: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("uxnet train: interrupted; continue with --resume", file=sys.stderr)
        return 130
    return 0
