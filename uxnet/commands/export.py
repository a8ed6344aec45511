"""``uxnet export CHECKPOINT --out PATH --format {pt,exported,torchscript,onnx}``: re-parameterise and export."""

import sys
import time

from ..io.export import FORMATS


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="a uxnet checkpoint (uxnet.save_checkpoint) or a bare UXNet "
                                           "state_dict such as an official 3D UX-Net checkpoint")
    parser.add_argument("--out", required=True, help="output file")
    parser.add_argument("--format", choices=FORMATS, default="pt",
                        help="pt: plain uxnet checkpoint (official state_dict keys); exported: torch.export program; "
                             "torchscript: traced TorchScript (C++: torch::jit::load); onnx: standard-op ONNX")
    parser.add_argument("--example-shape", type=int, nargs=5, metavar=("N", "C", "D", "H", "W"),
                        help="example input that traces the graph formats (default 1 C 96 96 96)")
    parser.add_argument("--dynamic", action="store_true",
                        help="exported/onnx: dynamic batch and D, H, W (multiples of 16, >= 32); needs an "
                             "example shape with N >= 2 and D, H, W >= 32")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip reloading the artefact and comparing it with the checkpoint's model")


def run(args) -> int:
    from ..io.checkpoint import CheckpointError, load_checkpoint, load_preprocessing
    from ..io.export import export, verify_export

    try:
        model = load_checkpoint(args.checkpoint)
        preprocessing = load_preprocessing(args.checkpoint) if args.format == "pt" else None
    except CheckpointError as exc:
        print(f"uxnet export: {exc}", file=sys.stderr)
        return 2
    try:
        start = time.perf_counter()
        path = export(model, args.out, format=args.format, example_shape=args.example_shape, dynamic=args.dynamic,
                      preprocessing=preprocessing)
        elapsed = time.perf_counter() - start
    except (ValueError, ImportError, OSError) as exc:
        print(f"uxnet export: {exc}", file=sys.stderr)
        return 2
    branches = model.config.get("rep_branches")
    merged = f"merged branches {branches}" if branches else "no branches"
    prior = f", folded kernel prior {model.config['kernel_prior']!r}" if model.config.get("kernel_prior") else ""
    print(f"wrote {path} ({args.format}, {merged}{prior}) in {elapsed:.1f} s")
    if not args.no_verify:
        err = verify_export(model, path, args.format, args.example_shape)
        print(f"reloaded and compared with the checkpoint's model: relative error {err:.2e}")
        if not err <= 1e-4:
            print("uxnet export: the exported model does not match the checkpoint (relative error > 1e-4)",
                  file=sys.stderr)
            return 1
    return 0
