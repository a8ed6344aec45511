"""The ISA variant the compiled CPU kernels run with (``UXNET_CPU_ISA``), and the variants this machine can run.

The CPU kernels (csrc/cpu) are compiled once per variant and pick one at every call:

- ``auto`` (default, or unset): the best this CPU supports, ``avx512`` > ``avx2`` > ``generic``;
- ``generic``: 16-byte vectors (SSE2 on x86-64, NEON on arm64);
- ``avx2``: AVX2 + FMA, 8 float lanes;
- ``avx512``: AVX-512 F/BW/VL/DQ, 16 float lanes;
- ``avx512-emulated``: the avx512 variant's 16-lane vectors, register blocks, masks and tails, run as pairs of
  AVX2 registers (x86-64) or NEON quadruples (arm64): the AVX-512 code paths on a CPU without AVX-512. Its results
  are bitwise identical to ``avx512``'s.

A variant this machine cannot run makes the ops raise (no silent fallback).
"""

import os
from typing import Dict, List

from . import _extension

VARIANTS = ("generic", "avx2", "avx512", "avx512-emulated")
ENV_VAR = "UXNET_CPU_ISA"


def report() -> Dict[str, object]:
    """``{"requested", "selected", "error", "available", "unavailable"}`` from the compiled library.

    ``requested`` is ``UXNET_CPU_ISA`` ("auto" when unset); ``selected`` the variant the kernels would run with now
    ("" and ``error`` set when the request cannot be served); ``available`` the variants this machine runs;
    ``unavailable`` "variant: reason" strings. Without the compiled extension, ``error`` says so.
    """
    if not _extension.LOADED:
        requested = os.environ.get(ENV_VAR) or "auto"
        return {"requested": requested, "selected": "", "error": "uxnet_kernels._C is not built",
                "available": [], "unavailable": [f"{v}: uxnet_kernels._C is not built" for v in VARIANTS]}
    from . import _C

    return _C.cpu_isa()


def available() -> List[str]:
    """The variants this machine (CPU, OS and build) can run."""
    return list(report()["available"])
