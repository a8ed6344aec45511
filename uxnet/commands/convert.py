"""``uxnet convert CHECKPOINT --kernel-size K -o OUT``: grow a trained model's depthwise kernels (``uxnet.grow_kernel``)
and write the result as a uxnet checkpoint, keeping its recorded preprocessing."""

import sys

EXIT_ERROR = 2


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="a uxnet checkpoint or a bare UXNet state_dict (official checkpoints too)")
    parser.add_argument("--kernel-size", type=int, nargs="+", required=True, metavar="K",
                        help="the new depthwise kernel: 1 or 3 odd sizes, each at least the current one (e.g. 13)")
    parser.add_argument("-o", "--output", required=True, help="the uxnet checkpoint to write")


def _fail(message: str) -> int:
    print(f"uxnet convert: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def run(args) -> int:
    from ..io.checkpoint import CheckpointError, model_from_checkpoint, read_checkpoint, save_checkpoint
    from ..networks.kernel_growth import grow_kernel
    from ..networks.kernel_size import as_kernel_3d
    from ..networks.nets.uxnet import count_parameters

    if len(args.kernel_size) not in (1, 3):
        return _fail(f"--kernel-size takes 1 or 3 values, got {args.kernel_size}")
    kernel = args.kernel_size[0] if len(args.kernel_size) == 1 else tuple(args.kernel_size)
    try:
        ckpt = read_checkpoint(args.checkpoint)
        model = model_from_checkpoint(ckpt, args.checkpoint)
        old = as_kernel_3d(model.config["kernel_size"])
        grown = grow_kernel(model, kernel)
        path = save_checkpoint(grown, args.output, ckpt["preprocessing"])
    except (CheckpointError, ValueError, OSError) as exc:
        return _fail(str(exc))
    blocks = sum(len(stage) for stage in grown.uxnet_3d.stages)
    merged = " (training-time branches / kernel prior merged first)" if grown.config != dict(
        model.config, kernel_size=grown.config["kernel_size"]) else ""
    print(f"grew {blocks} depthwise kernels {old} -> {as_kernel_3d(grown.config['kernel_size'])}{merged}; "
          f"parameters {count_parameters(model):,} -> {count_parameters(grown):,}; wrote {path}")
    return 0
