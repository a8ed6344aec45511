"""Build script for uxnet: the Python packages plus the C++/CUDA operator library uxnet_kernels._C.

Install with build isolation off, after torch is installed, so pip never fetches a second torch:

    pip install --no-build-isolation .

Environment switches:
    UXNET_CUDA=auto|0|1   compile csrc/cuda (auto: only with a CUDA toolkit and a CUDA build of torch)
    UXNET_NO_EXTENSION=1  skip the C++ extension entirely (the package then runs on reference ops)
    UXNET_SANITIZE=LIST   compile and link with -fsanitize=LIST (e.g. address,undefined; scripts/sanitize_cpu.sh)
    MAX_JOBS=N            parallel compile jobs (honoured by torch's ninja build)
"""

import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - exercised only on misconfigured installs
    sys.exit(
        "uxnet: torch must be installed before building (e.g. `pip install torch==2.13.0`), and pip must "
        "run with --no-build-isolation so that it does not download a second torch into a build "
        "environment: `pip install --no-build-isolation .`"
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    mode = os.environ.get("UXNET_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"uxnet: UXNET_CUDA must be auto, 0 or 1, got {mode!r}")
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if mode == "1" and not available:
        sys.exit("uxnet: UXNET_CUDA=1 but torch is not a CUDA build or no CUDA toolkit was found (set CUDA_HOME)")
    return mode == "1" or (mode == "auto" and available)


def _sources(pattern: str) -> list:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern), recursive=True))


def _extensions() -> list:
    if os.environ.get("UXNET_NO_EXTENSION") == "1":
        return []
    # No -std flag: torch's BuildExtension adds the standard its headers need (C++17, or C++20 from torch 2.10 on).
    # -ffp-contract=off: g++ fuses a * b + c into an FMA on its own in C++ (any -std); the CPU kernels say fma()
    # where they want one, so every ISA variant rounds alike (docs/ARCHITECTURE.md, "CPU SIMD layer").
    # -Wno-psabi: GCC notes an ABI change for 64-byte vectors passed to inlined functions (csrc/cpu/simd).
    cxx_flags = ["-O3", "-ffp-contract=off", "-Wno-psabi"] + (["-fopenmp"] if sys.platform != "darwin" else [])
    macros = [("UXNET_PYTHON_EXTENSION", None)]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/**/*.cpp")
    link_args = ["-fopenmp"] if sys.platform != "darwin" else []
    sanitize = os.environ.get("UXNET_SANITIZE", "")
    if sanitize:
        sanitize_flags = [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g", "-O1"]
        cxx_flags = cxx_flags + sanitize_flags
        link_args = link_args + sanitize_flags
    if _want_cuda():
        macros.append(("UXNET_WITH_CUDA", None))
        # No --use_fast_math: the kernels keep IEEE division, sqrt and denormals (float32 is checked to 1e-5).
        nvcc_flags = ["-O3", "-lineinfo"]
        return [
            CUDAExtension(
                "uxnet_kernels._C",
                sources + _sources("csrc/cuda/**/*.cu"),
                include_dirs=[os.path.join(HERE, "csrc")],
                define_macros=macros,
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                extra_link_args=link_args,
            )
        ]
    return [
        CppExtension(
            "uxnet_kernels._C",
            sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_args,
        )
    ]


setup(
    packages=find_packages(include=["uxnet", "uxnet.*", "uxnet_kernels", "uxnet_kernels.*"]),
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
