"""The Python/torch/triton/CUDA versions uxnet declares, and the stacks CI tests: the one source for ``uxnet info``,
the README's "Supported versions" table and ``.ci/version_matrix.sh``. Standard library only, so CI and the README
check can run it as a plain file before anything is installed:

    python uxnet_kernels/versions.py matrix    # one line per CI stack: name python torch triton cuda_kernels
    python uxnet_kernels/versions.py get NAME FIELD
    python uxnet_kernels/versions.py table     # the README table (Markdown)
"""

import re
import sys
from typing import NamedTuple, Optional, Tuple


class TestedStack(NamedTuple):
    """One Python/torch/triton combination that CI installs and tests."""

    name: str
    python: str  # major.minor
    torch: str  # exact release installed from PyPI (or the local CPU wheel)
    triton: str
    torch_cuda: Optional[str]  # the CUDA of that torch build; None for a CPU build
    cuda_kernels: bool  # csrc/cuda is compiled with nvcc against this torch's headers (no GPU: compile only)
    tests: str  # what CI runs on it


# Declared floors (pyproject.toml's requires-python, torch>=, triton>= must say the same; tests/test_versions.py).
# torch 2.6 / triton 3.2 / Python 3.9 was tried as the oldest stack and failed 8 tests of the subset (issue 14), so
# the floors are the oldest stack CI passes; Python 3.10 is torch 2.11's own floor (untested here).
MINIMUM = {"python": "3.10", "torch": "2.11", "triton": "3.6"}

CI_STACKS = (
    TestedStack("current", "3.11", "2.13.0", "3.9.0", None, False, "whole suite and C++ example"),
    TestedStack("gpu-machine", "3.12", "2.11.0", "3.6.0", "13.0", True,
                "focused subset, Triton interpreter included"),
)
# The CUDA toolkit (nvcc) CI compiles csrc/cuda with; no CI machine has a GPU, so no CUDA kernel runs there.
CI_NVCC = "13.0"

# The tests the extra stacks run (paths relative to the repository root): every op against the reference,
# opcheck, torch.compile/export, the Triton kernels under the interpreter, official-model equivalence.
MATRIX_TESTS = (
    "tests/ops",
    "tests/test_compile_first.py",
    "tests/test_dispatch.py",
    "tests/test_triton_runtime.py",
    "tests/test_integration.py",
    "tests/test_export.py",
    "tests/test_model.py",
    "tests/test_versions.py",
    "tests/test_gpu_validate_script.py",
)


def parse(version: str) -> Tuple[int, int]:
    """(major, minor) of a version string such as "2.11.0+cu130", "3.12.1" or "2.6"."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"unrecognised version string {version!r}")
    return int(match.group(1)), int(match.group(2))


def _tested_minors(field: str) -> list:
    return sorted({parse(getattr(stack, field)) for stack in CI_STACKS})


def _fmt(minor: Tuple[int, int]) -> str:
    return f"{minor[0]}.{minor[1]}"


def status(field: str, version: Optional[str]) -> str:
    """Where ``version`` of ``field`` ("python", "torch" or "triton") stands against the declared floor and the
    versions CI tests: "tested", "inside the tested range", "newer than tested" or "below the declared minimum"."""
    if version is None:
        return "not installed"
    have = parse(version)
    tested = _tested_minors(field)
    span = f"{_fmt(tested[0])}-{_fmt(tested[-1])}"
    if have < parse(MINIMUM[field]):
        return f"UNSUPPORTED: below the declared minimum {MINIMUM[field]}"
    if have in tested:
        return f"tested in CI (tested range {span})"
    if have < tested[0]:
        return f"UNTESTED: older than the tested range {span} (declared minimum {MINIMUM[field]})"
    if have < tested[-1]:
        return f"inside the tested range {span}; this minor version itself is not tested"
    return f"UNTESTED: newer than the tested range {span}"


def cuda_status(torch_cuda: Optional[str]) -> str:
    """The same for the CUDA version of the torch build (``torch.version.cuda``)."""
    if torch_cuda is None:
        return "CPU build of torch"
    have = parse(torch_cuda)
    if have in {parse(s.torch_cuda) for s in CI_STACKS if s.cuda_kernels}:
        return "tested in CI on CPU; csrc/cuda compile-tested against it (nvcc, sm_90); no GPU run in CI"
    if have in {parse(s.torch_cuda) for s in CI_STACKS if s.torch_cuda}:
        return "tested in CI on CPU; csrc/cuda not compiled against it in CI; no GPU run in CI"
    return "UNTESTED in CI"


def table() -> str:
    """The README's supported-versions table: the declared floors, one row per CI stack, and what no CI run covers."""
    rows = [
        "| | Python | torch | triton (optional) | CUDA of the torch build | tested by CI |",
        "|---|---|---|---|---|---|",
        f"| declared | >= {MINIMUM['python']} | >= {MINIMUM['torch']} | >= {MINIMUM['triton']} | any that torch "
        f"supports | |",
    ]
    for s in CI_STACKS:
        cuda = "CPU build" if s.torch_cuda is None else s.torch_cuda
        if s.cuda_kernels:
            cuda += f" (csrc/cuda compiled by nvcc {CI_NVCC} for sm_90)"
        where = ".ci/run" if s.name == "current" else ".ci/version_matrix.sh"
        rows.append(f"| {s.name} | {s.python} | {s.torch} | {s.triton} | {cuda} | {s.tests} (`{where}`) |")
    lo, tested = parse(MINIMUM["python"]), _tested_minors("python")
    python_gaps = [_fmt((lo[0], m)) for m in range(lo[1], tested[-1][1]) if (lo[0], m) not in tested]
    rows.append(f"| untested | {', '.join(python_gaps + ['newer'])} | other minor versions | other minor versions; "
                f"native GPU runs | other versions; every run of a CUDA or Triton kernel on a GPU (CI has none) | |")
    return "\n".join(rows)


def main(argv) -> int:
    if argv[:1] == ["matrix"]:
        for s in CI_STACKS:
            print(s.name, s.python, s.torch, s.triton, int(s.cuda_kernels))
    elif argv[:1] == ["get"] and len(argv) == 3:
        stack = {s.name: s for s in CI_STACKS}[argv[1]]
        print(getattr(stack, argv[2]))
    elif argv[:1] == ["tests"]:
        print(" ".join(MATRIX_TESTS))
    elif argv[:1] == ["table"]:
        print(table())
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
