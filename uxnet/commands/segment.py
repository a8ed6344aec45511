"""``uxnet segment CHECKPOINT INPUT [INPUT ...] -o OUTPUT``: sliding-window segmentation of NIfTI volumes, with the
preprocessing recorded in the checkpoint (resampled to the training spacing and orientation, and back)."""

import contextlib
import sys
import time
from pathlib import Path

EXIT_ERROR = 2


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="uxnet checkpoint (uxnet.save_checkpoint / uxnet export --format pt) "
                                           "or an official 3D UX-Net state_dict")
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="NIfTI volume(s) (X, Y, Z) or (X, Y, Z, channels), or folders of .nii/.nii.gz files")
    parser.add_argument("-o", "--output", required=True,
                        help="label map to write (one input file and a .nii/.nii.gz name), otherwise a folder that "
                             "receives one label map per input under the input's file name")
    spatial = parser.add_argument_group("resampling (default: as recorded in the checkpoint)")
    spatial.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                         help="resample to this voxel spacing in mm (per axis after reorientation)")
    spatial.add_argument("--orientation", metavar="CODE", help="reorient to this code first, e.g. RAS")
    spatial.add_argument("--no-resample", action="store_true",
                         help="segment on the volume's own grid (ignore recorded spacing and orientation)")
    spatial.add_argument("--invert", choices=("scores", "labels"), default="scores",
                         help="how the prediction returns to the input grid: 'scores' resamples the class scores "
                              "linearly, then takes the argmax (default); 'labels' resamples the label map by "
                              "nearest neighbour (least memory)")
    intensity = parser.add_argument_group("intensity (any of these replaces the recorded intensity preprocessing)")
    intensity.add_argument("--clip", type=float, nargs=2, metavar=("A", "B"), help="clip intensities to [A, B] "
                           "(the paper: -175 250 for abdominal CT)")
    intensity.add_argument("--rescale-clip", action="store_true", help="after --clip, map [A, B] linearly to [0, 1]")
    intensity.add_argument("--percentile-norm", type=float, nargs="*", metavar="P",
                           help="(X - X_lo) / (X_hi - X_lo) with percentiles LO HI (default 1 99, as in the paper)")
    parser.add_argument("--roi", type=int, nargs="+", default=None, metavar="N",
                        help="window size: 1 or 3 multiples of 16 (default: the recorded training ROI, else 96)")
    parser.add_argument("--overlap", type=float, default=0.5, help="window overlap in [0, 1) (default 0.5)")
    parser.add_argument("--sw-batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    parser.add_argument("--device", default=None, help="device for the windows (default: cuda if available)")
    parser.add_argument("--stitch-device", choices=("same", "cpu"), default="same",
                        help="where the blended full-volume scores live; 'cpu' keeps accelerator memory bounded "
                             "to the windows for large volumes (default: same as --device)")
    parser.add_argument("--amp", action="store_true", help="run windows under autocast (bf16 CPU, fp16 CUDA)")
    parser.add_argument("--backend", default="auto", help="uxnet_kernels backend (default auto)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def _fail(message: str) -> int:
    print(f"uxnet segment: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def _log(args, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def resolve_preprocessing(args, recorded):
    """The recorded preprocessing with the command-line overrides applied, and a note for the user (or None)."""
    from uxnet.inference.segment import SegmentError, check_roi
    from uxnet.preprocessing import Preprocessing

    prep = recorded or Preprocessing()
    note = None
    if args.no_resample and (args.spacing or args.orientation):
        raise SegmentError("--no-resample cannot be combined with --spacing or --orientation")
    if args.percentile_norm is not None and len(args.percentile_norm) not in (0, 2):
        raise SegmentError(f"--percentile-norm takes 0 or 2 values (LO HI), got {args.percentile_norm}")
    if args.clip is not None and not args.clip[0] < args.clip[1]:
        raise SegmentError(f"--clip A B needs A < B, got {args.clip[0]:g} {args.clip[1]:g}")
    if args.rescale_clip and args.clip is None:
        raise SegmentError("--rescale-clip needs --clip A B")
    changes = {}
    if args.no_resample:
        changes.update(spacing=None, orientation=None)
    if args.spacing:
        changes["spacing"] = tuple(args.spacing)
    if args.orientation:
        changes["orientation"] = args.orientation
    if args.clip is not None or args.percentile_norm is not None:
        changes.update(intensity_range=tuple(args.clip) if args.clip else None,
                       output_range=(0.0, 1.0) if args.rescale_clip else None, clip=True,
                       percentile_norm=None if args.percentile_norm is None else tuple(args.percentile_norm or (1, 99)))
    if args.roi:
        changes["roi_size"] = check_roi(args.roi)
    try:
        prep = prep.replace(**changes)
    except ValueError as exc:
        raise SegmentError(str(exc).replace("preprocessing: ", "")) from exc
    if recorded is None:
        note = ("the checkpoint records no preprocessing (saved without it, format version 1, or a bare "
                "state_dict): " +
                ("resampling as given on the command line" if prep.resamples else
                 "the volume is segmented on its own grid (pass --spacing/--orientation to resample)") +
                ("" if prep.has_intensity else ", without intensity preprocessing (see --clip/--percentile-norm)"))
    return prep, note


def run(args) -> int:
    try:
        import monai  # noqa: F401
        import nibabel  # noqa: F401
    except ImportError as exc:
        return _fail(f"{exc.name} is not installed; install the extra: pip install 'uxnet[monai]'")
    import torch

    import uxnet_kernels as uk
    from uxnet.inference.segment import (SegmentError, StageClock, check_roi, collect_inputs,
                                         load_model_for_inference, load_volume, output_paths, save_labels,
                                         segment_image)
    from uxnet.memory.tracker import PeakMemoryTracker
    from uxnet.progress import Progress

    try:
        inputs = collect_inputs(args.inputs)
        single = len(args.inputs) == 1 and len(inputs) == 1 and not Path(args.inputs[0]).is_dir()
        outputs = output_paths(inputs, args.output, single)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SegmentError(f"--device {args.device} requested but CUDA is not available")
        stitch = torch.device("cpu") if args.stitch_device == "cpu" else device
        model, recorded = load_model_for_inference(args.checkpoint)
        prep, note = resolve_preprocessing(args, recorded)
        roi = check_roi(prep.roi_size or (96,))
        if note:
            print(f"segment: note: {note}", file=sys.stderr)
        _log(args, f"segment: {len(inputs)} volume(s); preprocessing: {prep.describe()}; windows of {roi} on "
                   f"{device}, stitching on {stitch}")
        progress = Progress(0, "segment", "windows", enabled=not args.quiet)
        for index, (src, dst) in enumerate(zip(inputs, outputs), start=1):
            clock = StageClock()
            start = time.perf_counter()
            with clock.stage("load"):
                volume, image = load_volume(src)
            if volume.shape[0] != model.in_chans:
                raise SegmentError(f"{str(src)!r} has {volume.shape[0]} channel(s) but the checkpoint's model "
                                   f"expects in_chans={model.in_chans}")
            tag = f"segment: [{index}/{len(inputs)}] {src.name}"

            def on_model_grid(shape, windows, tag=tag, in_shape=tuple(volume.shape[1:])):
                progress.restart(windows)
                grid = (f"resampled {in_shape} -> {shape} voxels" if prep.resamples else f"{shape} voxels")
                _log(args, f"{tag}: {grid}, {windows} windows")

            with contextlib.ExitStack() as stack:  # peak host memory, and the accelerator's when there is one
                devices = [torch.device("cpu")] + ([device] if device.type != "cpu" else [])
                trackers = [stack.enter_context(PeakMemoryTracker(d)) for d in devices]
                stack.enter_context(uk.use_backend(args.backend))
                result = segment_image(model, volume, image.affine, prep, roi, args.overlap, args.sw_batch_size,
                                       device, stitch, amp=args.amp, invert=args.invert, progress=progress.update,
                                       on_model_grid=on_model_grid, clock=clock)
                with clock.stage("write"):
                    path = save_labels(result.labels, image, dst)
            elapsed = time.perf_counter() - start
            peaks = ", ".join(f"{t.device.type} {t.result}" for t in trackers)
            counts = torch.bincount(result.labels.flatten(), minlength=model.out_chans).tolist()
            names = prep.class_names or [str(i) for i in range(len(counts))]
            per_label = ", ".join(f"{n}: {c}" for n, c in zip(names, counts))
            _log(args, f"{tag}: wrote {path} in {elapsed:.1f} s, peak memory {peaks}; voxels per label {{{per_label}}}")
            _log(args, f"{tag}: seconds per stage: {clock.describe()}")
    except SegmentError as exc:
        return _fail(str(exc))
    except ValueError as exc:  # e.g. an unknown --backend, bad shapes caught by uxnet_kernels
        return _fail(str(exc))
    except torch.OutOfMemoryError as exc:
        return _fail(f"out of memory ({str(exc).splitlines()[0]}); lower --sw-batch-size or --roi, use "
                     f"--stitch-device cpu, or --invert labels")
    return 0
