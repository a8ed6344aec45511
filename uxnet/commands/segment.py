"""``uxnet segment CHECKPOINT INPUT.nii.gz -o OUTPUT.nii.gz``: sliding-window segmentation of a NIfTI volume."""

import sys
import time

EXIT_ERROR = 2


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="uxnet checkpoint (uxnet.save_checkpoint / uxnet export --format pt) "
                                           "or an official 3D UX-Net state_dict")
    parser.add_argument("input", help="NIfTI volume (X, Y, Z) or (X, Y, Z, channels)")
    parser.add_argument("-o", "--output", required=True, help="label map to write (NIfTI, input affine/header)")
    parser.add_argument("--roi", type=int, nargs="+", default=[96], metavar="N",
                        help="window size: 1 or 3 multiples of 16 (default 96)")
    parser.add_argument("--overlap", type=float, default=0.5, help="window overlap in [0, 1) (default 0.5)")
    parser.add_argument("--sw-batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    parser.add_argument("--device", default=None, help="device for the windows (default: cuda if available)")
    parser.add_argument("--stitch-device", choices=("same", "cpu"), default="same",
                        help="where the blended full-volume scores live; 'cpu' keeps accelerator memory bounded "
                             "to the windows for large volumes (default: same as --device)")
    parser.add_argument("--clip", type=float, nargs=2, metavar=("A", "B"), help="clip intensities to [A, B] "
                        "(the paper: -175 250 for abdominal CT)")
    parser.add_argument("--rescale-clip", action="store_true", help="after --clip, map [A, B] linearly to [0, 1]")
    parser.add_argument("--percentile-norm", type=float, nargs="*", metavar="P",
                        help="(X - X_lo) / (X_hi - X_lo) with percentiles LO HI (default 1 99, as in the paper)")
    parser.add_argument("--amp", action="store_true", help="run windows under autocast (bf16 CPU, fp16 CUDA)")
    parser.add_argument("--backend", default="auto", help="uxnet_kernels backend (default auto)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def _fail(message: str) -> int:
    print(f"uxnet segment: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def run(args) -> int:
    try:
        import monai  # noqa: F401
        import nibabel  # noqa: F401
    except ImportError as exc:
        return _fail(f"{exc.name} is not installed; install the extra: pip install 'uxnet[monai]'")
    import torch

    import uxnet_kernels as uk
    from uxnet.segment import Preprocessing, Progress, SegmentError, check_roi, load_model_for_inference
    from uxnet.segment import load_volume, save_labels, segment_volume, window_count

    try:
        if args.percentile_norm is not None and len(args.percentile_norm) not in (0, 2):
            raise SegmentError(f"--percentile-norm takes 0 or 2 values (LO HI), got {args.percentile_norm}")
        prep = Preprocessing(
            clip=tuple(args.clip) if args.clip else None,
            rescale_clip=args.rescale_clip,
            percentile_norm=None if args.percentile_norm is None else tuple(args.percentile_norm or (1.0, 99.0)),
        )
        roi = check_roi(args.roi)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SegmentError(f"--device {args.device} requested but CUDA is not available")
        stitch = torch.device("cpu") if args.stitch_device == "cpu" else device
        model = load_model_for_inference(args.checkpoint)
        volume, image = load_volume(args.input)
        if volume.shape[0] != model.in_chans:
            raise SegmentError(f"{args.input!r} has {volume.shape[0]} channel(s) but the checkpoint's model expects "
                               f"in_chans={model.in_chans}")
        volume = prep.apply(volume)
        total = window_count(volume.shape[1:], roi, args.overlap)
        progress = Progress(total, enabled=not args.quiet)
        if not args.quiet:
            print(f"segment: {tuple(volume.shape[1:])} voxels, {total} windows of {roi} on {device}, "
                  f"stitching on {stitch}", file=sys.stderr)
        start = time.perf_counter()
        with uk.use_backend(args.backend):
            labels = segment_volume(model, volume, roi, args.overlap, args.sw_batch_size, device, stitch,
                                    amp=args.amp, progress=progress.update)
        path = save_labels(labels, image, args.output)
    except SegmentError as exc:
        return _fail(str(exc))
    except ValueError as exc:  # e.g. an unknown --backend, bad shapes caught by uxnet_kernels
        return _fail(str(exc))
    except torch.OutOfMemoryError as exc:
        return _fail(f"out of memory ({str(exc).splitlines()[0]}); lower --sw-batch-size or --roi, or use "
                     f"--stitch-device cpu")
    if not args.quiet:
        counts = torch.bincount(labels.flatten(), minlength=model.out_chans).tolist()
        print(f"segment: wrote {path} in {time.perf_counter() - start:.1f} s; voxels per label {counts}",
              file=sys.stderr)
    return 0
