"""``uxnet evaluate PRED LABEL [PRED LABEL ...] [--csv out.csv] [--classes 1 2 ...]``: per-class Dice and 95 %
Hausdorff distance (mm) of label maps against references, with MONAI's metrics (see uxnet/inference/evaluation.py)."""

import sys
import time

EXIT_ERROR = 2


def add_arguments(parser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PRED LABEL",
                        help="pairs of a predicted label map and its reference (NIfTI), or pairs of folders whose "
                             "files are matched by name")
    parser.add_argument("--classes", type=int, nargs="+", metavar="C",
                        help="the classes to score (default: every nonzero label found); any other nonzero value in "
                             "a file is an error")
    parser.add_argument("--csv", metavar="PATH", help="also write the table (one row per case and the mean) as CSV")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def _fail(message: str) -> int:
    print(f"uxnet evaluate: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def run(args) -> int:
    try:
        import monai  # noqa: F401
        import nibabel  # noqa: F401
        import scipy  # noqa: F401  (MONAI's Hausdorff distance)
    except ImportError as exc:
        return _fail(f"{exc.name} is not installed; install the extra: pip install 'uxnet[monai]'")
    from uxnet.inference.evaluation import (EvaluationError, evaluate_case, format_table, pair_inputs, table_rows,
                                            write_csv)

    try:
        if args.classes is not None and (0 in args.classes or len(set(args.classes)) != len(args.classes)
                                         or min(args.classes) < 0):
            raise EvaluationError(f"--classes must be distinct positive labels (0 is background), got {args.classes}")
        pairs = pair_inputs(args.paths)
        cases, classes = [], set(args.classes or ())
        for i, (pred, label) in enumerate(pairs, start=1):
            start = time.perf_counter()
            case, used = evaluate_case(pred, label, args.classes)
            cases.append(case)
            classes.update(used)
            if not args.quiet:
                print(f"evaluate: [{i}/{len(pairs)}] {pred.name} vs {label} in {time.perf_counter() - start:.1f} s",
                      file=sys.stderr, flush=True)
        if not classes:
            raise EvaluationError("no class to score: every file holds only background (0); pass --classes")
        header, rows = table_rows(cases, sorted(classes))
        print(format_table(header, rows))
        if args.csv:
            print(f"wrote {write_csv(args.csv, header, rows)}", file=sys.stderr)
    except (EvaluationError, OSError) as exc:
        return _fail(str(exc))
    return 0
