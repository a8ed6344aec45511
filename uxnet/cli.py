"""The ``uxnet`` command line: ``uxnet info | bench | memory | train | segment | evaluate | export | convert``.

Each subcommand lives in ``uxnet/commands/<name>.py`` with ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their command runs, so ``uxnet info`` stays fast.
"""

import argparse
import importlib
import sys
from typing import List, Optional

COMMANDS = {
    "info": "versions, compiled backends, CPU features and GPU",
    "bench": "benchmark the fast backends against the PyTorch reference",
    "export": "re-parameterise a checkpoint and export it (pt, exported, torchscript, onnx)",
    "segment": "sliding-window segmentation of a NIfTI volume",
    "evaluate": "per-class Dice and 95% Hausdorff distance of label maps against references",
    "convert": "grow a checkpoint's depthwise kernels to a larger size (UpKern-style)",
    "memory": "predict the memory of one training step without allocating it",
    "train": "train UXNet on an MSD or official-layout NIfTI dataset (official recipe, resumable, DDP)",
}


def _command_module(name: str):
    return importlib.import_module(f"uxnet.commands.{name}")


def build_parser(argv: List[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uxnet", description="uxnet: fast 3D UX-Net kernels and tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:
            _command_module(name).add_arguments(p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    return int(_command_module(args.command).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
